"""scripts/prepare-embedded.sh end to end on the first documents of this Python's standard library."""
import pytest

from tests.scripts.runner import assert_bin_complete, bin_splits, dict_words, run_script, script_env, snapshot

pytestmark = pytest.mark.slow
SCRIPT = "prepare-embedded.sh"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedded")
    env = script_env(tmp, EMBEDDED_MAX_DOCS="40", EMBEDDED_NWORDS="200")
    run = run_script(SCRIPT, env)
    assert run.returncode == 0, run.stderr
    return tmp, env


def test_word_variant_has_capped_vocabulary(prepared):
    tmp, _ = prepared
    dest = tmp / "data-bin" / "embedded-word"
    assert_bin_complete(dest)
    assert len(dict_words(dest)) == 200 - 4  # --nwordssrc counts the 4 specials
    decoded = bin_splits(dest)
    for split in ("train", "valid", "test"):
        lines = (tmp / "data" / "embedded" / "word" / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        assert len(decoded[split]) == len(lines) > 0
        assert all(sent[-1] == "</s>" for sent in decoded[split])


def test_byte_variant_is_enwik8_format(prepared):
    tmp, _ = prepared
    dest = tmp / "data-bin" / "embedded-byte"
    assert_bin_complete(dest)
    decoded = bin_splits(dest)
    for split in ("train", "valid", "test"):
        raw = (tmp / "data" / "embedded" / "byte" / f"{split}.txt.raw").read_bytes()
        words = [w for w in dict_words(dest) if w.isdigit()]
        expected = [[str(b) if str(b) in words else "<unk>" for b in line] + ["</s>"]
                    for line in raw.split(b"\n")[:-1]]
        assert decoded[split] == expected


def test_second_run_does_nothing(prepared):
    tmp, env = prepared
    before = snapshot(tmp / "data", tmp / "data-bin")
    run = run_script(SCRIPT, env)
    assert run.returncode == 0 and "nothing to do" in run.stdout
    assert snapshot(tmp / "data", tmp / "data-bin") == before
