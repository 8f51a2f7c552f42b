"""``streaming_lm``: language modelling over B contiguous streams, one dataset item = one (B, T) batch.

The split (fairseq-preprocess output) is one token stream cut into ``--batch-size`` streams per data-parallel
worker (``--batch-size-valid`` for validation); each batch is the next ``--tokens-per-sample`` tokens of every
stream (``fairseq_ext.data.StreamDataset``), in order and never shuffled, so a model that carries state across
segments (``fairseq_ext.models.base.StatefulDecoder``) reads each stream from start to end. ``--max-tokens`` does
not change the layout.

Boundaries: the "train" stream state is reset at every epoch start, the "eval" stream state at every validation
start and at the first segment of each validation subset; validation never touches the training state.

Evaluation protocols (validation subsets, ``fairseq-validate`` and ``fairseq-eval-lm``; never the training subset):

* ``stream(B, T, cold)`` (default, the original Transformer-XL ``eval.py``): every stream starts with an empty
  state, and its first tokens, scored with little context, count.
* ``stream(B, T, warm-up W tokens unscored)`` with ``--eval-warmup-tokens W`` (NVIDIA's Transformer-XL
  ``eval.py``; pass the evaluation mem_len): W is rounded up to a multiple of T, and every stream is prefixed with
  the W tokens that precede it in the split (stream 0: the end of the split). The warm-up segments fill the state
  but are not scored (``valid_step`` runs the model and reports nothing; ``fairseq-eval-lm`` sees pad targets), and
  every token is still scored exactly once, in its own stream.

B is the total number of streams (``--batch-size`` / ``--batch-size-valid`` times the data-parallel workers).
``fairseq-eval-lm --task streaming_lm`` evaluates the whole split with one of these protocols and logs its label;
``--context-window`` (the sliding-window protocol) is rejected.
After each optimizer step, the parameters that modules declare with ``parameter_bounds()`` are clamped, together with
their fp32 master copies under ``--fp16``/``--bf16`` (``fairseq_ext.optim.bounds``; e.g. adaptive-span z in [0, 1]),
never inside ``forward``.
``--variable-bptt`` cuts the training streams into segments of SHA-RNN / AWD-LSTM random lengths (about T with
probability 0.95, else about T/2; at most T), the same for every stream of a batch and drawn per (seed, epoch), so
every worker and a resumed run read the same segments; validation and evaluation keep T.
``--batch-split K`` runs every training batch as K row slices (forward and backward each, the carried state sliced
the same way and joined back in row order): the same losses, gradients and carried state as K = 1, with less
peak memory (the original adaptive-span trainer's micro-batching). Validation and evaluation are not split.
"""

import contextlib
import glob
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.data import Dictionary, data_utils, iterators
from fairseq.data.indexed_dataset import get_available_dataset_impl
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.distributed import FullyShardedDataParallel
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II
from torch import Tensor, nn

from fairseq_ext.criterions.lm_loss import STAT_COUNT, STAT_PREFIX
from fairseq_ext.data import StreamDataset, concat_lines
from fairseq_ext.errors import ConfigError, DataError, MissingFileError
from fairseq_ext.models.base import StatefulDecoder, reset_stream_state
from fairseq_ext.optim.bounds import clamp_parameters
from fairseq_ext.tasks.dictionary_check import (  # noqa: F401  (dictionary_fingerprint: used by the converters)
    STATE_KEY, DictionaryCheckedTask, dictionary_fingerprint)

logger = logging.getLogger(__name__)

PREPARE_HINT = ("prepare it with scripts/prepare-<corpus>.sh, or binarise a corpus with "
                "fairseq-preprocess --only-source --trainpref ... --validpref ... --destdir {path}")
CONTEXT_WINDOW_ERROR = (
    "--task streaming_lm evaluates contiguous streams with carried state and does not support --context-window "
    "{window} (the sliding-window protocol). For streaming evaluation omit --context-window (protocol "
    "stream(B=--batch-size, T=--tokens-per-sample)); for a stateless model's sliding-window evaluation use "
    "--task language_modeling --context-window N."
)


@dataclass
class StreamingLMConfig(FairseqDataclass):
    data: Optional[str] = field(
        default=None,
        metadata={"help": "path to data directory (fairseq-preprocess output: dict.txt, <split>.bin/.idx); "
                          "several paths separated by ':' are read round-robin, one per epoch"})
    tokens_per_sample: int = field(
        default=1024,
        metadata={"help": "T: tokens of every stream per batch (segment length); the number of streams B is "
                          "--batch-size (--batch-size-valid for validation) per data-parallel worker"})
    max_target_positions: Optional[int] = field(
        default=None,
        metadata={"help": "max number of tokens in the target sequence (read by fairseq LM model configs)"})
    add_bos_token: bool = field(
        default=False,
        metadata={"help": "unsupported: a stream starts with </s> as input, like fairseq's language_modeling; "
                          "present because fairseq LM model configs read task.add_bos_token"})
    eval_warmup_tokens: int = field(
        default=0,
        metadata={"help": "evaluation only (validation subsets, fairseq-validate, fairseq-eval-lm; never the "
                          "training subset): prefix every stream with this many tokens of the text preceding it, "
                          "rounded up to a multiple of --tokens-per-sample, which fill the model's state but are "
                          "not scored (NVIDIA's Transformer-XL warm-up protocol; pass the evaluation mem_len). "
                          "0: cold streams (the original Transformer-XL protocol)"})
    batch_split: int = field(
        default=1,
        metadata={"help": "training only: run every batch as K row slices of its --batch-size streams (forward and "
                          "backward per slice, carried state sliced and joined back), numerically equivalent to "
                          "K=1 with less peak memory; slices differ by at most one stream when K does not divide "
                          "--batch-size; needs K <= --batch-size. Validation and evaluation are not split"})
    train_stream_offset: ChoiceEnum(["none", "random"]) = field(
        default="none",
        metadata={"help": "training only: 'random' starts every epoch after the first at a random offset in "
                          "[0, --tokens-per-sample) of every stream (its first targets are skipped that epoch), as "
                          "the original adaptive-span trainer does when its streams wrap, so segment boundaries "
                          "move between epochs (seeded by --seed and the epoch); 'none': the same boundaries "
                          "every epoch"})
    variable_bptt: bool = field(
        default=False,
        metadata={"help": "training only: SHA-RNN / AWD-LSTM variable BPTT: every training segment (the same for "
                          "all streams of the batch) is round(N(base, 5)) tokens long, clipped to [5, "
                          "--tokens-per-sample], with base = --tokens-per-sample with probability 0.95, else half "
                          "of it; drawn per epoch from --seed and the epoch (the same on every worker and on "
                          "resume); the learning rate is not rescaled by the length. Validation and evaluation "
                          "keep --tokens-per-sample"})
    batch_size: Optional[int] = II("dataset.batch_size")
    dataset_impl: Optional[ChoiceEnum(get_available_dataset_impl())] = II("dataset.dataset_impl")
    train_subset: str = II("dataset.train_subset")


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


def protocol_label(dataset: StreamDataset) -> str:
    """``stream(B=…, T=…, cold)`` or ``stream(B=…, T=…, warm-up W tokens unscored)``; B counts every stream."""
    warmup = (f"warm-up {dataset.warmup_tokens} tokens unscored" if dataset.warmup_tokens else "cold")
    return f"stream(B={dataset.batch_size * dataset.num_shards}, T={dataset.tokens_per_sample}, {warmup})"


def stream_cursor(layout: StreamDataset, segment: int) -> Dict[str, int]:
    """Where scored segment ``segment`` of ``layout`` starts: the target offset in every stream (the same for every
    stream and worker), the number of streams and the split length. Two cursors are equal exactly when a state
    carried to the one continues the text at the other."""
    return {"streams": layout.batch_size * layout.num_shards, "tokens": len(layout.tokens),
            "offset": layout.start_offset + layout.segment_start(segment)}


def cursor_mismatch(saved: Optional[Dict[str, int]], here: Dict[str, int]) -> Optional[str]:
    """Why training at cursor ``here`` does not continue a state that ended at ``saved`` (None: it does)."""
    if saved == here:
        return None
    if saved is None:
        return "the checkpoint records no position of its training streams"
    if saved["streams"] != here["streams"]:
        return (f"the training data is now cut into {here['streams']} streams (--batch-size x workers), the "
                f"checkpoint's into {saved['streams']}")
    if saved["tokens"] != here["tokens"]:
        return f"the training split now has {here['tokens']:,} tokens, the checkpoint's had {saved['tokens']:,}"
    return (f"training resumes at token {here['offset']:,} of every stream but the saved state ends at token "
            f"{saved['offset']:,} (--tokens-per-sample, --variable-bptt, --train-stream-offset or the data "
            f"loader changed)")


class TrainCursorCollater:
    """The training collater: ``layout``'s batch plus ``sample["stream_cursor"]``, the cursors of the segment's
    start and end (``stream_cursor``), so that the task can tell whether a saved state continues into it."""

    def __init__(self, layout: StreamDataset) -> None:
        self.layout = layout

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        sample = self.layout.collater(items)
        if sample:
            segment = sample["segment"]
            sample["stream_cursor"] = {"start": stream_cursor(self.layout, segment),
                                       "end": stream_cursor(self.layout, segment + 1)}
        return sample


def row_slices(batch_size: int, parts: int) -> List[Tuple[int, int]]:
    """``--batch-split``: [start, stop) of ``parts`` consecutive row slices of a batch, sizes as
    ``torch.tensor_split`` (the first ``batch_size % parts`` slices have one more row)."""
    if parts > batch_size:
        raise ConfigError(f"--batch-split {parts} exceeds the {batch_size} streams of a training batch (--batch-size "
                          f"per worker): every slice needs at least one stream; use --batch-split <= {batch_size} "
                          f"or a larger --batch-size")
    bounds, start = [], 0
    for index in range(parts):
        stop = start + batch_size // parts + (1 if index < batch_size % parts else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def sample_rows(sample: Dict[str, Any], start: int, stop: int, pad: int) -> Dict[str, Any]:
    """Rows [start, stop) of a streaming batch: every tensor (``id`` (B,), ``net_input.src_tokens`` (B, T),
    ``net_input.src_lengths`` (B,), ``target`` (B, T), ...) is cut on its batch dimension, other values (``segment``,
    ``warmup``) are kept, and ``ntokens`` / ``nsentences`` are recounted for the slice."""
    batch_size = sample["net_input"]["src_tokens"].size(0)

    def cut(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: cut(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, Tensor):
            if value.dim() == 0 or value.size(0) != batch_size:
                raise ValueError(f"--batch-split: sample[{key!r}] of shape {tuple(value.shape)} is not one row per "
                                 f"stream (B = {batch_size}); cannot slice it")
            return value[start:stop]
        return value

    rows = {key: cut(value, key) for key, value in sample.items()}
    rows["nsentences"] = stop - start
    rows["ntokens"] = int(rows["target"].ne(pad).sum())
    return rows


def merge_slice_logging_outputs(logging_outputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One logging output for a batch from its row slices' (``--batch-split``): values are summed per key (losses,
    token and sentence counts and sample sizes are sums over rows), except ``lm_loss``'s module statistics
    (``stat:*``, averages over modules that the criterion counts once per batch in ``stat_count``), which are
    averaged over the slices so that the batch still counts once, as with K = 1."""
    merged: Dict[str, Any] = {}
    for logging_output in logging_outputs:
        for key, value in logging_output.items():
            merged[key] = merged[key] + value if key in merged else value
    parts = len(logging_outputs)
    for key in merged:
        if key.startswith(STAT_PREFIX):
            merged[key] = merged[key] / parts
        elif key == STAT_COUNT:
            merged[key] = merged[key] // parts if merged[key] % parts == 0 else merged[key] / parts
    return merged


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Data-parallel wrappers' ``no_sync`` (gradients accumulate locally; fairseq's trainer does the same between
    --update-freq micro-batches), except under FSDP, where fairseq prefers the communication to the memory."""
    if hasattr(model, "no_sync") and not isinstance(model, FullyShardedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


@register_task("streaming_lm", dataclass=StreamingLMConfig)
class StreamingLMTask(DictionaryCheckedTask, FairseqTask):
    """Train and evaluate LMs on contiguous streams; see the module docstring."""

    STATE_KEY = STATE_KEY
    WARMUP_KEY = "warmup_segment"  # logging output of a warm-up valid_step

    def __init__(self, cfg: StreamingLMConfig, dictionary: Dictionary) -> None:
        super().__init__(cfg)
        self.dictionary = dictionary
        self._resumable: List[StatefulDecoder] = []  # see begin_epoch / train_step
        self._resume_cursor: Optional[Dict[str, int]] = None  # where a loaded checkpoint's train streams end
        self._train_cursor: Optional[Dict[str, int]] = None  # where the train streams end after the last step
        self._split_decoders: Optional[Tuple[nn.Module, List[StatefulDecoder]]] = None  # (model, its decoders)
        self._evaluating = False  # inside eval_lm_dataloader: no training-only layout (--variable-bptt)
        self.batch_split = getattr(cfg, "batch_split", 1)  # absent from older checkpoints' task configs
        if self.batch_split < 1:
            raise ConfigError(f"--batch-split must be >= 1 (row slices per training batch), got {self.batch_split}")
        if cfg.tokens_per_sample < 1:
            raise ConfigError(f"--tokens-per-sample must be >= 1 (T, the tokens of every stream per batch), got "
                              f"{cfg.tokens_per_sample}")
        self.remember_dictionary()  # saved in checkpoints, checked when one is read
        requested = getattr(cfg, "eval_warmup_tokens", 0) or 0  # absent from older checkpoints' task configs
        if requested < 0:
            raise ConfigError(f"--eval-warmup-tokens must be >= 0, got {requested}: pass the evaluation mem_len for "
                              f"NVIDIA's warm-up protocol, or 0 (the default) for cold streams")
        length = cfg.tokens_per_sample
        self.eval_warmup_tokens = math.ceil(requested / length) * length  # W, a multiple of T
        if self.eval_warmup_tokens:
            logger.info("evaluation warm-up: --eval-warmup-tokens %d rounded up to %d (%d segments of T=%d), "
                        "run before every evaluation stream and not scored", requested, self.eval_warmup_tokens,
                        self.eval_warmup_tokens // length, length)

    @property
    def train_subset(self) -> str:
        """The training split (``--train-subset``): the one split that never gets an evaluation warm-up."""
        return getattr(self.cfg, "train_subset", None) or "train"

    @classmethod
    def setup_task(cls, cfg: StreamingLMConfig, from_checkpoint: bool = False) -> "StreamingLMTask":
        if cfg.add_bos_token:
            raise ConfigError("--task streaming_lm does not support --add-bos-token: a stream's first input is </s> "
                              "and segments continue each other without a <s>")
        if not cfg.data:
            raise ConfigError("--task streaming_lm needs a data directory (fairseq-preprocess output); "
                              + PREPARE_HINT.format(path="data-bin/<corpus>"))
        path = utils.split_paths(cfg.data)[0]
        dict_path = os.path.join(path, "dict.txt")
        if not os.path.isfile(dict_path):
            raise MissingFileError(f"no fairseq data directory at {path} (missing {dict_path}); "
                                   + PREPARE_HINT.format(path=path))
        dictionary = Dictionary.load(dict_path)
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary)

    @property
    def data_path(self) -> str:
        return utils.split_paths(self.cfg.data)[0]

    def get_checkpoint_dict(self) -> Dict[str, Dict[str, Any]]:
        """fairseq-train's task extra state: the dictionary fingerprint and where the training streams end (rank 0
        writes it; every rank is at the same segment)."""
        state = super().get_checkpoint_dict()
        state[type(self).__name__]["train_stream_end"] = self._train_cursor
        return state

    def set_checkpoint_dict(self, state: Dict[str, Any]) -> None:
        """fairseq-train resuming: refuse another dictionary; remember where the saved training streams end."""
        super().set_checkpoint_dict(state)
        self._resume_cursor = state.get("train_stream_end")

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False,
                     data_selector: Optional[Callable[..., Any]] = None,
                     tpu: bool = False, task_cfg: Optional[FairseqDataclass] = None) -> None:
        """Load ``split`` as one token stream; every split but the training subset (``--train-subset``) gets the
        evaluation warm-up. ``task_cfg`` (a checkpoint's task config, passed by fairseq-validate/generate) is not
        needed: the layout comes from this task's config."""
        if data_selector is not None or tpu:
            raise ConfigError("--task streaming_lm supports neither data selectors nor TPUs")
        if self.cfg.batch_size is None:
            raise ConfigError("--task streaming_lm needs --batch-size: the number of contiguous streams per worker")
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)]
        split_path = os.path.join(data_path, split)
        lines = data_utils.load_indexed_dataset(split_path, self.dictionary, self.cfg.dataset_impl, combine=combine)
        if lines is None:
            available = sorted(os.path.basename(p)[:-len(".idx")] for p in glob.glob(os.path.join(data_path, "*.idx")))
            raise MissingFileError(f"split {split!r} not found in {data_path} (no {split}.bin/.idx); available "
                                   f"splits: {available or 'none'}; " + PREPARE_HINT.format(path=data_path))
        tokens = concat_lines(lines, len(self.dictionary))  # DataError for an id beyond the dictionary
        dataset = StreamDataset(tokens, self.cfg.batch_size, self.cfg.tokens_per_sample,
                                pad=self.dictionary.pad(), eos=self.dictionary.eos())
        logger.info("%s: %s tokens in %s lines", split_path, f"{len(tokens):,}", f"{len(lines):,}")
        if split != self.train_subset:  # an evaluation split: validation subsets, fairseq-validate, eval-lm
            dataset = self.with_eval_warmup(dataset, split)
            logger.info("%s: evaluation split, %s", split, f"warm-up of {dataset.warmup_tokens} tokens "
                        "(unscored) before every stream" if dataset.warmup_tokens else "cold streams")
        self.datasets[split] = dataset

    def with_eval_warmup(self, dataset: StreamDataset, split: str = "the evaluation split") -> StreamDataset:
        """``dataset`` with the evaluation warm-up W = --eval-warmup-tokens rounded up to a multiple of T."""
        if self.eval_warmup_tokens > len(dataset.tokens):
            raise ConfigError(f"--eval-warmup-tokens {self.eval_warmup_tokens} (rounded up to a multiple of "
                              f"--tokens-per-sample {self.cfg.tokens_per_sample}) exceeds {split} "
                              f"({len(dataset.tokens):,} tokens): the warm-up would repeat the split; lower "
                              f"--eval-warmup-tokens to at most the split length or evaluate a longer split")
        return dataset.with_warmup(self.eval_warmup_tokens)

    def get_batch_iterator(self, dataset: StreamDataset, max_tokens: Optional[int] = None,
                           max_sentences: Optional[int] = None, max_positions: Any = None,
                           ignore_invalid_inputs: bool = False, required_batch_size_multiple: int = 1,
                           seed: int = 1, num_shards: int = 1, shard_id: int = 0, num_workers: int = 0,
                           epoch: int = 1, data_buffer_size: int = 0, disable_iterator_cache: bool = False,
                           skip_remainder_batch: bool = False, grouped_shuffling: bool = False,
                           update_epoch_batch_itr: bool = False) -> iterators.EpochBatchIterator:
        """One item per batch, in order: shard ``shard_id`` gets segments 0, 1, ... of its ``max_sentences``
        streams. The layout is fixed by B = ``max_sentences`` and T, so ``max_tokens``, ``max_positions``,
        ``ignore_invalid_inputs``, ``required_batch_size_multiple`` and the shuffling/caching options are unused;
        a fresh iterator is built on every call."""
        if not isinstance(dataset, StreamDataset):
            raise TypeError(f"--task streaming_lm iterates StreamDatasets, got {type(dataset).__name__}")
        if max_sentences is None:
            raise ConfigError("--task streaming_lm needs --batch-size (and --batch-size-valid for validation): the "
                              "number of contiguous streams per worker; --max-tokens does not set the layout")
        laid_out = dataset.with_layout(max_sentences, num_shards)
        if laid_out.num_scored_segments == 0:
            raise DataError("the split is empty: there is no token to stream")
        streams = max_sentences * num_shards
        if streams > len(laid_out.tokens):
            raise ConfigError(f"{max_sentences} streams per worker x {num_shards} worker(s) = {streams:,} streams, but "
                              f"the split has only {len(laid_out.tokens):,} tokens: every stream needs at least one; "
                              f"use --batch-size (--batch-size-valid for validation) <= "
                              f"{max(1, len(laid_out.tokens) // num_shards):,}")
        logger.info("streams: %d per worker x %d workers, %s tokens each, %d segments of T=%d%s",
                    max_sentences, num_shards, f"{laid_out.max_stream_length:,}", laid_out.num_segments,
                    laid_out.tokens_per_sample, f" ({laid_out.warmup_segments} of them warm-up, unscored)"
                    if laid_out.warmup_segments else "")
        split = next((name for name, loaded in self.datasets.items() if loaded is dataset), None)
        if split is not None and split != self.train_subset:
            logger.info("%s: evaluation protocol %s", split, protocol_label(laid_out))
        if split == self.train_subset and epoch > 1 and getattr(self.cfg, "train_stream_offset", "none") == "random":
            offset = train_stream_offset(seed, epoch, laid_out.tokens_per_sample)
            laid_out = laid_out.with_start_offset(offset)
            logger.info("epoch %d: the training streams start %d tokens in (--train-stream-offset random)", epoch,
                        offset)
        if split == self.train_subset and not self._evaluating and getattr(self.cfg, "variable_bptt", False):
            lengths = variable_bptt_lengths(seed, epoch, laid_out.tokens_per_sample, laid_out.max_stream_length)
            laid_out = laid_out.with_segment_lengths(lengths)
            widths = np.diff(laid_out.segment_offsets)  # (segments,)
            logger.info("epoch %d: variable BPTT, %d training segments of %d to %d tokens (mean %.1f, T=%d)", epoch,
                        laid_out.num_segments, int(widths.min()), int(widths.max()),
                        float(widths.mean()), laid_out.tokens_per_sample)
        training = split == self.train_subset and not self._evaluating
        return iterators.EpochBatchIterator(
            dataset=laid_out,
            collate_fn=TrainCursorCollater(laid_out) if training else laid_out.collater,
            batch_sampler=[[index] for index in range(len(laid_out))],
            seed=seed,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            disable_shuffling=True,
            skip_remainder_batch=skip_remainder_batch,
        )

    def eval_lm_dataloader(self, dataset: StreamDataset, max_tokens: Optional[int] = 36000,
                           batch_size: Optional[int] = None, max_positions: Any = None, num_shards: int = 1,
                           shard_id: int = 0, num_workers: int = 1, data_buffer_size: int = 10,
                           context_window: int = 0) -> iterators.CountingIterator:
        """fairseq-eval-lm: the streaming protocol over the whole split, segments in order, with the evaluation
        warm-up (``--eval-warmup-tokens``) whatever the split."""
        if context_window > 0:
            raise ConfigError(CONTEXT_WINDOW_ERROR.format(window=context_window))
        if batch_size is None:
            raise ConfigError("fairseq-eval-lm --task streaming_lm needs --batch-size: the number of evaluation "
                              "streams B (the protocol is stream(B, T=--tokens-per-sample))")
        if not isinstance(dataset, StreamDataset):
            raise TypeError(f"--task streaming_lm evaluates StreamDatasets, got {type(dataset).__name__}")
        dataset = self.with_eval_warmup(dataset)
        logger.info("evaluation protocol: %s, %s tokens scored",
                    protocol_label(dataset.with_layout(batch_size, num_shards)), f"{len(dataset.tokens):,}")
        self._evaluating = True
        try:
            iterator = self.get_batch_iterator(
                dataset=dataset, max_sentences=batch_size, num_shards=num_shards, shard_id=shard_id,
                num_workers=num_workers, data_buffer_size=data_buffer_size,
            )
        finally:
            self._evaluating = False
        return iterator.next_epoch_itr(shuffle=False)

    def build_model(self, cfg: FairseqDataclass, from_checkpoint: bool = False) -> nn.Module:
        model = super().build_model(cfg, from_checkpoint)
        decoders = [module for module in model.modules() if isinstance(module, StatefulDecoder)]
        for decoder in decoders:
            decoder.attach_streams("streaming_lm")  # batches here are consecutive segments of the same streams
        stateful = bool(decoders)
        logger.info("%s %s", type(model).__name__, "carries state across segments" if stateful else
                    "is stateless: every segment is scored without context from earlier segments")
        return model

    def begin_epoch(self, epoch: int, model: nn.Module) -> None:
        reset_stream_state(model, "train")
        self._train_cursor = None
        # decoders holding a checkpoint's training streams (fairseq loads the checkpoint before the epoch begins)
        self._resumable = [m for m in model.modules() if isinstance(m, StatefulDecoder) and m.has_saved_train_stream]

    def train_step(self, sample: Dict[str, Any], model: nn.Module, criterion: Any, optimizer: Any,
                   update_num: int, ignore_grad: bool = False) -> Tuple[Tensor, int, Dict]:
        cursor = sample.get("stream_cursor") if sample else None
        if self._resumable and cursor is not None:  # a resumed run's first step
            self._resume_train_streams(sample["segment"], cursor["start"])
        if cursor is not None:
            self._train_cursor = cursor["end"]
        if self.batch_split == 1 or not sample:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        return self._split_train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def _resume_train_streams(self, segment: int, here: Dict[str, int]) -> None:
        """Continue the checkpoint's training streams if this step reads the text right after where they ended
        (same streams, same split, same token offset); otherwise they start cold, and the log says why."""
        reason = cursor_mismatch(self._resume_cursor, here)
        for decoder in self._resumable:
            if reason is None:
                decoder.resume_train_stream(segment)
            else:
                decoder.discard_saved_train_stream(reason)
        self._resumable = []

    def gather_for_checkpoint(self, model: nn.Module, group: Any) -> None:
        """Before a save with several data-parallel workers (every rank; ``fairseq_ext.compat.checkpoints``):
        collect every worker's training streams on rank 0, so the checkpoint resumes all of them exactly."""
        for decoder in self._decoders_of(model):
            decoder.gather_train_stream(group)

    def _split_train_step(self, sample: Dict[str, Any], model: nn.Module, criterion: Any, optimizer: Any,
                          update_num: int, ignore_grad: bool) -> Tuple[Tensor, int, Dict]:
        """``--batch-split K``: forward and backward on K row slices of the batch in turn, each StatefulDecoder
        continuing the same rows of its "train" state (``stream_rows``). The criterion's losses, sample sizes and
        logging outputs are sums over rows, so their sums over the slices are the whole batch's, and fairseq's
        division of the summed gradient by the summed sample size is unchanged."""
        if not criterion.logging_outputs_can_be_summed():
            raise ConfigError(f"--batch-split needs a criterion whose logging outputs are sums over rows; "
                              f"{type(criterion).__name__}'s cannot be summed: use --batch-split 1 or lm_loss")
        batch_size = sample["net_input"]["src_tokens"].size(0)
        bounds = row_slices(batch_size, self.batch_split)
        decoders = self._decoders_of(model)
        losses: List[Tensor] = []
        sample_size, logging_outputs = 0, []
        for index, (start, stop) in enumerate(bounds):
            with contextlib.ExitStack() as stack:
                for decoder in decoders:
                    stack.enter_context(decoder.stream_rows(start, stop, batch_size))
                if index < len(bounds) - 1:  # data parallel: all-reduce once, after the last slice
                    stack.enter_context(_no_sync(model))
                loss, size, logging_output = super().train_step(
                    sample_rows(sample, start, stop, self.dictionary.pad()), model, criterion, optimizer,
                    update_num, ignore_grad)
            losses.append(loss.detach())
            sample_size += size
            logging_outputs.append(logging_output)
        return torch.stack(losses).sum(), sample_size, merge_slice_logging_outputs(logging_outputs)

    def _decoders_of(self, model: nn.Module) -> List[StatefulDecoder]:
        """The StatefulDecoders inside ``model`` (wrappers included), walked once per model."""
        if self._split_decoders is None or self._split_decoders[0] is not model:
            self._split_decoders = (model, [m for m in model.modules() if isinstance(m, StatefulDecoder)])
        return self._split_decoders[1]

    def begin_valid_epoch(self, epoch: int, model: nn.Module) -> None:
        reset_stream_state(model, "eval")

    def valid_step(self, sample: Dict[str, Any], model: nn.Module, criterion: Any) -> Tuple[Tensor, int, Dict]:
        """Score one segment; a warm-up segment only runs the model (filling the "eval" state) and scores nothing."""
        if sample.get("segment") == 0:  # a validation subset starts (its first warm-up segment, if any): reset
            reset_stream_state(model, "eval")
        if sample.get("warmup"):
            model.eval()
            with torch.no_grad():
                model(**sample["net_input"])
            logging_output = {self.WARMUP_KEY: 1, "ntokens": 0, "nsentences": 0, "sample_size": 0}
            return torch.zeros(()), 0, logging_output
        return super().valid_step(sample, model, criterion)

    def reduce_metrics(self, logging_outputs: List[Dict[str, Any]], criterion: Any) -> None:
        """A warm-up step logs nothing but a weightless ``loss``: the criterion has nothing to reduce (and some
        divide by the sample size), and without a ``loss`` key fairseq's trainer would log loss = -1 with weight 1
        into the validation average."""
        if logging_outputs and all(log.get(self.WARMUP_KEY, 0) > 0 for log in logging_outputs):
            metrics.log_scalar("loss", 0.0, weight=0, round=3)
            return
        super().reduce_metrics(logging_outputs, criterion)

    def optimizer_step(self, optimizer: Any, model: nn.Module, update_num: int) -> None:
        super().optimizer_step(optimizer, model, update_num)
        clamp_parameters(model, optimizer)

    @property
    def source_dictionary(self) -> Dictionary:
        return self.dictionary

    @property
    def target_dictionary(self) -> Dictionary:
        return self.dictionary
