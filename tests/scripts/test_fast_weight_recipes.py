"""The fast weight programmer recipes (scripts/{train,eval}-fast-weights-<config>.sh via scripts/lib/fast-weights.sh)
parse with fairseq's own parsers and carry the published flags of shared/specs/fast_weights.md §2 (lmtool-fwms
example scripts) and the evaluation protocols of §4; one slow test trains the tiny preset through the train recipe
and evaluates it under every protocol, each scoring every token of the split once."""
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Tuple

import pytest

from tests.harness import REPO_ROOT

CONFIGS = ["small-transformer", "small-fwm", "small-fwm-carry-over", "medium-transformer", "medium-fwm",
           "medium-fwm-carry-over", "medium-transformer-xl"]
# config: (arch, T, global batch, warmup, max_step, validation streams, state carried)   spec §2 table
TRAIN: Dict[str, Tuple[str, int, int, int, int, int, bool]] = {
    "small-transformer": ("fast_weight_wiki103_small_transformer", 256, 96, 2000, 500000, 10, False),
    "small-fwm": ("fast_weight_wiki103_small_fwm", 256, 96, 2000, 500000, 10, False),
    "small-fwm-carry-over": ("fast_weight_wiki103_small_fwm_carry_over", 256, 96, 2000, 500000, 10, True),
    "medium-transformer": ("fast_weight_wiki103_medium_transformer", 384, 56, 2000, 400000, 10, False),
    "medium-fwm": ("fast_weight_wiki103_medium_fwm", 384, 56, 2000, 400000, 10, False),
    "medium-fwm-carry-over": ("fast_weight_wiki103_medium_fwm_carry_over", 384, 56, 2000, 400000, 10, True),
    "medium-transformer-xl": ("transformer_xl_lm", 384, 56, 1000, 200000, 56, True),
}
# the fast_weight_lm presets' attention: (d_model, d_head, attn_type, update rule, normalisation, carry-over = no_pos)
MODEL = {
    "small-transformer": (128, 16, "softmax", None, None, False),
    "small-fwm": (128, 16, "linear", "delta", "output", False),
    "small-fwm-carry-over": (128, 16, "linear", "delta", "output", True),
    "medium-transformer": (256, 32, "softmax", None, None, False),
    "medium-fwm": (256, 32, "linear", "delta", "output", False),
    "medium-fwm-carry-over": (256, 32, "linear", "delta", "output", True),
}
DEFAULT_PROTOCOL = {c: ("stream" if TRAIN[c][-1] else "sliding") for c in CONFIGS}
NO_CARRY = "{'carry_over_fast_weight': False}"


def script(name: str) -> str:
    return os.path.join(REPO_ROOT, "scripts", name)


def run(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script(name), *args], env=dict(os.environ, **env), capture_output=True, text=True)


def dry_run(name: str, *args: str, **env: str) -> List[str]:
    """argv (without the executable) of a DRY_RUN=1 call."""
    out = run(name, *args, DRY_RUN="1", **env)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)[1:]


def parse(parser_fn, argv: List[str]):
    import fairseq_ext  # noqa: F401
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser_fn(), argv))


@pytest.mark.parametrize("ngpu", [1, 4])
@pytest.mark.parametrize("config", CONFIGS)
def test_training_recipes_carry_the_published_flags(config: str, ngpu: int) -> None:
    from fairseq import options

    arch, length, batch, warmup, max_step, valid_batch, carried = TRAIN[config]
    cfg = parse(options.get_training_parser, dry_run(f"train-fast-weights-{config}.sh", NGPU=str(ngpu)))
    # lmtool's ordered iterator for every config: B contiguous streams, consecutive segments per row
    assert cfg.model._name == arch and cfg.task._name == "streaming_lm" and cfg.criterion._name == "lm_loss"
    assert cfg.task.data == "data-bin/wikitext-103" and cfg.task.tokens_per_sample == length
    assert cfg.optimizer._name == "adam" and eval(cfg.optimizer.adam_betas) == (0.9, 0.999)
    assert (cfg.optimizer.adam_eps, cfg.optimizer.weight_decay) == (1e-8, 0.0)
    assert cfg.optimization.lr == [2.5e-4] and cfg.optimization.clip_norm == 0.25
    sched = cfg.lr_scheduler  # linear warmup, then CosineAnnealingLR(max_step, eta_min 0) at the absolute step
    assert (sched._name, sched.cosine_period, sched.warmup_updates, sched.min_lr) == (
        "cosine_warmup_xl", "total", warmup, 0.0)
    assert cfg.optimization.max_update == max_step and cfg.common.seed == 1111
    assert cfg.dataset.batch_size * ngpu == batch and cfg.distributed_training.distributed_world_size == ngpu
    assert cfg.dataset.batch_size_valid == valid_batch and cfg.optimization.update_freq == [1]
    assert cfg.dataset.validate_interval_updates == cfg.checkpoint.save_interval_updates == 4000
    assert cfg.checkpoint.save_dir == f"checkpoints/fast_weights_{config}" and cfg.task.train_stream_offset == "none"
    model = cfg.model
    assert (model.decoder_layers, model.decoder_attention_heads, model.decoder_ffn_embed_dim) == (16, 8, 2048)
    assert model.dropout == 0.1 and model.attention_dropout == 0.0 and not model.untie_adaptive_weights
    assert model.adaptive_softmax_cutoff == "20000,40000,200000" and model.adaptive_softmax_factor == 1
    if config == "medium-transformer-xl":  # explicit architecture flags of medium_transformer-xl_baseline.sh
        assert (model.decoder_embed_dim, model.decoder_attention_head_dim, model.mem_len) == (256, 32, 384)
        assert not model.decoder_normalize_before and not model.same_length
        return
    dim, head_dim, attn_type, rule, normalize, carry = MODEL[config]
    assert (model.decoder_embed_dim, model.decoder_attention_head_dim, model.attn_type) == (dim, head_dim, attn_type)
    if rule is not None:
        assert (model.update_rule, model.fwp_normalize) == (rule, normalize)
    assert model.carry_over_fast_weight == model.no_pos == carry == carried


def test_global_batch_must_split_over_workers() -> None:
    for config, ngpu in (("small-fwm", "5"), ("medium-fwm", "3"), ("medium-transformer-xl", "0")):
        out = run(f"train-fast-weights-{config}.sh", DRY_RUN="1", NGPU=ngpu)
        assert out.returncode != 0 and "NGPU" in out.stderr and not out.stdout


def test_arch_steps_and_length_can_be_overridden() -> None:
    from fairseq import options

    argv = dry_run("train-fast-weights-small-fwm.sh", NGPU="1", ARCH="fast_weight_tiny", STEPS="7", TGT_LEN="16")
    cfg = parse(options.get_training_parser, argv)
    assert cfg.model._name == "fast_weight_tiny" and cfg.model.decoder_embed_dim == 32
    assert cfg.optimization.max_update == 7 and cfg.task.tokens_per_sample == 16
    # another arch drops the medium Transformer-XL's explicit architecture flags
    argv = dry_run("train-fast-weights-medium-transformer-xl.sh", NGPU="1", ARCH="transformer_xl_tiny")
    assert "--mem-len" not in argv and parse(options.get_training_parser, argv).model.mem_len == 32
    out = run("train-fast-weights-small-fwm.sh", DRY_RUN="1", NGPU="1", TGT_LEN="0")
    assert out.returncode != 0 and "TGT_LEN" in out.stderr


def test_real_runs_check_the_data(tmp_path) -> None:
    out = run("train-fast-weights-small-fwm.sh", NGPU="1", DATA=str(tmp_path / "none"))
    assert out.returncode != 0 and "prepare-wikitext-103.sh" in out.stderr


def eval_cfg(config: str, **env: str):
    from fairseq import options

    return parse(options.get_eval_lm_parser, dry_run(f"eval-fast-weights-{config}.sh", "ck.pt", **env))


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_recipes_default_to_the_papers_protocol(config: str) -> None:
    length, carried = TRAIN[config][1], TRAIN[config][-1]
    cfg = eval_cfg(config)
    assert cfg.common_eval.path == "ck.pt" and cfg.dataset.gen_subset == "test" and cfg.dataset.batch_size == 1
    assert cfg.task.data == "data-bin/wikitext-103" and cfg.common_eval.model_overrides == "{}"
    if DEFAULT_PROTOCOL[config] == "sliding":  # eval_sliding_window.py: windows of L, stride 1, batch 1
        assert cfg.task._name == "language_modeling" and cfg.task.sample_break_mode == "none"
        assert cfg.task.tokens_per_sample == length and cfg.eval_lm.context_window == length - 1
        assert cfg.dataset.num_workers == 0  # LMContextWindowDataset carries the context in its collater
    else:  # eval.py --carry_over_fast_weight --batch_size 1 (and the TXL baseline's eval.py, batch 1)
        assert carried and cfg.task._name == "streaming_lm" and cfg.task.tokens_per_sample == length
        assert cfg.task.eval_warmup_tokens == 0 and cfg.eval_lm.context_window == 0


@pytest.mark.parametrize("config", ["small-fwm", "medium-fwm-carry-over"])
def test_eval_protocols_can_be_switched(config: str) -> None:
    length, carried = TRAIN[config][1], TRAIN[config][-1]
    overrides = NO_CARRY if carried else "{}"
    sliding = eval_cfg(config, PROTOCOL="sliding", BATCH="8", SPLIT="valid")
    assert sliding.task._name == "language_modeling" and sliding.eval_lm.context_window == length - 1
    assert sliding.dataset.batch_size == 8 and sliding.dataset.gen_subset == "valid"
    assert sliding.common_eval.model_overrides == overrides  # carry-over models: each window from a fresh state
    nonoverlap = eval_cfg(config, PROTOCOL="nonoverlap", BATCH="4")
    assert nonoverlap.task._name == "language_modeling" and nonoverlap.eval_lm.context_window == 0
    assert nonoverlap.task.tokens_per_sample == length and nonoverlap.dataset.batch_size == 4
    assert nonoverlap.common_eval.model_overrides == overrides
    stream = eval_cfg(config, PROTOCOL="stream", BATCH="4")  # always one stream
    assert stream.task._name == "streaming_lm" and stream.dataset.batch_size == 1
    assert stream.common_eval.model_overrides == "{}"
    out = run(f"eval-fast-weights-{config}.sh", "ck.pt", DRY_RUN="1", PROTOCOL="cold")
    assert out.returncode != 0 and "PROTOCOL must be one of" in out.stderr


def test_transformer_xl_baseline_is_evaluated_by_streaming_only() -> None:
    out = run("eval-fast-weights-medium-transformer-xl.sh", "ck.pt", DRY_RUN="1", PROTOCOL="sliding")
    assert out.returncode != 0 and "PROTOCOL must be one of: stream" in out.stderr


# ======================================================================================================================
# end to end on tiny data
# ======================================================================================================================


def evaluated(proc: subprocess.CompletedProcess) -> Tuple[int, float]:
    text = proc.stdout + proc.stderr
    scored = int(re.search(r"Evaluated ([0-9,]+) tokens", text).group(1).replace(",", ""))
    return scored, float(re.search(r"Loss \(base 2\): ([0-9.]+)", text).group(1))


@pytest.mark.slow
def test_train_then_evaluate_under_every_protocol(tmp_path) -> None:
    """fast_weight_tiny through the small-fwm and small-fwm-carry-over train recipes (3 updates each, T = 8; init std
    0.5 so that the fast weights matter), then the eval recipes: sliding, nonoverlap and stream all score every token
    of the split exactly once; without carry-over, stream(B=1) is nonoverlap(B=1) exactly; with it, the stream
    differs from fresh blocks and does not depend on the segment length (the state carries the whole past)."""
    from tests.harness import fairseq_preprocess, random_corpus, split_token_count

    raw = tmp_path / "raw"
    raw.mkdir()
    data = fairseq_preprocess(str(tmp_path / "bin"), trainpref=random_corpus(str(raw / "train.txt"), 120, seed=40),
                              validpref=random_corpus(str(raw / "valid.txt"), 20, seed=41))
    tokens = split_token_count(data, "valid")
    bindir = os.path.dirname(sys.executable)
    env = dict(ARCH="fast_weight_tiny", STEPS="3", NGPU="1", DATA=data, TGT_LEN="8", OMP_NUM_THREADS="1",
               FAIRSEQ_TRAIN=os.path.join(bindir, "fairseq-train"),
               FAIRSEQ_EVAL_LM=os.path.join(bindir, "fairseq-eval-lm"))
    extra = ["--cpu", "--num-workers", "0", "--batch-size", "4", "--disable-validation", "--log-format", "simple",
             "--no-progress-bar", "--init-std", "0.5"]
    results = {}
    for config, flags in (("small-fwm", []), ("small-fwm-carry-over", ["--carry-over-fast-weight", "--no-pos"])):
        save_dir = tmp_path / config
        out = run(f"train-fast-weights-{config}.sh", *extra, *flags, SAVE_DIR=str(save_dir), **env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        carried = "state carried across segments" if flags else "every segment from a fresh state"
        assert f"recipe: {config} (fast_weight_tiny), global batch 96 = 1 workers x 96 streams, T=8, {carried}" in (
            out.stdout)
        assert re.search(r"num_updates 3\b", out.stdout + out.stderr)
        protocols = (("nonoverlap", "1"), ("stream", "1")) if flags else (("sliding", "3"), ("nonoverlap", "1"),
                                                                           ("stream", "1"))
        for protocol, batch in protocols:
            proc = run(f"eval-fast-weights-{config}.sh", str(save_dir / "checkpoint_last.pt"), "--cpu",
                       "--no-progress-bar", SPLIT="valid", PROTOCOL=protocol, BATCH=batch, **env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            label = {"sliding": "protocol: sliding(L=8,S=1), batch 3", "nonoverlap": "protocol: nonoverlap(L=8), batch 1",
                     "stream": "protocol: stream(B=1, T=8, cold)"}[protocol]
            assert label in proc.stdout
            scored, loss = evaluated(proc)
            assert scored == tokens, (config, protocol)  # every target of the split, once
            results[config, protocol] = loss
    # a stateless model: one stream of fresh segments == independent blocks (same blocks, same positions)
    assert results["small-fwm", "stream"] == pytest.approx(results["small-fwm", "nonoverlap"], abs=1e-4)
    assert results["small-fwm", "sliding"] != pytest.approx(results["small-fwm", "nonoverlap"], abs=1e-4)
    # batched sliding windows (the first ones end-padded) == one window at a time
    proc = run("eval-fast-weights-small-fwm.sh", str(tmp_path / "small-fwm" / "checkpoint_last.pt"), "--cpu",
               "--no-progress-bar", SPLIT="valid", PROTOCOL="sliding", BATCH="1", **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert evaluated(proc) == (tokens, pytest.approx(results["small-fwm", "sliding"], abs=1e-5))
    # the carry-over model's stream continues its fast weights: not the fresh-block numbers
    carried = results["small-fwm-carry-over", "stream"]
    assert carried != pytest.approx(results["small-fwm-carry-over", "nonoverlap"], abs=1e-2)
    proc = run("eval-fast-weights-small-fwm-carry-over.sh", str(tmp_path / "small-fwm-carry-over" / "checkpoint_last.pt"),
               "--cpu", "--no-progress-bar", SPLIT="valid", **{**env, "TGT_LEN": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "protocol: stream(B=1, T=3, cold), state carried across segments" in proc.stdout
    assert evaluated(proc) == (tokens, pytest.approx(carried, abs=1e-4))
