"""Task checks run before anything is loaded: a memory model's training under language_modeling is refused at once
(not at its second batch), and fairseq-eval-lm --task language_modeling logs its protocol."""
import logging
import os
import re
import shutil

import pytest

from fairseq_ext.errors import ConfigError
from tests.harness import USER_DIR, fairseq_eval_lm, fairseq_train

FROZEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "frozen", "data")


def train_args(data, save_dir, arch, *extra):
    return [data, "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", arch, "--tokens-per-sample", "8",
            "--batch-size", "2", "--max-update", "1", "--optimizer", "adam", "--lr", "0.001", "--criterion", "lm_loss",
            "--save-dir", save_dir, "--no-save", "--cpu", "--num-workers", "0", *extra]


@pytest.mark.parametrize("arch,extra", [("transformer_xl_tiny", ["--mem-len", "8"]), ("sha_rnn_tiny", []),
                                        ("fast_weight_tiny", ["--carry-over-fast-weight"]),
                                        ("composed_alibi_memory_tiny", [])])
def test_memory_models_refuse_language_modeling_before_loading_data(data_dir, tmp_path, arch, extra):
    no_train = str(tmp_path / "bin")  # only the dictionary and valid: loading the train split would fail differently
    os.makedirs(no_train)
    for name in os.listdir(data_dir):
        if not name.startswith("train"):
            shutil.copy(os.path.join(data_dir, name), no_train)
    with pytest.raises(ConfigError, match="trains only on contiguous streams: --task streaming_lm"):
        fairseq_train(train_args(no_train, str(tmp_path / "ck"), arch, *extra))


@pytest.mark.parametrize("arch,extra", [("fast_weight_tiny", []), ("transformer_xl_tiny", ["--mem-len", "0"])])
def test_models_that_carry_nothing_still_train_under_language_modeling(data_dir, tmp_path, arch, extra):
    fairseq_train(train_args(data_dir, str(tmp_path / "ck"), arch, *extra))  # one update, no error


@pytest.mark.parametrize("case", ["fast_weight_delta", "alibi"])  # stateless; their dictionaries: w0 .. w35
@pytest.mark.parametrize("window,label", [(0, "nonoverlap(L=6)"), (2, "sliding(L=6, S=4)")])
def test_language_modeling_evaluation_logs_its_protocol(data_dir, tmp_path, caplog, case, window, label):
    case = os.path.join(FROZEN, case)
    data = str(tmp_path / "bin")
    shutil.copytree(data_dir, data)
    shutil.copy(os.path.join(case, "dict.txt"), os.path.join(data, "dict.txt"))  # same symbols w0..w19 used
    with caplog.at_level(logging.INFO):
        fairseq_eval_lm([data, "--user-dir", USER_DIR, "--path", os.path.join(case, "model.pt"), "--task",
                         "language_modeling", "--tokens-per-sample", "6", "--context-window", str(window),
                         "--sample-break-mode", "none", "--batch-size", "1", "--gen-subset", "valid", "--cpu",
                         "--num-workers", "0"])
    assert f"evaluation protocol: {label}" in caplog.text
    estimate = re.search(r"sliding\(L=6, S=4\) over 240 tokens: 60 batches of 1 windows \(1.5x the work of "
                         r"nonoverlap\(L=6\)\), [0-9.]+ s each here: about \d+ s", caplog.text)
    assert (estimate is not None) == (window > 0)  # the timed estimate, logged before the evaluation runs
    if window:
        assert caplog.text.index(estimate.group(0)) < caplog.text.index("Evaluated")
