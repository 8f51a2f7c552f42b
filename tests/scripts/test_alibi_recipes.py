"""The ALiBi paper recipes (scripts/train-alibi-wt103.sh, scripts/eval-alibi-wt103.sh) parse with fairseq's own
parsers and carry the paper's exact hyperparameters (shared/specs/alibi.md §3)."""
import os
import shlex
import subprocess

import pytest

from tests.harness import REPO_ROOT


def dry_run(script: str, *args: str, **env: str) -> list:
    out = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", script), *args],
                         env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True, check=True).stdout
    return shlex.split(out)[1:]  # drop the executable


def parse(parser_fn, argv):
    import fairseq_ext  # noqa: F401
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser_fn(), argv))


@pytest.mark.parametrize("length,max_tokens,update_freq", [(512, 9216, 1), (1024, 9216, 1), (3072, 3072, 3)])
def test_training_recipe_is_the_papers(length, max_tokens, update_freq):
    from fairseq import options

    cfg = parse(options.get_training_parser, dry_run("train-alibi-wt103.sh", str(length)))
    assert cfg.model._name == "alibi_lm_wiki103" and cfg.task._name == "language_modeling"
    assert cfg.task.tokens_per_sample == length and cfg.task.sample_break_mode == "none"
    assert (cfg.dataset.max_tokens, cfg.optimization.update_freq) == (max_tokens, [update_freq])
    assert cfg.dataset.required_batch_size_multiple == 1
    opt, sched = cfg.optimization, cfg.lr_scheduler
    assert (opt.max_update, opt.lr, opt.clip_norm, opt.stop_min_lr) == (286000, [1.0], 0.1, 1e-9)
    assert (cfg.optimizer._name, cfg.criterion._name, cfg.common.seed, cfg.common.fp16) == (
        "nag", "adaptive_loss", 1, True)
    assert (sched._name, sched.t_mult, sched.lr_period_updates, sched.lr_shrink, sched.min_lr) == (
        "cosine", 2, 270000, 0.75, 1e-4)
    assert (sched.warmup_updates, sched.warmup_init_lr) == (16000, 1e-7)
    assert cfg.distributed_training.ddp_backend == "legacy_ddp"


def test_training_recipe_passes_extra_flags_through():
    from fairseq import options

    cfg = parse(options.get_training_parser, dry_run("train-alibi-wt103.sh", "512", "--max-tokens", "4608",
                                                     "--update-freq", "2"))
    assert (cfg.dataset.max_tokens, cfg.optimization.update_freq) == (4608, [2])


@pytest.mark.parametrize("precision,fp16,bf16", [("fp16", True, False), ("bf16", False, True), ("fp32", False, False)])
def test_training_recipe_precision_can_be_overridden(precision, fp16, bf16):
    """The paper trains in fp16 (the default); PRECISION=bf16 or fp32 (CPU) runs the same recipe otherwise."""
    from fairseq import options

    cfg = parse(options.get_training_parser, dry_run("train-alibi-wt103.sh", "512", PRECISION=precision))
    assert (cfg.common.fp16, cfg.common.bf16) == (fp16, bf16) and cfg.optimizer._name == "nag"
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "train-alibi-wt103.sh"), "512"],
                          env=dict(os.environ, DRY_RUN="1", PRECISION="fp8"), capture_output=True, text=True)
    assert proc.returncode == 2 and "fp16 (the paper's), bf16, fp32" in proc.stderr


@pytest.mark.parametrize("protocol,extra,context", [("nonoverlap", [], 0), ("sliding", ["512"], 2560),
                                                    ("sliding", ["1"], 3071)])
def test_eval_recipe_protocols(protocol, extra, context):
    from fairseq import options

    cfg = parse(options.get_eval_lm_parser, dry_run("eval-alibi-wt103.sh", "ck.pt", protocol, "3072", *extra))
    assert cfg.task.tokens_per_sample == 3072 and cfg.eval_lm.context_window == context
    assert cfg.common_eval.model_overrides == "{}"  # no override dance


def test_eval_recipe_rejects_bad_protocol():
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "eval-alibi-wt103.sh"), "ck.pt", "strided",
                           "512"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
