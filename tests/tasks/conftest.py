"""A tiny binarised corpus (fairseq-preprocess output) shared by the task tests."""
import os

import pytest

from tests.harness import fairseq_preprocess, random_corpus, single_thread

VALID_TOKENS = 240  # 2 * 8 * 15 = 4 * 6 * 10: lets B streams align with T-token blocks for several (B, T)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    raw = tmp_path_factory.mktemp("raw")
    return fairseq_preprocess(
        str(tmp_path_factory.mktemp("data-bin")),
        trainpref=random_corpus(os.path.join(raw, "train.txt"), 60, seed=0),
        validpref=random_corpus(os.path.join(raw, "valid.txt"), 24, seed=1, total_tokens=VALID_TOKENS),
        testpref=random_corpus(os.path.join(raw, "test.txt"), 20, seed=2),
    )


@pytest.fixture(scope="session")
def other_data_dir(tmp_path_factory) -> str:
    """Same layout, another vocabulary (30 words): its dictionary differs from ``data_dir``'s."""
    raw = tmp_path_factory.mktemp("raw-other")
    return fairseq_preprocess(
        str(tmp_path_factory.mktemp("data-bin-other")),
        trainpref=random_corpus(os.path.join(raw, "train.txt"), 60, num_words=30, seed=3),
        validpref=random_corpus(os.path.join(raw, "valid.txt"), 10, num_words=30, seed=4),
        testpref=random_corpus(os.path.join(raw, "test.txt"), 10, num_words=30, seed=5),
    )


one_torch_thread = pytest.fixture(autouse=True)(single_thread)
