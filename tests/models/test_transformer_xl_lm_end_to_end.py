"""The Transformer-XL user flow in process on a generated corpus: fairseq-preprocess -> fairseq-train --task
streaming_lm --arch transformer_xl_tiny (memory carried across batches) -> fairseq-eval-lm streaming with
evaluation-time tgt_len / mem_len / clamp_len / same_length, checked against a hand computation; checkpoint
round trip; generation through fairseq-interactive."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils
from omegaconf import OmegaConf

from fairseq_ext.models.transformer_xl_lm import TransformerXLLanguageModel
from tests.harness import USER_DIR, fairseq_eval_lm, streaming_eval_lm, fairseq_preprocess, fairseq_train, random_corpus, split_token_count
from tests.harness import whole_stream_loss as harness_whole_stream_loss

pytestmark = pytest.mark.slow
TRAIN_T = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    raw = tmp_path_factory.mktemp("txl-raw")
    data = fairseq_preprocess(str(tmp_path_factory.mktemp("txl-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 120, seed=20),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 100, seed=21))
    save_dir = str(tmp_path_factory.mktemp("txl-ckpt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fairseq_train([data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "transformer_xl_tiny",
                   "--tokens-per-sample", str(TRAIN_T), "--batch-size", "4", "--mem-len", "12",
                   "--adaptive-softmax-cutoff", "10,16", "--adaptive-softmax-factor", "2", "--dropout", "0.1",
                   "--max-update", "8", "--optimizer", "adam", "--lr", "0.003", "--criterion", "lm_loss",
                   "--save-dir", save_dir, "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1",
                   "--no-progress-bar", "--log-format", "simple"])
    torch.set_num_threads(threads)
    return data, os.path.join(save_dir, "checkpoint_last.pt")


def whole_stream_loss(data, ckpt, num_streams):
    """Bits/token when each of the B streams is read in ONE forward pass (full causal context)."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
    model = models[0].eval()
    assert isinstance(model, TransformerXLLanguageModel)
    return harness_whole_stream_loss(model, task.dictionary, data, num_streams)


def test_streaming_eval_with_long_memory_equals_reading_each_stream_at_once(trained, caplog):
    """Segment recurrence end to end: eval-time T=8 and mem_len >= stream length reproduce one pass per stream."""
    data, ckpt = trained
    n = split_token_count(data, "valid")
    loss, scored, log = streaming_eval_lm(data, ckpt, caplog, "--batch-size", "3", "--tokens-per-sample", "8",
                                "--model-overrides", "{'mem_len': 100000}")
    assert scored == n
    assert "stream(B=3, T=8" in log
    assert loss == pytest.approx(whole_stream_loss(data, ckpt, 3), rel=1e-5)


def test_eval_time_overrides_change_the_protocol(trained, caplog):
    data, ckpt = trained
    n = split_token_count(data, "valid")
    results = {}
    for name, overrides in {"train": "{}", "no-memory": "{'mem_len': 0}",
                            "eval.py-like": "{'mem_len': 40, 'clamp_len': 20, 'same_length': True}"}.items():
        loss, scored, _ = streaming_eval_lm(data, ckpt, caplog, "--batch-size", "2", "--tokens-per-sample", "6",
                                  "--model-overrides", overrides)
        assert scored == n and math.isfinite(loss)
        results[name] = loss
    assert len(set(results.values())) == 3, results


def test_context_window_is_rejected_with_the_fix(trained, caplog):
    data, ckpt = trained
    with pytest.raises(ValueError, match="streaming"):
        streaming_eval_lm(data, ckpt, caplog, "--batch-size", "2", "--tokens-per-sample", "8", "--context-window", "4")


def test_memory_model_outside_streaming_lm_is_a_clear_error(trained, caplog):
    """fairseq-eval-lm with fairseq's language_modeling task batches unrelated blocks: carrying memory across them
    would be a silently wrong number, so the second batch raises and names the fix; without memory it runs."""
    data, ckpt = trained
    args = [data, "--user-dir", USER_DIR, "--path", ckpt, "--task", "language_modeling", "--gen-subset", "valid",
            "--cpu", "--num-workers", "0", "--no-progress-bar", "--tokens-per-sample", "8", "--batch-size", "2",
            "--sample-break-mode", "none"]
    with pytest.raises(RuntimeError, match="--task streaming_lm"):
        fairseq_eval_lm(args)
    result = fairseq_eval_lm(args + ["--model-overrides", "{'mem_len': 0}"])  # stateless: nonoverlap(8) is valid
    assert math.isfinite(float(result["loss"]))


def test_checkpoint_reload_gives_identical_logits(trained):
    data, ckpt = trained
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
    model = models[0].eval()
    path = ckpt + ".copy.pt"
    state = checkpoint_utils.load_checkpoint_to_cpu(ckpt)
    state["cfg"] = OmegaConf.to_container(state["cfg"])  # plain containers: loadable with weights_only
    checkpoint_utils.torch_persistent_save(state, path)
    again = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})[0][0].eval()
    x = torch.randint(4, 24, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = again(x)
    assert torch.equal(model.get_normalized_probs((a, {}), True), again.get_normalized_probs((b, {}), True))
    emb, sm = again.decoder.embed_tokens, again.decoder.adaptive_softmax
    assert sm.weights["1"] is emb.emb_layers[1].weight  # ties survive the checkpoint


def test_fairseq_interactive_generates_with_memory(trained):
    data, ckpt = trained
    exe = os.path.join(os.path.dirname(sys.executable), "fairseq-interactive")
    proc = subprocess.run([exe, data, "--user-dir", USER_DIR, "--task", "language_modeling", "--path", ckpt,
                           "--sampling", "--sampling-topk", "5", "--beam", "1", "--min-len", "20", "--max-len-b", "30",
                           "--cpu", "--seed", "3"], input="w1 w2 w3\nw4\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hypos = [line.split("\t")[2].split() for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypos) == 2
    for prompt, hypo in zip((["w1", "w2", "w3"], ["w4"]), hypos):
        assert hypo[:len(prompt)] == prompt and len(hypo) >= 20  # crosses several segments of T=12


@pytest.mark.parametrize("protocol", ["cold", "warmup"])
def test_eval_recipe_script_runs_on_a_checkpoint(trained, protocol):
    """scripts/eval-transformer-xl-wt103-nvidia-base.sh end to end (eval.py settings 64/640/400, same_length) on
    the tiny checkpoint: both protocols score every token of the split once."""
    from tests.harness import REPO_ROOT

    data, ckpt = trained
    env = dict(os.environ, DATA=data, SPLIT="valid", BATCH="2", PROTOCOL=protocol,
               FAIRSEQ_EVAL_LM=os.path.join(os.path.dirname(sys.executable), "fairseq-eval-lm"))
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "eval-transformer-xl-wt103-nvidia-base.sh"),
                           ckpt, "--cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"protocol: stream(B=2, T=64, M=640, clamp=400, same_length, {protocol})" in proc.stdout
    scored = re.search(r"Evaluated ([0-9,]+) tokens", proc.stderr).group(1).replace(",", "")
    assert int(scored) == split_token_count(data, "valid")


def test_resume_mid_epoch_continues_the_training_memory_exactly(trained, tmp_path):
    """3 updates, stop, resume to 6 == 6 uninterrupted updates, bit for bit: the checkpoint carries the training
    streams' memory (fairseq seeds dropout per update). Without the saved memory the resumed run differs."""
    import shutil

    data, _ = trained
    common = [data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "transformer_xl_tiny",
              "--tokens-per-sample", "12", "--batch-size", "4", "--mem-len", "12", "--dropout", "0.1",
              "--optimizer", "adam", "--lr", "0.003", "--criterion", "lm_loss", "--no-epoch-checkpoints", "--cpu",
              "--num-workers", "0", "--seed", "1", "--no-progress-bar", "--disable-validation"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_train(common + ["--max-update", "6", "--save-dir", str(tmp_path / "full")])
        fairseq_train(common + ["--max-update", "3", "--save-dir", str(tmp_path / "split")])
        shutil.copytree(tmp_path / "split", tmp_path / "cold")
        state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "cold" / "checkpoint_last.pt"))
        assert state["model"]["decoder._extra_state"]["train_segments"] == 3
        state["model"]["decoder._extra_state"] = None  # as if the memory had not been saved
        state["cfg"] = OmegaConf.to_container(state["cfg"])
        checkpoint_utils.torch_persistent_save(state, str(tmp_path / "cold" / "checkpoint_last.pt"))
        for name in ("split", "cold"):
            fairseq_train(common + ["--max-update", "6", "--save-dir", str(tmp_path / name)])
    finally:
        torch.set_num_threads(threads)

    def weights(name):
        return checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / name / "checkpoint_last.pt"))["model"]

    full, split, cold = weights("full"), weights("split"), weights("cold")
    tensors = [k for k, v in full.items() if torch.is_tensor(v)]
    assert all(torch.equal(full[k], split[k]) for k in tensors)
    assert not all(torch.equal(full[k], cold[k]) for k in tensors)
