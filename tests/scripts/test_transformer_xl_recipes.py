"""The Transformer-XL recipes (scripts/{train,eval}-transformer-xl-<config>.sh via scripts/lib/transformer-xl.sh)
parse with fairseq's own parsers and carry the published hyperparameters (shared/specs/transformer_xl.md §5)."""
import os
import shlex
import subprocess

import pytest

from tests.harness import REPO_ROOT

CONFIGS = ["wt103-base", "wt103-large", "enwik8-base", "enwik8-large", "text8-base", "text8-large",
           "wt103-nvidia-base", "wt103-nvidia-large"]
# config: (arch, optimizer, lr, cosine period, warmup, min_lr, max_update, T = M, global batch)   spec §5.1 / §5.2
TRAIN = {
    "wt103-base": ("transformer_xl_wiki103_base", "adam", 2.5e-4, "total", 0, 0.0, 200000, 150, 60),
    "wt103-large": ("transformer_xl_wiki103_large", "adam", 2.5e-4, "total", 16000, 0.0, 4000000, 384, 128),
    "enwik8-base": ("transformer_xl_enwik8_base", "adam", 2.5e-4, "total", 0, 0.0, 400000, 512, 22),
    "enwik8-large": ("transformer_xl_enwik8_large", "adam", 2.5e-4, "total", 4000, 0.0, 400000, 768, 64),
    "text8-base": ("transformer_xl_text8_base", "adam", 2.5e-4, "total", 0, 0.0, 400000, 512, 22),
    "text8-large": ("transformer_xl_text8_large", "adam", 2.5e-4, "total", 0, 0.0, 400000, 768, 64),
    "wt103-nvidia-base": ("transformer_xl_wiki103_nvidia_base", "lamb_torch", 0.01, "after_warmup", 1000, 1e-3,
                          40000, 192, 256),
    "wt103-nvidia-large": ("transformer_xl_wiki103_nvidia_large", "lamb_torch", 0.01, "after_warmup", 16000, 1e-4,
                           100000, 384, 128),
}
# config: (T, M, clamp, batch, warm-up tokens)   spec §5.1 eval.py table, §5.2 / §8.2 NVIDIA
EVAL = {
    "wt103-base": (64, 640, 400, 10, 0), "wt103-large": (128, 1600, 1000, 10, 0),
    "enwik8-base": (80, 2100, 820, 10, 0), "enwik8-large": (128, 3800, 1000, 10, 0),
    "text8-base": (80, 2100, 820, 10, 0), "text8-large": (128, 3800, 1000, 10, 0),
    "wt103-nvidia-base": (64, 640, 400, 16, 640), "wt103-nvidia-large": (128, 1600, 1000, 16, 1600),
}


def dry_run(script, *args, **env):
    out = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", script), *args],
                         env=dict(os.environ, DRY_RUN="1", **env), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)[1:]  # drop the executable


def parse(parser_fn, argv):
    import fairseq_ext  # noqa: F401
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser_fn(), argv))


@pytest.mark.parametrize("config", CONFIGS)
def test_training_recipes_carry_the_published_flags(config):
    from fairseq import options

    arch, optimizer, lr, period, warmup, min_lr, max_update, length, batch = TRAIN[config]
    cfg = parse(options.get_training_parser, dry_run(f"train-transformer-xl-{config}.sh", NGPU="2"))
    assert cfg.model._name == arch and cfg.task._name == "streaming_lm" and cfg.criterion._name == "lm_loss"
    assert cfg.optimizer._name == optimizer and cfg.optimization.lr == [lr] and cfg.optimization.clip_norm == 0.25
    sched = cfg.lr_scheduler
    assert (sched._name, sched.cosine_period, sched.warmup_updates, sched.min_lr) == (
        "cosine_warmup_xl", period, warmup, min_lr)
    assert cfg.optimization.max_update == max_update
    assert cfg.task.tokens_per_sample == length and cfg.model.mem_len == length
    assert cfg.dataset.batch_size * cfg.distributed_training.distributed_world_size == batch
    if optimizer == "lamb_torch":
        assert (cfg.optimizer.weight_decay, cfg.optimizer.min_trust) == (0.0, 0.0)


def test_global_batch_must_split_over_workers():
    out = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "train-transformer-xl-wt103-base.sh")],
                         env=dict(os.environ, DRY_RUN="1", NGPU="7"), capture_output=True, text=True)
    assert out.returncode != 0 and "NGPU" in out.stderr


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_recipes_use_the_published_eval_settings(config):
    from fairseq import options

    length, mem, clamp, batch, warmup = EVAL[config]
    cfg = parse(options.get_eval_lm_parser, dry_run(f"eval-transformer-xl-{config}.sh", "ck.pt"))
    assert cfg.task._name == "streaming_lm" and cfg.task.tokens_per_sample == length
    assert cfg.dataset.batch_size == batch and cfg.task.eval_warmup_tokens == warmup
    assert eval(cfg.common_eval.model_overrides) == {"mem_len": mem, "clamp_len": clamp, "same_length": True}
    assert cfg.dataset.gen_subset == "test"


def test_eval_protocol_can_be_switched():
    from fairseq import options

    cfg = parse(options.get_eval_lm_parser, dry_run("eval-transformer-xl-wt103-base.sh", "ck.pt", PROTOCOL="warmup",
                                                    BATCH="16"))
    assert cfg.task.eval_warmup_tokens == 640 and cfg.dataset.batch_size == 16
