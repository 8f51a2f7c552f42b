"""preprocess.stats counts tokens exactly as fairseq-preprocess does (one </s> per line)."""
from preprocess.stats import TextStats, file_stats, tokenize_line


def test_tokenize_line_collapses_whitespace():
    assert tokenize_line("  a\tb  c \n") == ["a", "b", "c"]
    assert tokenize_line(" \n") == []


def test_file_stats(tmp_path):
    path = tmp_path / "x.txt"
    # a WikiText-style blank line " \n", and a last line without a newline
    path.write_bytes(b"the cat sat\n \nthe end")
    assert file_stats(str(path)) == TextStats(lines=3, tokens=3 + 1 + 1 + 2 + 1, types=4)


def test_carriage_return_is_a_line_break_in_text_mode(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"a\rb\r\nc\n")
    assert file_stats(str(path)) == TextStats(lines=3, tokens=6, types=3)
