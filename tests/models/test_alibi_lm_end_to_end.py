"""The ALiBi user flow in process: fairseq-preprocess -> fairseq-train --task language_modeling --arch alibi_lm_*
-> fairseq-eval-lm at 4x the training length (non-overlapping and sliding window), with no --model-overrides.
Spec acceptance checks 6 and 11 on a generated corpus; eval-lm's number is recomputed by hand from the checkpoint."""
import logging
import math
import os
import re

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.models.alibi_lm import AlibiLanguageModel
from tests.harness import (USER_DIR, fairseq_eval_lm, fairseq_preprocess, fairseq_train, random_corpus,
                           split_token_count)

pytestmark = pytest.mark.slow
TRAIN_L = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    raw = tmp_path_factory.mktemp("alibi-raw")
    data = fairseq_preprocess(str(tmp_path_factory.mktemp("alibi-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 80, seed=10),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 25, seed=11))
    save_dir = str(tmp_path_factory.mktemp("alibi-ckpt"))
    torch.set_num_threads(1)
    fairseq_train([data, "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "alibi_lm_tiny",
                   "--tokens-per-sample", str(TRAIN_L), "--sample-break-mode", "none", "--max-tokens", "128",
                   "--max-update", "8", "--optimizer", "adam", "--lr", "0.005", "--criterion", "cross_entropy",
                   "--save-dir", save_dir, "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1",
                   "--no-progress-bar", "--log-format", "simple"])
    return data, os.path.join(save_dir, "checkpoint_last.pt")


def eval_lm(data, ckpt, caplog, *extra):
    args = [data, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "valid", "--cpu", "--num-workers", "0",
            "--no-progress-bar", "--max-tokens", "1024", *extra]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fairseq_cli.eval_lm"):
        result = fairseq_eval_lm(args)
    scored = int(re.search(r"Evaluated ([0-9,]+) tokens", caplog.text).group(1).replace(",", ""))
    return float(result["loss"]), scored


def hand_nonoverlap_loss(data, ckpt, length):
    """Blocks of `length` targets; each block's input starts with the token before it (eos for the first)."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
    model = models[0].eval()
    assert isinstance(model, AlibiLanguageModel)
    task.load_dataset("valid")
    lines = task.datasets["valid"].dataset.dataset  # the binarised lines, each ending in </s>
    stream = torch.cat([lines[i] for i in range(len(lines))])  # (N,)
    inputs = torch.cat([torch.tensor([task.dictionary.eos()]), stream[:-1]])  # (N,)
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(stream), length):
            x, y = inputs[start:start + length][None], stream[start:start + length][None]  # (1, L)
            lprobs = model.get_normalized_probs(model(x), log_probs=True)  # (1, L, V)
            nll -= lprobs.gather(-1, y[..., None]).sum().item()
    return nll / len(stream) / math.log(2), len(stream)


def test_train_short_evaluate_4x_longer_without_overrides(trained, caplog):
    data, ckpt = trained
    n = split_token_count(data, "valid")
    loss, scored = eval_lm(data, ckpt, caplog, "--tokens-per-sample", str(4 * TRAIN_L), "--context-window", "0")
    assert scored == n
    expected, count = hand_nonoverlap_loss(data, ckpt, 4 * TRAIN_L)
    assert count == n
    assert loss == pytest.approx(expected, rel=1e-4)


def test_chunked_attention_gives_the_identical_eval_lm_loss(trained, caplog, monkeypatch):
    """Issue 11: fairseq-eval-lm over 4x-long windows with the full-bias kernel (sdpa), the chunked kernel forced
    (16-row query blocks) and auto (chunked: no gradients, T > one chunk) gives the same loss, bit for bit."""
    import fairseq_ext.ops.alibi as alibi_ops

    data, ckpt = trained
    ran = []
    for name in ("sdpa", "chunked"):
        kernel = alibi_ops._KERNELS[name]
        monkeypatch.setitem(alibi_ops._KERNELS, name,
                            lambda *a, _name=name, _kernel=kernel, **kw: ran.append(_name) or _kernel(*a, **kw))
    losses = {}
    for label, overrides in [("sdpa", "{'attn_impl': 'sdpa'}"),
                             ("chunked", "{'attn_impl': 'chunked', 'alibi_chunk_size': 16}"),
                             ("auto", "{'alibi_chunk_size': 16}")]:
        ran.clear()
        losses[label], scored = eval_lm(data, ckpt, caplog, "--tokens-per-sample", str(4 * TRAIN_L),
                                        "--context-window", "0", "--model-overrides", overrides)
        assert scored == split_token_count(data, "valid")
        assert set(ran) == {"sdpa" if label == "sdpa" else "chunked"}, (label, set(ran))
    assert losses["chunked"] == losses["sdpa"] and losses["auto"] == losses["sdpa"], losses


def test_sliding_window_scores_every_target_once(trained, caplog):
    data, ckpt = trained
    n = split_token_count(data, "valid")
    for stride in (1, 8):  # sliding(L=4*TRAIN_L, S): --context-window L - S
        loss, scored = eval_lm(data, ckpt, caplog, "--tokens-per-sample", str(4 * TRAIN_L),
                               "--context-window", str(4 * TRAIN_L - stride))
        assert scored == n
        assert math.isfinite(loss)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    """Save a fairseq checkpoint of a key_index model (non-default cfg), reload through fairseq: same function."""
    from omegaconf import OmegaConf

    from tests.harness import tiny_dictionary, training_cfg

    d = tiny_dictionary(40)
    d.save(str(tmp_path / "dict.txt"))
    cfg = training_cfg("alibi_lm_tiny", ["--alibi-bias-form", "key_index", "--attn-impl", "naive"], data=str(tmp_path))
    from fairseq import models

    from tests.harness import _DictTask

    model = models.build_model(cfg.model, _DictTask(d)).eval()
    path = str(tmp_path / "checkpoint.pt")
    checkpoint_utils.torch_persistent_save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(),
                                            "optimizer_history": [{"num_updates": 0, "criterion_name": "x",
                                                                   "optimizer_name": "y",
                                                                   "lr_scheduler_state": {}}],
                                            "extra_state": {}}, path)
    loaded = checkpoint_utils.load_model_ensemble_and_task([path])[0][0].eval()
    attn = loaded.decoder.layers[0].self_attn
    assert (attn.positional.form, attn.attn_impl) == ("key_index", "naive")
    x = torch.randint(4, len(d), (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_fairseq_interactive_samples_with_the_alibi_model(trained):
    """The CLI generation path (incremental decoding + sampling) runs on a trained checkpoint."""
    import subprocess
    import sys

    data, ckpt = trained
    exe = os.path.join(os.path.dirname(sys.executable), "fairseq-interactive")
    proc = subprocess.run([exe, data, "--user-dir", USER_DIR, "--task", "language_modeling", "--path", ckpt,
                           "--sampling", "--sampling-topk", "5", "--beam", "1", "--min-len", "6", "--max-len-b", "12", "--cpu",
                           "--seed", "3"], input="w1 w2 w3\nw4\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hypos = [line.split("\t")[2].split() for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypos) == 2
    for prompt, hypo in zip((["w1", "w2", "w3"], ["w4"]), hypos):
        assert hypo[: len(prompt)] == prompt and len(hypo) >= 6  # the prompt, then the sampled continuation


def test_eval_recipe_script_runs_on_a_checkpoint(trained):
    """scripts/eval-alibi-wt103.sh end to end (sliding window) on the tiny trained model."""
    import subprocess
    import sys

    from tests.harness import REPO_ROOT

    data, ckpt = trained
    env = dict(os.environ, DATA=data, FAIRSEQ_EVAL_LM=os.path.join(os.path.dirname(sys.executable),
                                                                    "fairseq-eval-lm"))
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "eval-alibi-wt103.sh"), ckpt, "sliding",
                           str(4 * TRAIN_L), "8", "--cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"protocol: sliding(L={4 * TRAIN_L},S=8)" in proc.stdout
    assert re.search(r"Evaluated ([0-9,]+) tokens", proc.stderr).group(1).replace(",", "") == str(
        split_token_count(data, "valid"))


def test_eval_lm_result_does_not_depend_on_batch_size(trained, caplog):
    """nonoverlap and sliding scores are per-window: batching windows together must not change them."""
    data, ckpt = trained
    for window in ("0", str(4 * TRAIN_L - 8)):
        losses = [eval_lm(data, ckpt, caplog, "--tokens-per-sample", str(4 * TRAIN_L), "--context-window", window,
                          "--batch-size", bsz)[0] for bsz in ("1", "3", "16")]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
