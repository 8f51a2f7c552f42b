"""fairseq_ext.compat.inputs, binarised data: a truncated .bin, a corrupt .idx and a .bin with out-of-range ids are one
DataError naming the file and fairseq-preprocess, in fairseq-eval-lm / fairseq-validate / fairseq-train, under
fairseq's ``language_modeling`` (ALiBi) and ``--task streaming_lm`` (without the shim: a ValueError "buffer is smaller
than requested size", a bare AssertionError, an IndexError in the embedding, a broadcast error)."""
import os
import shutil
import struct
import subprocess
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
from omegaconf import OmegaConf

from fairseq_ext.errors import DataError, UserError
from tests.harness import (REPO_ROOT, USER_DIR, build_model, fairseq_eval_lm, fairseq_preprocess, fairseq_train,
                           random_corpus, single_thread, training_cfg)

one_thread = pytest.fixture(autouse=True)(single_thread)
FIX = "fairseq-preprocess"
ALIBI_ARGS = ["--tokens-per-sample", "16"]


def truncate_bin(prefix: str) -> None:
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") // 2)


def corrupt_idx_pointer(prefix: str) -> None:
    """Line 1's byte pointer (mmap index: 26-byte header, n int32 sizes, then n int64 pointers)."""
    with open(prefix + ".idx", "rb") as f:
        lines = struct.unpack_from("<Q", f.read(26), 18)[0]
    with open(prefix + ".idx", "r+b") as f:
        f.seek(26 + 4 * lines + 8)
        f.write(struct.pack("<q", 10_000))


def corrupt_idx_magic(prefix: str) -> None:
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTANIDX")


def out_of_range_bin(prefix: str) -> None:
    """Token 5 of the split becomes id 60000 (uint16 .bin: still a valid-looking file)."""
    with open(prefix + ".bin", "r+b") as f:
        f.seek(2 * 5)
        f.write(struct.pack("<H", 60000))


DAMAGE: Dict[str, Tuple[Callable[[str], None], str]] = {
    "truncated .bin": (truncate_bin, r"{split}\.bin is truncated: .*{split}\.idx lists"),
    "corrupt .idx pointer": (corrupt_idx_pointer, r"{split}\.idx is corrupt: line 1 starts at byte 10,000"),
    "corrupt .idx magic": (corrupt_idx_magic, r"{split}\.idx is not an index written by fairseq-preprocess"),
    "out-of-range .bin": (out_of_range_bin, r"{split}\.bin \(line \d+\) holds token id 60000, but the dictionary"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A binarised corpus (train 60 lines, valid 30 lines) of 24 types."""
    root = tmp_path_factory.mktemp("inputs_data")
    return fairseq_preprocess(str(root / "bin"), random_corpus(str(root / "train.txt"), 60, seed=1),
                              random_corpus(str(root / "valid.txt"), 30, seed=2))


@pytest.fixture(scope="module")
def alibi_checkpoint(corpus, tmp_path_factory) -> str:
    """An untrained alibi_lm_tiny checkpoint (language_modeling), written as fairseq-train writes one."""
    from fairseq.data import Dictionary

    cfg = OmegaConf.to_container(training_cfg("alibi_lm_tiny", ALIBI_ARGS, data=corpus), resolve=True)
    model = build_model("alibi_lm_tiny", Dictionary.load(os.path.join(corpus, "dict.txt")), ALIBI_ARGS)
    path = str(tmp_path_factory.mktemp("alibi_ckpt") / "checkpoint_last.pt")
    torch.save({"args": None, "cfg": cfg, "model": model.state_dict(), "extra_state": {},
                "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "NAG",
                                       "lr_scheduler_state": {"best": None}, "num_updates": 0}]}, path)
    return path


def damaged_copy(corpus: str, tmp_path, damage: str, split: str) -> Tuple[str, str]:
    """A copy of ``corpus`` whose ``split`` is damaged as named; returns (data dir, the expected message regex)."""
    data = str(tmp_path / "data")
    shutil.copytree(corpus, data)
    change, message = DAMAGE[damage]
    change(os.path.join(data, split))
    return data, message.format(split=split)


def eval_lm_args(data: str, checkpoint: str, *extra: str) -> List[str]:
    return [data, "--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset", "valid", "--cpu",
            "--tokens-per-sample", "16", "--batch-size", "4", "--no-progress-bar", *extra]


def assert_one_line(error: BaseException) -> None:
    assert isinstance(error, UserError) and FIX in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_eval_lm_language_modeling_refuses_a_damaged_split(corpus, alibi_checkpoint, tmp_path, damage):
    """fairseq-eval-lm as the CLI runs it (one data-loader worker: the per-item check runs there)."""
    data, message = damaged_copy(corpus, tmp_path, damage, "valid")
    with pytest.raises(DataError, match=message) as error:
        fairseq_eval_lm(eval_lm_args(data, alibi_checkpoint))
    assert_one_line(error.value)


def test_eval_lm_on_the_intact_split_still_scores(corpus, alibi_checkpoint):
    result = fairseq_eval_lm(eval_lm_args(corpus, alibi_checkpoint, "--num-workers", "0"))
    assert 0 < float(result["loss"]) < 10


def fairseq_validate(args: Sequence[str]) -> None:
    """``fairseq-validate ARGS`` in this process, through ``call_main`` like fairseq_cli.validate.cli_main."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import validate

    parsed = options.parse_args_and_arch(options.get_validation_parser(), list(args))
    overrides = options.parse_args_and_arch(options.get_validation_parser(), list(args), suppress_defaults=True)
    distributed_utils.call_main(convert_namespace_to_omegaconf(parsed), validate.main, override_args=overrides)


def test_validate_refuses_a_truncated_split(corpus, alibi_checkpoint, tmp_path):
    data, message = damaged_copy(corpus, tmp_path, "truncated .bin", "valid")
    with pytest.raises(DataError, match=message):
        fairseq_validate([data, "--user-dir", USER_DIR, "--path", alibi_checkpoint, "--valid-subset", "valid",
                          "--cpu", "--batch-size", "4", "--num-workers", "0", "--task", "language_modeling",
                          "--tokens-per-sample", "16"])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt .idx pointer", "out-of-range .bin"])
def test_train_streaming_lm_refuses_a_damaged_training_split(corpus, tmp_path, damage):
    data, message = damaged_copy(corpus, tmp_path, damage, "train")
    with pytest.raises(DataError, match=message.replace(r" \(line \d+\)", "")) as error:
        fairseq_train([data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "transformer_xl_tiny",
                       "--criterion", "lm_loss", "--tokens-per-sample", "8", "--batch-size", "2", "--optimizer",
                       "adam", "--lr", "1e-3", "--max-update", "1", "--cpu", "--num-workers", "0",
                       "--save-dir", str(tmp_path / "ck"), "--no-save", "--no-progress-bar"])
    assert_one_line(error.value)


@pytest.mark.slow
def test_eval_lm_console_command_prints_one_line_for_a_truncated_bin(corpus, alibi_checkpoint, tmp_path):
    """The real console script: exit status 1, last stderr line 'error: ...' naming the fix, no traceback."""
    data, _ = damaged_copy(corpus, tmp_path, "truncated .bin", "valid")
    command = os.path.join(REPO_ROOT, ".venv", "bin", "fairseq-eval-lm")
    if not os.path.exists(command):
        command = shutil.which("fairseq-eval-lm")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([command, *eval_lm_args(data, alibi_checkpoint)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last.startswith(f"error: {data}/valid.bin is truncated") and FIX in last, last
    assert "Traceback" not in result.stderr
