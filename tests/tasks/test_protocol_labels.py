"""Every streaming evaluation names what the model carries: memory 0 and memory 64 no longer share one label."""
import logging

import pytest
from fairseq import tasks

from tests.harness import training_cfg


@pytest.mark.parametrize("arch,extra,memory", [
    ("transformer_xl_tiny", ["--mem-len", "0"], "memory: none (mem_len 0)"),
    ("transformer_xl_tiny", ["--mem-len", "64", "--clamp-len", "32"], "memory: mem_len 64, clamp_len 32"),
    ("sha_rnn_tiny", [], "memory: LSTM state, attention memory of max_memory 40"),
    ("adaptive_span_tiny", [], "memory: each layer's cache of its inputs, up to attn_span"),
    ("fast_weight_tiny", [], "memory: none (fast weights reset every segment)"),
    ("fast_weight_tiny", ["--carry-over-fast-weight"], "memory: fast weights carried"),
    ("composed_hybrid_delta_tiny", [], "memory: hidden-state memory 16, fast weights carried"),
    ("composed_alibi_memory_tiny", ["--source", "window"], "memory: key/value window 16"),
    ("alibi_lm_tiny", [], "memory: none"),
])
def test_streaming_evaluation_label_names_the_memory(data_dir, caplog, arch, extra, memory):
    cfg = training_cfg(arch, ["--tokens-per-sample", "8", "--batch-size", "2", *extra], task="streaming_lm",
                       data=data_dir)
    task = tasks.setup_task(cfg.task)
    task.build_model(cfg.model)
    task.load_dataset("valid")
    with caplog.at_level(logging.INFO):
        task.eval_lm_dataloader(task.dataset("valid"), batch_size=2, num_workers=0)
    assert f"evaluation protocol: stream(B=2, T=8, cold), {memory}" in caplog.text
