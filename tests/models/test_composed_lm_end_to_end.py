"""composed_lm user flows, in process on a generated corpus, for every composed preset: fairseq-train --task
streaming_lm (state carried across batches, the span loss and statistics through lm_loss) -> checkpoint ->
streaming fairseq-eval-lm scoring every target once -> beam-search generation with incremental decoding (one
preset also through the fairseq-interactive command). A window model's evaluation does not depend on the segment
length; a stateless composition runs under fairseq's language_modeling task with --context-window."""
import os
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.models.composed_lm import ComposedLanguageModel
from tests.harness import (USER_DIR, fairseq_eval_lm, fairseq_train, generated_data_dir, split_token_count,
                           streaming_eval_lm)

pytestmark = pytest.mark.slow
PRESETS = ["composed_alibi_memory_tiny", "composed_delta_persistent_tiny", "composed_span_xl_tiny",
           "composed_hybrid_delta_tiny"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generated_data_dir(tmp_path_factory, 100, 40)


def train(data, save_dir, arch, *extra, task="streaming_lm"):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_train([data, "--user-dir", USER_DIR, "--task", task, "--arch", arch, "--tokens-per-sample", "12",
                       "--batch-size", "4", "--max-update", "4", "--optimizer", "adam", "--lr", "0.003",
                       "--criterion", "lm_loss", "--save-dir", save_dir, "--no-epoch-checkpoints", "--cpu",
                       "--num-workers", "0", "--seed", "1", "--no-progress-bar", "--log-format", "simple", *extra])
    finally:
        torch.set_num_threads(threads)
    return os.path.join(save_dir, "checkpoint_last.pt")


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    return {arch: train(data, str(tmp_path_factory.mktemp(arch)), arch) for arch in PRESETS}


def load(data, checkpoint):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    assert isinstance(models[0], ComposedLanguageModel)
    return models[0].eval(), task


@pytest.mark.parametrize("arch", PRESETS)
def test_train_stream_evaluate_and_generate(data, checkpoints, caplog, arch):
    checkpoint = checkpoints[arch]
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    carries = arch != "composed_delta_persistent_tiny"
    assert (state["model"]["decoder._extra_state"]["train"] is not None) == carries  # the carried train stream
    n = split_token_count(data, "valid")
    loss, scored, log = streaming_eval_lm(data, checkpoint, caplog, "--batch-size", "3", "--tokens-per-sample", "7")
    assert scored == n and 0 < loss < 10 and "stream(B=3, T=7" in log
    model, task = load(data, checkpoint)
    generator = task.build_generator([model], type("Args", (), {"beam": 2, "max_len_b": 20, "min_len": 15})())
    prompt = torch.tensor([[task.dictionary.eos(), 5, 6, 7]])
    sample = {"net_input": {"src_tokens": prompt, "src_lengths": torch.tensor([4])}}
    hypos = task.inference_step(generator, [model], sample, prefix_tokens=prompt[:, 1:])
    best = hypos[0][0]["tokens"]
    assert best[:3].tolist() == [5, 6, 7] and len(best) >= 15
    # the beam's per-token scores are the incremental model's: rescore the hypothesis by streaming it in segments of
    # tokens_per_sample (12) with carried state; compare the full segments (a last, shorter segment gives descending
    # positions n-1..0 in streaming, 11-j incrementally)
    tokens = torch.cat([prompt[:, :1], best[None, :-1]], dim=1)  # (1, L): eos, then the hypothesis but its last
    full = tokens.size(1) // 12 * 12
    feats, carried = [], None
    with torch.no_grad():
        for start in range(0, full, 12):
            out, carried, _ = model.decoder.forward_segment(tokens[:, start:start + 12], carried)
            feats.append(out)
        lprobs = model.get_normalized_probs((torch.cat(feats, 1), {}), log_probs=True)[0]  # (full, V)
    rescored = lprobs.gather(-1, best[:full, None])[:, 0]
    assert full >= 12
    torch.testing.assert_close(hypos[0][0]["positional_scores"][3:full], rescored[3:], atol=1e-4, rtol=0)


def test_span_training_logs_the_span_and_its_loss(data, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        train(data, str(tmp_path), "composed_span_xl_tiny", "--log-interval", "1")
    assert "span_avg" in caplog.text and "aux_loss" in caplog.text


def test_window_evaluation_does_not_depend_on_the_segment_length(data, tmp_path, caplog):
    checkpoint = train(data, str(tmp_path), "composed_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
                       "--decoder-ffn-embed-dim", "64", "--source", "window", "--mem-len", "6")
    losses = [streaming_eval_lm(data, checkpoint, caplog, "--batch-size", "2", "--tokens-per-sample", t)[0]
              for t in ("4", "12")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_stateless_composition_runs_the_sliding_window_under_language_modeling(data, tmp_path):
    checkpoint = train(data, str(tmp_path), "composed_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
                       "--decoder-ffn-embed-dim", "64", "--source", "segment", task="language_modeling")
    args = [data, "--user-dir", USER_DIR, "--path", checkpoint, "--task", "language_modeling", "--gen-subset",
            "valid", "--cpu", "--num-workers", "0", "--no-progress-bar", "--tokens-per-sample", "8", "--batch-size",
            "4", "--sample-break-mode", "none"]
    sliding = float(fairseq_eval_lm([*args, "--context-window", "6"])["loss"])
    blocks = float(fairseq_eval_lm(args)["loss"])
    assert 0 < sliding < 10 and sliding != blocks


def test_fairseq_interactive_generates(data, checkpoints):
    exe = os.path.join(os.path.dirname(sys.executable), "fairseq-interactive")
    proc = subprocess.run([exe, data, "--user-dir", USER_DIR, "--task", "language_modeling", "--path",
                           checkpoints["composed_hybrid_delta_tiny"], "--beam", "2", "--min-len", "20",
                           "--max-len-b", "30", "--cpu"],
                          input="w1 w2 w3\nw4\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hypos = [line.split("\t")[2].split() for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypos) == 2 and all(len(h) >= 20 for h in hypos)
