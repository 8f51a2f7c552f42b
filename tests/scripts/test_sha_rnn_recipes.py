"""The SHA-RNN recipes (scripts/{train,eval}-sha-rnn-<config>.sh via scripts/lib/sha-rnn.sh) parse with fairseq's own
parsers and carry the README's two-stage schedule of shared/specs/sha_rnn.md §2 and the LAMB-with-minimum-trust
flags of §3; one slow test runs both stages on tiny data (stage 2: fresh optimizer, warmup restarting at update 0)."""
import os
import re
import sys

import pytest

from tests.scripts.test_adaptive_span_recipes import dry_run, flag, logged_lrs, parse, run

ARCHS = {"enwik8": "sha_rnn_enwik8", "enwik8-full-attn": "sha_rnn_enwik8_full_attn"}
# stage: (lr, seed, epochs)   spec §2 table
STAGES = {1: (2e-3, 5512, 32), 2: (1e-3, 125, 5)}


@pytest.mark.parametrize("ngpu", [1, 2, 16])
@pytest.mark.parametrize("config", sorted(ARCHS))
def test_training_recipes_carry_the_readme_schedule(config, ngpu):
    from fairseq import options

    stages = dry_run(f"train-sha-rnn-{config}.sh", NGPU=str(ngpu))
    assert [label.split(":")[0] for label, _ in stages] == ["stage 1", "stage 2"]
    save = f"checkpoints/sha_rnn_{config}"
    for stage, (label, argv) in zip((1, 2), stages):
        lr, seed, epochs = STAGES[stage]
        cfg = parse(options.get_training_parser, argv)
        assert cfg.model._name == ARCHS[config] and cfg.task._name == "streaming_lm" and cfg.criterion._name == "lm_loss"
        assert cfg.task.data == "data-bin/enwik8"
        # LAMB with minimum trust (spec §3)
        opt = cfg.optimizer
        assert opt._name == "lamb_torch" and eval(opt.lamb_betas) == (0.9, 0.999) and opt.lamb_eps == 1e-6
        assert (opt.weight_decay, opt.min_trust, opt.trust_denominator, opt.max_weight_norm) == (
            1.2e-6, 0.25, "update_norm", 10.0)
        assert not opt.adam_mode and cfg.common.fp16_no_flatten_grads
        assert cfg.optimization.clip_norm == 0.25 and cfg.optimization.lr == [lr]
        assert (cfg.lr_scheduler._name, cfg.lr_scheduler.warmup_updates) == ("fixed", 800)  # warmup, then constant
        assert cfg.optimization.max_epoch == epochs and cfg.optimization.max_update == 0
        assert cfg.common.seed == seed and f"seed {seed}" in label
        assert cfg.task.tokens_per_sample == 1024 and cfg.task.variable_bptt
        assert cfg.dataset.batch_size == 16 // ngpu and cfg.distributed_training.distributed_world_size == ngpu
        assert cfg.dataset.batch_size_valid == 16 and cfg.optimization.update_freq == [1]
        assert cfg.checkpoint.save_dir == f"{save}/stage{stage}" and cfg.checkpoint.no_epoch_checkpoints
        # stage 2 starts from the best stage-1 model (the original saves only that), fresh optimizer and counters
        assert cfg.checkpoint.finetune_from_model == (f"{save}/stage1/checkpoint_best.pt" if stage == 2 else None)
        assert not (cfg.checkpoint.reset_optimizer or cfg.checkpoint.reset_lr_scheduler)  # implied by finetune
        # the architecture comes from the preset only
        assert not {"--attn-layers", "--dropout", "--dropouth", "--decoder-layers"} & set(argv)


def test_stage_selects_one_stage_and_settings_override():
    def stages(**env):
        return [(label.split(":")[0], float(flag(argv, "--lr")), int(flag(argv, "--seed")),
                 int(flag(argv, "--max-epoch"))) for label, argv in dry_run("train-sha-rnn-enwik8.sh", NGPU="1", **env)]

    assert stages() == stages(STAGE="all") == [("stage 1", 2e-3, 5512, 32), ("stage 2", 1e-3, 125, 5)]
    assert stages(STAGE="1") == [("stage 1", 2e-3, 5512, 32)]
    assert stages(STAGE="2") == [("stage 2", 1e-3, 125, 5)]
    assert stages(LR="1", STAGE2_LR="0.5", SEED="1", STAGE2_SEED="2", EPOCHS="3", STAGE2_EPOCHS="4") == [
        ("stage 1", 1.0, 1, 3), ("stage 2", 0.5, 2, 4)]
    (_, argv), _ = dry_run("train-sha-rnn-enwik8.sh", NGPU="1", ARCH="sha_rnn_tiny", SAVE_DIR="/x")
    assert flag(argv, "--arch") == "sha_rnn_tiny" and flag(argv, "--save-dir") == "/x/stage1"
    out = run("train-sha-rnn-enwik8.sh", DRY_RUN="1", NGPU="1", STAGE="3")
    assert out.returncode != 0 and "STAGE must be all, 1 or 2" in out.stderr


@pytest.mark.parametrize("ngpu", ["3", "32", "0", "x"])
def test_global_batch_must_split_over_workers(ngpu):
    out = run("train-sha-rnn-enwik8.sh", DRY_RUN="1", NGPU=ngpu)
    assert out.returncode != 0 and "NGPU" in out.stderr and not out.stdout


def test_real_runs_check_data_and_stage_one_first(tmp_path):
    out = run("train-sha-rnn-enwik8.sh", NGPU="1", DATA=str(tmp_path / "none"))
    assert out.returncode != 0 and "prepare-enwik8.sh" in out.stderr
    (tmp_path / "dict.txt").write_text("a 1\n")
    out = run("train-sha-rnn-enwik8.sh", NGPU="1", DATA=str(tmp_path), SAVE_DIR=str(tmp_path / "ck"), STAGE="2")
    assert out.returncode != 0 and "STAGE=1 first" in out.stderr


@pytest.mark.parametrize("split,streams", [("test", 8), ("valid", 16)])
@pytest.mark.parametrize("config", sorted(ARCHS))
def test_eval_recipes_use_the_original_evaluation(config, split, streams):
    from fairseq import options

    (_, argv), = dry_run(f"eval-sha-rnn-{config}.sh", "ck.pt", SPLIT=split)
    cfg = parse(options.get_eval_lm_parser, argv)
    assert cfg.task._name == "streaming_lm" and cfg.task.tokens_per_sample == 1024 and not cfg.task.variable_bptt
    assert cfg.task.data == "data-bin/enwik8" and cfg.common_eval.path == "ck.pt"
    assert cfg.dataset.batch_size == streams and cfg.task.eval_warmup_tokens == 0 and cfg.dataset.gen_subset == split
    assert cfg.common_eval.model_overrides == "{}"
    (_, argv), = dry_run(f"eval-sha-rnn-{config}.sh", "ck.pt", "--cpu", SPLIT=split, BATCH="4")
    cfg = parse(options.get_eval_lm_parser, argv)
    assert cfg.dataset.batch_size == 4 and cfg.common.cpu


# ======================================================================================================================
# end to end: both stages on tiny data
# ======================================================================================================================
@pytest.mark.slow
def test_two_stage_run_restarts_warmup_from_the_best_stage_one_model(tmp_path):
    """The recipe with the tiny preset, one epoch per stage: stage 2 loads stage 1's checkpoint_best.pt, counts
    updates from 0 (the warmup restarts at the new lr), and starts with fresh LAMB moments (the original saved no
    optimizer state); the eval recipe then scores every valid token once."""
    from fairseq import checkpoint_utils

    import fairseq_ext  # noqa: F401
    from tests.harness import fairseq_preprocess, random_corpus, split_token_count

    raw = tmp_path / "raw"
    raw.mkdir()
    data = fairseq_preprocess(str(tmp_path / "bin"), trainpref=random_corpus(str(raw / "train.txt"), 60, seed=40),
                              validpref=random_corpus(str(raw / "valid.txt"), 10, seed=41))
    save_dir = tmp_path / "ck"
    bindir = os.path.dirname(sys.executable)
    env = dict(ARCH="sha_rnn_tiny", EPOCHS="1", STAGE2_EPOCHS="1", LR="0.01", STAGE2_LR="0.005", NGPU="1", DATA=data,
               SAVE_DIR=str(save_dir), FAIRSEQ_TRAIN=os.path.join(bindir, "fairseq-train"), OMP_NUM_THREADS="1")
    warmup = 1000  # every update inside the warmup: the logged rate shows the update count each stage uses
    extra = ["--cpu", "--num-workers", "0", "--tokens-per-sample", "16", "--batch-size", "2", "--warmup-updates",
             str(warmup), "--log-interval", "1", "--log-format", "simple", "--no-progress-bar"]
    out = run("train-sha-rnn-enwik8.sh", *extra, **env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    first_stage, second_stage = log.split("stage 2: enwik8 (sha_rnn_tiny) lr 0.005 seed 125")
    lrs1, lrs2 = logged_lrs(first_stage), logged_lrs(second_stage)
    assert lrs1 and lrs2 and min(lrs2) == 1
    for lrs, base in ((lrs1, 0.01), (lrs2, 0.005)):
        for n, lr in lrs.items():
            assert lr == pytest.approx(base * (n + 1) / warmup, rel=1e-4), (n, lrs)
    assert re.search(r"[Ll]oaded checkpoint .*stage1/checkpoint_best\.pt", second_stage)
    one = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "stage1" / "checkpoint_last.pt"))
    two = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "stage2" / "checkpoint_last.pt"))
    assert one["optimizer_history"][-1]["num_updates"] == max(lrs1)
    assert two["optimizer_history"][-1]["num_updates"] == max(lrs2)
    assert one["cfg"]["common"]["seed"] == 5512 and two["cfg"]["common"]["seed"] == 125
    steps = {int(v["step"]) for v in two["last_optimizer_state"]["state"].values()}
    assert steps == {max(lrs2)}  # LAMB moments started afresh in stage 2

    proc = run("eval-sha-rnn-enwik8.sh", str(save_dir / "stage2" / "checkpoint_last.pt"), "--cpu", "--num-workers",
               "0", "--tokens-per-sample", "16", DATA=data, SPLIT="valid", BATCH="2", OMP_NUM_THREADS="1",
               FAIRSEQ_EVAL_LM=os.path.join(bindir, "fairseq-eval-lm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "protocol: stream(B=2, T=1024, cold)" in proc.stdout
    scored = re.search(r"Evaluated ([0-9,]+) tokens", proc.stdout + proc.stderr).group(1).replace(",", "")
    assert int(scored) == split_token_count(data, "valid")
