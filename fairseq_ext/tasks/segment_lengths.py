"""Where ``streaming_lm``'s training segments start and end: the ``--train-stream-offset random`` start offset of an
epoch and the ``--variable-bptt`` segment lengths (SHA-RNN / AWD-LSTM), both drawn from (seed, epoch) so that every
worker and a resumed run cut the training streams alike."""
import math
from typing import List

import numpy as np


def train_stream_offset(seed: int, epoch: int, tokens_per_sample: int) -> int:
    """The start offset of epoch ``epoch`` (> 1) under ``--train-stream-offset random``: uniform in [0, T),
    the same on every worker and on resume."""
    return int(np.random.default_rng([seed, epoch]).integers(tokens_per_sample))


BPTT_FULL_PROBABILITY = 0.95  # variable BPTT: base = T with this probability, else T / 2
BPTT_STD = 5.0  # standard deviation of a segment length around its base
BPTT_MIN = 5  # shortest segment (or T, if shorter)


def sample_bptt_lengths(rng: np.random.Generator, tokens_per_sample: int, count: int) -> np.ndarray:
    """``count`` variable-BPTT segment lengths (SHA-RNN / AWD-LSTM): base = T with probability 0.95, else T / 2;
    length = round(N(base, 5)) clipped to [5, T] (to [T, T] when T < 5). Returns (count,) int64."""
    full = rng.random(count) < BPTT_FULL_PROBABILITY  # (count,)
    base = np.where(full, float(tokens_per_sample), tokens_per_sample / 2.0)  # (count,)
    lengths = np.rint(rng.normal(base, BPTT_STD)).astype(np.int64)  # (count,)
    return np.clip(lengths, min(BPTT_MIN, tokens_per_sample), tokens_per_sample)


def variable_bptt_lengths(seed: int, epoch: int, tokens_per_sample: int, total: int) -> np.ndarray:
    """``--variable-bptt``: the segment lengths of epoch ``epoch``, enough to cover ``total`` targets of every
    stream (their sum is >= total); the same on every worker and on resume. Returns (m,) int64."""
    rng = np.random.default_rng([seed, epoch, 0xB977])  # a stream apart from train_stream_offset's
    parts: List[np.ndarray] = []
    covered = 0
    while covered < total:
        count = math.ceil((total - covered) / max(tokens_per_sample / 2.0, 1.0)) + 1  # usually one round
        part = sample_bptt_lengths(rng, tokens_per_sample, count)  # (count,)
        parts.append(part)
        covered += int(part.sum())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
