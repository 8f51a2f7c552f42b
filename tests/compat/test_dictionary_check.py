"""A checkpoint is refused on data binarised with another dictionary of the same size, under fairseq's
``language_modeling`` (ALiBi; ``fairseq_ext.compat.tasks``) and ``streaming_lm``, when evaluating and when resuming
training. Without the check both silently score the wrong symbols (the reordered dictionary below maps every id to
another word)."""
import os
import shutil

import pytest

from fairseq_ext.errors import DataError
from tests.harness import USER_DIR, fairseq_eval_lm, fairseq_preprocess, fairseq_train, random_corpus

pytestmark = pytest.mark.slow

FAMILIES = {
    "language_modeling": ["--task", "language_modeling", "--arch", "alibi_lm_tiny", "--criterion", "cross_entropy",
                          "--sample-break-mode", "none"],
    "streaming_lm": ["--task", "streaming_lm", "--arch", "transformer_xl_tiny", "--criterion", "lm_loss"],
}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two data directories of the same text: ``same`` binarised with the training dictionary, ``reordered`` with
    the same symbols in another order (same size, different ids)."""
    raw = tmp_path_factory.mktemp("raw")
    train = random_corpus(str(raw / "train.txt"), 40, seed=0)
    valid = random_corpus(str(raw / "valid.txt"), 10, seed=1)
    same = fairseq_preprocess(str(tmp_path_factory.mktemp("same")), trainpref=train, validpref=valid)
    entries = open(os.path.join(same, "dict.txt")).read().splitlines()
    reordered_dict = raw / "reordered.txt"
    reordered_dict.write_text("\n".join(reversed(entries)) + "\n")
    reordered = fairseq_preprocess(str(tmp_path_factory.mktemp("reordered")), trainpref=train, validpref=valid,
                                   srcdict=str(reordered_dict))
    return same, reordered


def train(data: str, task: str, save_dir: str, updates: int) -> None:
    fairseq_train([data, "--user-dir", USER_DIR, *FAMILIES[task], "--tokens-per-sample", "8", "--batch-size", "2",
                   "--optimizer", "adam", "--lr", "0.003", "--max-update", str(updates), "--disable-validation",
                   "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--no-progress-bar",
                   "--save-dir", save_dir])


@pytest.fixture(scope="module")
def checkpoints(corpora, tmp_path_factory):
    same, _ = corpora
    saved = {}
    for task in FAMILIES:
        save_dir = str(tmp_path_factory.mktemp(task))
        train(same, task, save_dir, 2)
        saved[task] = save_dir
    return saved


@pytest.mark.parametrize("task", list(FAMILIES))
def test_evaluation_refuses_another_dictionary_of_the_same_size(task, corpora, checkpoints):
    same, reordered = corpora
    args = ["--user-dir", USER_DIR, "--task", task, "--path", os.path.join(checkpoints[task], "checkpoint_last.pt"),
            "--gen-subset", "valid", "--tokens-per-sample", "8", "--batch-size", "2", "--cpu", "--num-workers", "0",
            "--no-progress-bar"]
    assert fairseq_eval_lm([same, *args])["loss"] > 0  # the training dictionary: evaluates
    with pytest.raises(DataError, match="dictionary mismatch"):
        fairseq_eval_lm([reordered, *args])


@pytest.mark.parametrize("task", list(FAMILIES))
def test_resuming_training_refuses_another_dictionary_of_the_same_size(task, corpora, checkpoints, tmp_path):
    _, reordered = corpora
    shutil.copytree(checkpoints[task], tmp_path / "resume")
    with pytest.raises(DataError, match="dictionary mismatch"):
        train(reordered, task, str(tmp_path / "resume"), 4)
