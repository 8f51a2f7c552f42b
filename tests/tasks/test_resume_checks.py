"""A resumed run continues the saved training streams only where they ended; impossible stream layouts are refused.

The checkpoint records where the training streams end (``streaming_lm.get_checkpoint_dict``: the number of streams,
the split length and the token offset in every stream). A run resumed with another ``--tokens-per-sample`` used to
continue the saved memory at segment index k, i.e. at another place of the text; now it starts the streams cold and
says why.
"""
import logging

import pytest

from fairseq_ext.errors import ConfigError
from fairseq_ext.tasks.resume import cursor_mismatch
from tests.harness import USER_DIR, fairseq_train
from tests.tasks.test_streaming_lm import batches, make_task


def train(data: str, save_dir: str, tokens_per_sample: int, updates: int) -> None:
    fairseq_train([data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "transformer_xl_tiny",
                   "--mem-len", "8", "--tokens-per-sample", str(tokens_per_sample), "--batch-size", "2",
                   "--criterion", "lm_loss", "--optimizer", "adam", "--lr", "0.003", "--max-update", str(updates),
                   "--disable-validation", "--no-epoch-checkpoints", "--cpu", "--num-workers", "0",
                   "--no-progress-bar", "--save-dir", save_dir])


@pytest.mark.slow
@pytest.mark.parametrize("resumed_length, continues", [(8, True), (6, False)])
def test_the_saved_streams_continue_only_at_the_token_where_they_ended(data_dir, tmp_path, caplog, resumed_length,
                                                                      continues):
    train(data_dir, str(tmp_path), 8, 3)  # the streams end at token 24 of every stream
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(data_dir, str(tmp_path), resumed_length, 5)  # resumes at segment 3: token 24, or 18 with T = 6
    if continues:
        assert "resumed the training streams' state at segment 3" in caplog.text
    else:
        assert ("training streams start cold: training resumes at token 18 of every stream but the saved state "
                "ends at token 24") in caplog.text
        assert "resumed the training streams' state" not in caplog.text


def test_cursor_mismatch_names_what_changed():
    here = {"streams": 8, "tokens": 1000, "offset": 64}
    assert cursor_mismatch(dict(here), here) is None
    assert "records no position" in cursor_mismatch(None, here)
    assert "into 8 streams" in cursor_mismatch({**here, "streams": 4}, here)
    assert "1,000 tokens" in cursor_mismatch({**here, "tokens": 999}, here)
    assert "token 64 of every stream but the saved state ends at token 32" in cursor_mismatch({**here, "offset": 32},
                                                                                             here)


def test_training_samples_carry_their_stream_cursor(data_dir):
    task, _ = make_task(data_dir, tokens_per_sample=5, batch_size=3)
    task.load_dataset("train")
    first, second = batches(task, "train", 3)[:2]
    n = len(task.dataset("train").tokens)
    assert first["stream_cursor"] == {"start": {"streams": 3, "tokens": n, "offset": 0},
                                      "end": {"streams": 3, "tokens": n, "offset": 5}}
    assert second["stream_cursor"]["start"] == first["stream_cursor"]["end"]
    task.load_dataset("valid")
    assert "stream_cursor" not in batches(task, "valid", 3)[0]  # evaluation never resumes a saved state


def test_tokens_per_sample_below_one_is_refused(data_dir):
    with pytest.raises(ConfigError, match="--tokens-per-sample must be >= 1"):
        make_task(data_dir, tokens_per_sample=0)


def test_more_streams_than_tokens_are_refused(data_dir):
    task, _ = make_task(data_dir, batch_size=3)
    task.load_dataset("valid")
    tokens = len(task.dataset("valid").tokens)
    with pytest.raises(ConfigError, match=f"only {tokens:,} tokens: every stream needs at least one"):
        batches(task, "valid", tokens + 1)
    with pytest.raises(ConfigError, match="2 worker"):
        batches(task, "valid", tokens // 2 + 1, num_shards=2)
    assert len(batches(task, "valid", tokens)) == 1  # one token per stream still works
