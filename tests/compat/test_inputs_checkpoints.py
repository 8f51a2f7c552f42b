"""fairseq_ext.compat.inputs, checkpoints: an empty, truncated, text or otherwise non-checkpoint file given to fairseq
(``checkpoint_utils.load_checkpoint_to_cpu``: fairseq-eval-lm, -validate, fairseq-train --restore-file) or to a
converter script is one DataError "<path> is not a PyTorch checkpoint (...); pass ..." (without the shim: EOFError,
"IndexError: pop from empty list", a miniz RuntimeError, a TypeError from fairseq's state upgrade)."""
import os
import pickle
import re
import subprocess
import sys
from typing import Callable, Dict

import pytest
import torch

from fairseq import checkpoint_utils

from fairseq_ext.compat import inputs
from fairseq_ext.errors import DataError
from tests.harness import REPO_ROOT, USER_DIR, fairseq_eval_lm, fairseq_preprocess, random_corpus

STATE = {"model": {"w": torch.zeros(300)}, "cfg": {"model": {"_name": "alibi_lm"}}, "extra_state": {},
         "optimizer_history": [{"criterion_name": "x", "optimizer_name": "y", "lr_scheduler_state": {},
                                "num_updates": 0}]}


def zip_bytes(tmp_path) -> bytes:
    torch.save(STATE, tmp_path / "whole.pt")
    return (tmp_path / "whole.pt").read_bytes()


def legacy_bytes(tmp_path) -> bytes:
    torch.save(STATE, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    return (tmp_path / "legacy.pt").read_bytes()


BAD_FILES: Dict[str, Callable] = {
    "empty": lambda tmp: b"",
    "text": lambda tmp: b"epoch 001 | loss 4.2 | ppl 18.4\n",
    "random bytes": lambda tmp: bytes(range(7, 250)),
    "truncated zip": lambda tmp: zip_bytes(tmp)[:700],
    "truncated legacy": lambda tmp: legacy_bytes(tmp)[:-200],
    "plain pickle": lambda tmp: pickle.dumps({"model": {}}),
    "zip without data.pkl": lambda tmp: zip_without_torch_record(tmp),
}
REASONS = {"empty": "an empty file, 0 bytes", "text": "a text file starting with 'epoch 001",
           "random bytes": "it starts with bytes 07 08 09 0a 0b 0c 0d 0e: neither torch.save's zip archive nor its",
           "truncated zip": "a truncated or damaged zip archive", "truncated legacy": "truncated or damaged: ",
           "plain pickle": "a plain Python pickle", "zip without data.pkl": "a zip archive without torch.save's"}


def zip_without_torch_record(tmp_path) -> bytes:
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return (tmp_path / "other.zip").read_bytes()


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_fairseq_checkpoint_loading_refuses_a_file_that_is_no_checkpoint(tmp_path, kind):
    path = tmp_path / "checkpoint_best.pt"
    path.write_bytes(BAD_FILES[kind](tmp_path))
    with pytest.raises(DataError) as error:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} is not a PyTorch checkpoint ({REASONS[kind]}"), message
    assert "pass the checkpoint file written by fairseq-train" in message and "\n" not in message


@pytest.mark.parametrize("content,described", [
    ([1, 2], "a list of 2 items"), (torch.zeros(2), "a Tensor"),
    ({"model_state": {}}, "a dict with keys ['model_state']"),  # NVIDIA Transformer-XL: convert it first
    ({"model": {}, "cfg": {}}, "a dict with keys ['cfg', 'model']"),  # no training history: fairseq's KeyError
])
def test_a_torch_file_that_is_no_fairseq_checkpoint_is_refused(tmp_path, content, described):
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with pytest.raises(DataError, match=rf"is not a fairseq checkpoint \(it holds {re.escape(described)}.*convert_<"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_intact_checkpoints_load_through_the_shim(tmp_path):
    assert checkpoint_utils.load_checkpoint_to_cpu is inputs.load_checkpoint_to_cpu  # installed by fairseq_ext.compat
    for name, data in (("zip.pt", zip_bytes(tmp_path)), ("legacy.pt", legacy_bytes(tmp_path))):
        (tmp_path / name).write_bytes(data)
        inputs.check_torch_file(str(tmp_path / name), "x")
        state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / name))
        assert torch.equal(state["model"]["w"], STATE["model"]["w"])


def test_eval_lm_refuses_an_empty_checkpoint(tmp_path):
    data = fairseq_preprocess(str(tmp_path / "bin"), random_corpus(str(tmp_path / "train.txt"), 10),
                              random_corpus(str(tmp_path / "valid.txt"), 5, seed=1))
    empty = tmp_path / "checkpoint_best.pt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{empty} is not a PyTorch checkpoint \(an empty file, 0 bytes\); pass"):
        fairseq_eval_lm([data, "--user-dir", USER_DIR, "--path", str(empty), "--cpu", "--gen-subset", "valid",
                         "--tokens-per-sample", "8", "--batch-size", "2", "--num-workers", "0"])


@pytest.mark.slow
def test_converter_script_prints_one_line_for_an_empty_file(tmp_path):
    """The real script: exit status 1, last stderr line 'error: ...' naming what to pass, no traceback."""
    empty = tmp_path / "model.pt"
    empty.write_bytes(b"")
    script = os.path.join(REPO_ROOT, "scripts", "convert_transformer_xl_checkpoint.py")
    result = subprocess.run([sys.executable, script, str(empty), str(tmp_path / "out"), "--trust-pickle"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last == (f"error: {empty} is not a PyTorch checkpoint (an empty file, 0 bytes); pass the model.pt saved by "
                    f"the original Transformer-XL train.py (kimiyoung/transformer-xl) or an NVIDIA checkpoint_*.pt "
                    f"(DeepLearningExamples)"), last
    assert "Traceback" not in result.stderr
