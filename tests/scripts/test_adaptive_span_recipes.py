"""The adaptive-span / all-attention recipes (scripts/{train,eval}-adaptive-span-<config>.sh via
scripts/lib/adaptive-span.sh) parse with fairseq's own parsers and carry the published optimisation flags of
shared/specs/adaptive_span.md §3, including the fine-tune phase at lr/10; one slow test runs the two-phase flow."""
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT

CONFIGS = ["enwik8-small", "enwik8", "enwik8-large", "text8", "text8-large", "enwik8-pers-small", "enwik8-pers",
           "wt103-pers"]
# config: (arch, data, optimizer, lr, warmup, block M, batch split k, steps, fine-tune steps)   spec §3 table
TRAIN = {
    "enwik8-small": ("adaptive_span_enwik8_small", "enwik8", "adagrad_clip", 0.07, 8000, 256, 1, 150000, 0),
    "enwik8": ("adaptive_span_enwik8", "enwik8", "adagrad_clip", 0.07, 32000, 512, 1, 600000, 0),
    "enwik8-large": ("adaptive_span_enwik8_large", "enwik8", "adagrad_clip", 0.07, 32000, 512, 2, 150000, 20000),
    "text8": ("adaptive_span_text8", "text8", "adagrad_clip", 0.07, 32000, 512, 1, 900000, 0),
    "text8-large": ("adaptive_span_text8_large", "text8", "adagrad_clip", 0.07, 32000, 512, 2, 250000, 20000),
    "enwik8-pers-small": ("all_attention_enwik8_small", "enwik8", "adagrad_clip", 0.07, 32000, 512, 2, 450000,
                          30000),
    "enwik8-pers": ("all_attention_enwik8", "enwik8", "adagrad_clip", 0.07, 32000, 512, 2, 200000, 10000),
    "wt103-pers": ("all_attention_wiki103", "wikitext-103", "adam", 2.5e-4, 8000, 256, 2, 800000, 50000),
}
FINE_TUNE_LR = {"adagrad_clip": 0.007, "adam": 2.5e-5}  # the table's "@0.007" / "@2.5e-5": lr / 10
FINE_TUNED = [c for c in CONFIGS if TRAIN[c][-1]]


def script(name):
    return os.path.join(REPO_ROOT, "scripts", name)


def run(name, *args, **env):
    return subprocess.run(["bash", script(name), *args], env=dict(os.environ, **env), capture_output=True, text=True)


def dry_run(name, *args, **env):
    """[(phase label, argv without the executable)] of a DRY_RUN=1 call (eval: one command, label None)."""
    out = run(name, *args, DRY_RUN="1", **env)
    assert out.returncode == 0, out.stderr
    commands, label = [], None
    for line in out.stdout.splitlines():
        if line.startswith("# "):
            label = line[2:]
        elif line.strip():
            commands.append((label, shlex.split(line)[1:]))
            label = None
    return commands


def parse(parser_fn, argv):
    import fairseq_ext  # noqa: F401
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser_fn(), argv))


def flag(argv, name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last occurrence wins, as in argparse


@pytest.mark.parametrize("ngpu", [1, 8])
@pytest.mark.parametrize("config", CONFIGS)
def test_training_recipes_carry_the_published_flags(config, ngpu):
    from fairseq import options

    arch, data, optimizer, lr, warmup, block, split, steps, fine_tune = TRAIN[config]
    phases = dry_run(f"train-adaptive-span-{config}.sh", NGPU=str(ngpu))
    assert [label.split(":")[0] for label, _ in phases] == ["phase main"] + ["phase finetune"] * bool(fine_tune)
    for (label, argv), (phase_lr, total) in zip(phases, [(lr, steps), (FINE_TUNE_LR[optimizer], steps + fine_tune)]):
        cfg = parse(options.get_training_parser, argv)
        assert cfg.model._name == arch and cfg.task._name == "streaming_lm" and cfg.criterion._name == "lm_loss"
        assert cfg.task.data == f"data-bin/{data}"
        assert cfg.optimizer._name == optimizer and cfg.optimization.lr == [phase_lr]
        if optimizer == "adagrad_clip":  # per-tensor step clipping, never fairseq's global clip
            assert cfg.optimizer.adagrad_clip == 0.03 and cfg.optimization.clip_norm == 0.0
            assert cfg.optimizer.weight_decay == 0.0 and cfg.common.fp16_no_flatten_grads
        else:  # torch Adam defaults, global clip 1.0
            assert cfg.optimization.clip_norm == 1.0 and eval(cfg.optimizer.adam_betas) == (0.9, 0.999)
            assert (cfg.optimizer.adam_eps, cfg.optimizer.weight_decay) == (1e-8, 0.0)
        assert (cfg.lr_scheduler._name, cfg.lr_scheduler.warmup_updates) == ("fixed", warmup)
        assert cfg.optimization.max_update == total and f"up to update {total}" in label
        assert cfg.task.tokens_per_sample == block
        assert cfg.dataset.batch_size == 64 // ngpu and cfg.distributed_training.distributed_world_size == ngpu
        assert cfg.task.batch_split == split and cfg.task.train_stream_offset == "random"
        assert cfg.dataset.batch_size_valid == 8 and cfg.optimization.update_freq == [1]
        assert cfg.checkpoint.save_dir == f"checkpoints/adaptive_span_{config}" and cfg.checkpoint.no_epoch_checkpoints
        assert cfg.checkpoint.save_interval_updates == cfg.dataset.validate_interval_updates > 0
        # the architecture comes from the preset only
        assert not {"--attn-span", "--adapt-span-loss", "--dropout", "--pers-mem-size"} & set(argv)


@pytest.mark.parametrize("config", FINE_TUNED)
def test_fine_tune_phase_is_the_main_run_at_lr_over_10_resumed_to_the_total(config):
    _, _, optimizer, lr, _, _, _, steps, fine_tune = TRAIN[config]
    (_, main), (label, tune) = dry_run(f"train-adaptive-span-{config}.sh", NGPU="8")
    assert float(flag(tune, "--lr")) == FINE_TUNE_LR[optimizer] == pytest.approx(lr / 10, rel=1e-12)
    assert int(flag(tune, "--max-update")) == steps + fine_tune and f"lr {flag(tune, '--lr')}" in label
    differ = [i for i, (a, b) in enumerate(zip(main, tune)) if a != b]  # same save dir, seed, flags: resumes
    assert len(main) == len(tune) and [main[i - 1] for i in differ] == ["--lr", "--max-update"]


def test_phase_selects_one_phase():
    def phases(**env):
        return [(label.split(":")[0], int(flag(argv, "--max-update")), float(flag(argv, "--lr")))
                for label, argv in dry_run("train-adaptive-span-enwik8-pers.sh", NGPU="8", **env)]

    assert phases() == phases(PHASE="all") == [("phase main", 200000, 0.07), ("phase finetune", 210000, 0.007)]
    assert phases(PHASE="main") == [("phase main", 200000, 0.07)]
    assert phases(PHASE="finetune") == [("phase finetune", 210000, 0.007)]
    assert [p for p, _, _ in phases(PHASE="all", STEPS="5", FINETUNE_STEPS="2", LR="0.5")] == [
        "phase main", "phase finetune"]
    assert phases(STEPS="5", FINETUNE_STEPS="2", LR="0.5") == [("phase main", 5, 0.5), ("phase finetune", 7, 0.05)]
    only = dry_run("train-adaptive-span-text8.sh", NGPU="8")
    assert len(only) == 1 and only == dry_run("train-adaptive-span-text8.sh", NGPU="8", PHASE="main")
    out = run("train-adaptive-span-text8.sh", DRY_RUN="1", NGPU="8", PHASE="finetune")
    assert out.returncode != 0 and "no fine-tune phase" in out.stderr
    out = run("train-adaptive-span-enwik8.sh", DRY_RUN="1", NGPU="8", PHASE="both")
    assert out.returncode != 0 and "PHASE must be all, main or finetune" in out.stderr


def test_arch_can_be_overridden():
    (_, argv), = dry_run("train-adaptive-span-enwik8.sh", NGPU="1", ARCH="adaptive_span_tiny")
    assert flag(argv, "--arch") == "adaptive_span_tiny"


@pytest.mark.parametrize("ngpu", ["3", "7", "0", "x"])
def test_global_batch_must_split_over_workers(ngpu):
    out = run("train-adaptive-span-enwik8.sh", DRY_RUN="1", NGPU=ngpu)
    assert out.returncode != 0 and "NGPU" in out.stderr and not out.stdout


def test_per_worker_batch_must_split_into_the_row_groups():
    assert dry_run("train-adaptive-span-enwik8-small.sh", NGPU="64")  # k = 1: one stream per worker is fine
    out = run("train-adaptive-span-enwik8-large.sh", DRY_RUN="1", NGPU="64")
    assert out.returncode != 0 and "--batch-split 2" in out.stderr


def test_real_runs_check_data_and_the_main_phase_first(tmp_path):
    out = run("train-adaptive-span-enwik8.sh", NGPU="1", DATA=str(tmp_path / "none"))
    assert out.returncode != 0 and "prepare-" in out.stderr
    (tmp_path / "dict.txt").write_text("a 1\n")
    out = run("train-adaptive-span-enwik8-large.sh", NGPU="1", DATA=str(tmp_path), SAVE_DIR=str(tmp_path / "ck"),
              PHASE="finetune")
    assert out.returncode != 0 and "PHASE=main first" in out.stderr and "at update 0" in out.stderr


@pytest.mark.parametrize("config", CONFIGS)
def test_eval_recipes_use_the_original_full_evaluation(config):
    from fairseq import options

    (_, argv), = dry_run(f"eval-adaptive-span-{config}.sh", "ck.pt")
    cfg = parse(options.get_eval_lm_parser, argv)
    assert cfg.task._name == "streaming_lm" and cfg.task.tokens_per_sample == TRAIN[config][5]
    assert cfg.task.data == f"data-bin/{TRAIN[config][1]}" and cfg.common_eval.path == "ck.pt"
    assert cfg.dataset.batch_size == 8 and cfg.task.eval_warmup_tokens == 0 and cfg.dataset.gen_subset == "test"
    assert cfg.common_eval.model_overrides == "{}"  # the training arguments, as the original's --full-eval-mode


def test_eval_split_and_batch_can_be_switched():
    from fairseq import options

    (_, argv), = dry_run("eval-adaptive-span-text8.sh", "ck.pt", "--cpu", SPLIT="valid", BATCH="16")
    cfg = parse(options.get_eval_lm_parser, argv)
    assert cfg.dataset.gen_subset == "valid" and cfg.dataset.batch_size == 16 and cfg.common.cpu


# ======================================================================================================================
# end to end: the two-phase flow on tiny data
# ======================================================================================================================


def logged_lrs(stdout):
    """{update: lr} from fairseq's train_inner lines (--log-interval 1): the rate set after that update."""
    return {int(re.search(r"num_updates=(\d+)", line).group(1)): float(re.search(r"\blr=([0-9.e+-]+)", line).group(1))
            for line in stdout.splitlines() if "train_inner" in line and "num_updates=" in line}


@pytest.mark.slow
def test_two_phase_run_resumes_with_the_optimizer_state_at_lr_over_10(tmp_path):
    """enwik8-large's recipe with the tiny preset: 3 updates at lr, then 3 more at lr/10 resumed from the same
    checkpoint. The update counter, the warmup position and the Adagrad accumulators continue; a re-run skips both
    finished phases instead of adding an update."""
    import torch
    from fairseq import checkpoint_utils

    import fairseq_ext  # noqa: F401  (registers streaming_lm and adaptive_span_lm for the in-process model load)
    from tests.harness import fairseq_preprocess, random_corpus, split_token_count

    raw = tmp_path / "raw"
    raw.mkdir()
    data = fairseq_preprocess(str(tmp_path / "bin"), trainpref=random_corpus(str(raw / "train.txt"), 120, seed=30),
                              validpref=random_corpus(str(raw / "valid.txt"), 20, seed=31))
    save_dir = tmp_path / "ck"
    bindir = os.path.dirname(sys.executable)
    env = dict(ARCH="adaptive_span_tiny", STEPS="3", FINETUNE_STEPS="3", NGPU="1", DATA=data, SAVE_DIR=str(save_dir),
               FAIRSEQ_TRAIN=os.path.join(bindir, "fairseq-train"), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    warmup = 10  # both phases inside the warmup: the resumed rate must continue it, not restart it
    extra = ["--cpu", "--num-workers", "0", "--tokens-per-sample", "8", "--batch-size", "4", "--warmup-updates",
             str(warmup), "--save-interval-updates", "1", "--keep-interval-updates", "-1", "--disable-validation",
             "--log-interval", "1", "--log-format", "simple", "--no-progress-bar"]
    out = run("train-adaptive-span-enwik8-large.sh", *extra, **env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "phase main: enwik8-large (adaptive_span_tiny) lr 0.07 up to update 3 (resuming from update 0)" in out.stdout
    assert "phase finetune: enwik8-large (adaptive_span_tiny) lr 0.007 up to update 6 (resuming from update 3)" in (
        out.stdout)
    assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt \(epoch 1 @ 3 updates\)", out.stdout + out.stderr)
    lrs = logged_lrs(out.stdout)
    assert sorted(lrs) == [1, 2, 3, 4, 5, 6]
    for n, lr in lrs.items():  # fixed: after update n the rate is base * (n + 1) / W
        assert lr == pytest.approx((0.07 if n <= 3 else 0.007) * (n + 1) / warmup, rel=1e-4), (n, lrs)

    def state(n):
        (path,) = glob.glob(str(save_dir / f"checkpoint_*_{n}.pt"))
        return checkpoint_utils.load_checkpoint_to_cpu(path)

    first, second = state(3), state(6)
    assert first["optimizer_history"][-1]["num_updates"] == 3 and second["optimizer_history"][-1]["num_updates"] == 6
    assert first["optimizer_history"][-1]["lr_scheduler_state"]["lr"] == 0.07
    assert second["optimizer_history"][-1]["lr_scheduler_state"]["lr"] == 0.007
    before, after = first["last_optimizer_state"]["state"], second["last_optimizer_state"]["state"]
    assert before.keys() == after.keys() and before
    for key in before:  # the accumulators went on growing from phase 1's: nothing restarted
        assert int(before[key]["step"]) == 3 and int(after[key]["step"]) == 6
        assert torch.all(after[key]["sum"] >= before[key]["sum"]) and torch.any(after[key]["sum"] > before[key]["sum"])

    # the rate each update really applied, from Adagrad's own step: dp = -clr g / (sqrt(sum) + eps), sum_n -
    # sum_{n-1} = g^2, clr = lr min(1, 0.03 / ||g||): update 3 (phase 1) used 0.07 * 3/W, update 4 -- the first
    # resumed one -- 0.007 * 4/W
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(glob.glob(str(save_dir / "checkpoint_*_3.pt")),
                                                                 arg_overrides={"data": data})
    names = [name for name, p in models[0].named_parameters() if p.requires_grad]
    for n, expected in ((3, 0.07 * 3 / warmup), (4, 0.007 * 4 / warmup)):
        prev, cur = state(n - 1), state(n)
        for i, name in enumerate(names):
            sum_prev, sum_cur = (s["last_optimizer_state"]["state"][i]["sum"].double() for s in (prev, cur))
            grad_sq = sum_cur - sum_prev
            moved = (cur["model"][name].double() - prev["model"][name].double()).abs()
            seen = grad_sq > 1e-12
            if "span" in name or seen.sum() < 5:  # span parameters are clamped after the step
                continue
            clipped_lr = (moved * (sum_cur.sqrt() + 1e-10) / grad_sq.sqrt())[seen].median().item()
            assert clipped_lr / min(1.0, 0.03 / grad_sq.sum().sqrt().item()) == pytest.approx(expected, rel=1e-2), (
                n, name)

    again = run("train-adaptive-span-enwik8-large.sh", *extra, **env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped, ") == 2 and "train_inner" not in again.stdout
    last = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    assert last["optimizer_history"][-1]["num_updates"] == 6

    # the eval recipe on the result (cold streams, every token of the split scored once)
    proc = run("eval-adaptive-span-enwik8-large.sh", str(save_dir / "checkpoint_last.pt"), "--cpu", "--num-workers",
               "0", "--tokens-per-sample", "8", DATA=data, SPLIT="valid", BATCH="2", OMP_NUM_THREADS="1",
               FAIRSEQ_EVAL_LM=os.path.join(bindir, "fairseq-eval-lm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "protocol: stream(B=2, T=512, cold)" in proc.stdout  # the recipe's label; the flag overrides T:
    assert "evaluation protocol: stream(B=2, T=8, cold)" in proc.stdout + proc.stderr
    scored = re.search(r"Evaluated ([0-9,]+) tokens", proc.stdout + proc.stderr).group(1).replace(",", "")
    assert int(scored) == split_token_count(data, "valid")
