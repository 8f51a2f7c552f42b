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

One module per concern beside this one: ``segment_lengths`` (--train-stream-offset, --variable-bptt),
``batch_split``, ``resume`` (stream cursors: a resumed run continues its training streams exactly),
``eval_protocol`` (protocol labels, evaluation warm-up, fairseq-eval-lm checks), ``dictionary_check``.
"""

import glob
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from fairseq import utils
from fairseq.data import Dictionary, data_utils, iterators
from fairseq.data.indexed_dataset import get_available_dataset_impl
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II
from torch import Tensor, nn

from fairseq_ext.data import StreamDataset, concat_lines
from fairseq_ext.errors import ConfigError, DataError, MissingFileError
from fairseq_ext.models.base import StatefulDecoder, reset_stream_state
from fairseq_ext.optim.bounds import clamp_parameters
from fairseq_ext.tasks.batch_split import split_train_step
from fairseq_ext.tasks.criterion_check import check_criterion, lm_loss_terms
from fairseq_ext.tasks.dictionary_check import STATE_KEY, DictionaryCheckedTask
from fairseq_ext.tasks.eval_protocol import (check_eval_lm, eval_warmup_tokens, protocol_label,
                                             reduce_warmup_metrics, run_warmup_segment, with_eval_warmup)
from fairseq_ext.tasks.resume import TrainCursorCollater, TrainStreamResume
from fairseq_ext.tasks.segment_lengths import train_stream_offset, variable_bptt_lengths

logger = logging.getLogger(__name__)

PREPARE_HINT = ("prepare it with scripts/prepare-<corpus>.sh, or binarise a corpus with "
                "fairseq-preprocess --only-source --trainpref ... --validpref ... --destdir {path}")


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


@register_task("streaming_lm", dataclass=StreamingLMConfig)
class StreamingLMTask(DictionaryCheckedTask, FairseqTask):
    """Train and evaluate LMs on contiguous streams; see the module docstring."""

    STATE_KEY = STATE_KEY

    def __init__(self, cfg: StreamingLMConfig, dictionary: Dictionary) -> None:
        super().__init__(cfg)
        self.dictionary = dictionary
        self.resume = TrainStreamResume()  # where the training streams end; a resumed run's first step
        self._split_decoders: Optional[Tuple[nn.Module, List[StatefulDecoder]]] = None  # (model, its decoders)
        self.batch_split = getattr(cfg, "batch_split", 1)  # absent from older checkpoints' task configs
        if self.batch_split < 1:
            raise ConfigError(f"--batch-split must be >= 1 (row slices per training batch), got {self.batch_split}")
        if cfg.tokens_per_sample < 1:
            raise ConfigError(f"--tokens-per-sample must be >= 1 (T, the tokens of every stream per batch), got "
                              f"{cfg.tokens_per_sample}")
        self.remember_dictionary()  # saved in checkpoints, checked when one is read
        requested = getattr(cfg, "eval_warmup_tokens", 0) or 0  # absent from older checkpoints' task configs
        length = cfg.tokens_per_sample
        self.eval_warmup_tokens = eval_warmup_tokens(requested, length)  # W, a multiple of T
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
        state[type(self).__name__]["train_stream_end"] = self.resume.end
        return state

    def set_checkpoint_dict(self, state: Dict[str, Any]) -> None:
        """fairseq-train resuming: refuse another dictionary; remember where the saved training streams end."""
        super().set_checkpoint_dict(state)
        self.resume.saved_end = state.get("train_stream_end")

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
            dataset = with_eval_warmup(dataset, self.eval_warmup_tokens, self.cfg.tokens_per_sample, split)
            logger.info("%s: evaluation split, %s", split, f"warm-up of {dataset.warmup_tokens} tokens "
                        "(unscored) before every stream" if dataset.warmup_tokens else "cold streams")
        self.datasets[split] = dataset

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
        return self._stream_iterator(dataset, max_sentences, seed, num_shards, shard_id, num_workers, epoch,
                                     data_buffer_size, skip_remainder_batch, evaluating=False)

    def _stream_iterator(self, dataset: StreamDataset, max_sentences: Optional[int], seed: int, num_shards: int,
                         shard_id: int, num_workers: int, epoch: int, data_buffer_size: int,
                         skip_remainder_batch: bool, evaluating: bool) -> iterators.EpochBatchIterator:
        """``get_batch_iterator``; ``evaluating`` (fairseq-eval-lm): no training-only layout (--variable-bptt) or
        stream cursors, whatever the split."""
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
            logger.info("%s: evaluation protocol %s", split, protocol_label(laid_out, getattr(self, "_memory", None)))
        if split == self.train_subset and epoch > 1 and getattr(self.cfg, "train_stream_offset", "none") == "random":
            offset = train_stream_offset(seed, epoch, laid_out.tokens_per_sample)
            laid_out = laid_out.with_start_offset(offset)
            logger.info("epoch %d: the training streams start %d tokens in (--train-stream-offset random)", epoch,
                        offset)
        training = split == self.train_subset and not evaluating
        if training and getattr(self.cfg, "variable_bptt", False):
            lengths = variable_bptt_lengths(seed, epoch, laid_out.tokens_per_sample, laid_out.max_stream_length)
            laid_out = laid_out.with_segment_lengths(lengths)
            widths = np.diff(laid_out.segment_offsets)  # (segments,)
            logger.info("epoch %d: variable BPTT, %d training segments of %d to %d tokens (mean %.1f, T=%d)", epoch,
                        laid_out.num_segments, int(widths.min()), int(widths.max()),
                        float(widths.mean()), laid_out.tokens_per_sample)
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
        check_eval_lm(dataset, batch_size, context_window)
        dataset = with_eval_warmup(dataset, self.eval_warmup_tokens, self.cfg.tokens_per_sample)
        logger.info("evaluation protocol: %s, %s tokens scored",
                    protocol_label(dataset.with_layout(batch_size, num_shards), getattr(self, "_memory", None)),
                    f"{len(dataset.tokens):,}")
        iterator = self._stream_iterator(dataset, batch_size, seed=1, num_shards=num_shards, shard_id=shard_id,
                                         num_workers=num_workers, epoch=1, data_buffer_size=data_buffer_size,
                                         skip_remainder_batch=False, evaluating=True)
        return iterator.next_epoch_itr(shuffle=False)

    def build_model(self, cfg: FairseqDataclass, from_checkpoint: bool = False) -> nn.Module:
        model = super().build_model(cfg, from_checkpoint)
        decoders = [module for module in model.modules() if isinstance(module, StatefulDecoder)]
        for decoder in decoders:
            decoder.attach_streams("streaming_lm")  # batches here are consecutive segments of the same streams
        stateful = bool(decoders)
        logger.info("%s %s", type(model).__name__, "carries state across segments" if stateful else
                    "is stateless: every segment is scored without context from earlier segments")
        self._lm_loss_terms = (type(model).__name__, lm_loss_terms(model))  # checked by build_criterion
        self._memory = decoders[0].memory_description if decoders else "none"  # for the protocol labels
        return model

    def build_criterion(self, cfg: FairseqDataclass, from_checkpoint: bool = False) -> nn.Module:
        criterion = super().build_criterion(cfg, from_checkpoint)
        model_name, terms = getattr(self, "_lm_loss_terms", ("the model", []))
        check_criterion(model_name, terms, criterion)
        return criterion

    def begin_epoch(self, epoch: int, model: nn.Module) -> None:
        reset_stream_state(model, "train")
        self.resume.begin_epoch(model)

    def train_step(self, sample: Dict[str, Any], model: nn.Module, criterion: Any, optimizer: Any,
                   update_num: int, ignore_grad: bool = False) -> Tuple[Tensor, int, Dict]:
        self.resume.before_step(sample)
        if self.batch_split == 1 or not sample:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        step = super().train_step  # --batch-split K: K row slices in turn (fairseq_ext.tasks.batch_split)
        return split_train_step(lambda rows: step(rows, model, criterion, optimizer, update_num, ignore_grad),
                                sample, model, criterion, self._decoders_of(model), self.batch_split,
                                self.dictionary.pad())

    def gather_for_checkpoint(self, model: nn.Module, group: Any) -> None:
        """Before a save with several data-parallel workers (every rank; ``fairseq_ext.compat.checkpoints``):
        collect every worker's training streams on rank 0, so the checkpoint resumes all of them exactly."""
        for decoder in self._decoders_of(model):
            decoder.gather_train_stream(group)

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
            return run_warmup_segment(sample, model)
        return super().valid_step(sample, model, criterion)

    def reduce_metrics(self, logging_outputs: List[Dict[str, Any]], criterion: Any) -> None:
        """Warm-up steps log only a weightless ``loss`` (``eval_protocol.reduce_warmup_metrics``)."""
        if not reduce_warmup_metrics(logging_outputs):
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
