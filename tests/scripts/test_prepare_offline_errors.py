"""Without network and without an archive every download script fails at once, naming both fixes."""
import pytest

from tests.scripts.runner import REPO_ROOT, UNREACHABLE, run_script, script_env

pytestmark = pytest.mark.slow

CASES = [
    ("prepare-wikitext-103.sh", "WIKITEXT103_ZIP", "WIKITEXT103_URL", "wikitext-103-v1.zip"),
    ("prepare-enwik8.sh", "ENWIK8_ZIP", "ENWIK8_URL", "enwik8.zip"),
    ("prepare-text8.sh", "TEXT8_ZIP", "TEXT8_URL", "text8.zip"),
]


@pytest.mark.parametrize("script,zip_var,url_var,zip_name", CASES)
def test_no_network_no_archive(tmp_path, script, zip_var, url_var, zip_name):
    run = run_script(script, script_env(tmp_path))
    assert run.returncode != 0
    assert run.seconds < 30
    assert f"could not download {UNREACHABLE[url_var]}" in run.stderr
    assert f"{zip_var}=/path/to/{zip_name}" in run.stderr  # fix 1: give the archive
    assert "on a machine with network access" in run.stderr  # fix 2: fetch it elsewhere
    assert not list(tmp_path.rglob("*.part")) and not (tmp_path / "data-bin").exists()


@pytest.mark.parametrize("script,zip_var,url_var,zip_name", CASES)
def test_missing_archive_path(tmp_path, script, zip_var, url_var, zip_name):
    run = run_script(script, script_env(tmp_path), str(tmp_path / "nowhere.zip"))
    assert run.returncode != 0
    assert f"nowhere.zip' (first argument or ${zip_var}) does not exist" in run.stderr


def test_defaults_are_the_canonical_urls_and_checksums():
    """The values of shared/data/README.md (tests override them, so check the defaults are right)."""
    text = {name: (REPO_ROOT / "scripts" / name).read_text() for name, *_ in CASES}
    wikitext, enwik8, text8 = (text[name] for name, *_ in CASES)
    assert "${WIKITEXT103_URL:-https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip}" in wikitext
    assert "${WIKITEXT103_SHA256-242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590}" in wikitext
    assert "${WIKITEXT103_VALID_SHA256-9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b}" in wikitext
    assert "${WIKITEXT103_TEST_SHA256-56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9}" in wikitext
    assert "${ENWIK8_URL:-http://mattmahoney.net/dc/enwik8.zip}" in enwik8
    assert "${ENWIK8_MD5-a1fa5ffddb56f4953e226637dabbb36a}" in enwik8
    assert "${ENWIK8_SIZE-100000000}" in enwik8 and "${ENWIK8_HELDOUT:-5000000}" in enwik8
    assert "${TEXT8_URL:-http://mattmahoney.net/dc/text8.zip}" in text8
    assert "${TEXT8_ZIP_SIZE-31344016}" in text8 and "${TEXT8_SIZE-100000000}" in text8
    assert "${TEXT8_HELDOUT:-5000000}" in text8
