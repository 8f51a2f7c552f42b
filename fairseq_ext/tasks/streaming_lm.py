"""``streaming_lm``: language modelling over B contiguous streams, one dataset item = one (B, T) batch.

The split (fairseq-preprocess output) is one token stream cut into ``--batch-size`` streams per data-parallel
worker (``--batch-size-valid`` for validation); each batch is the next ``--tokens-per-sample`` tokens of every
stream (``fairseq_ext.data.StreamDataset``), in order and never shuffled, so a model that carries state across
segments (``fairseq_ext.models.base.StatefulDecoder``) reads each stream from start to end. ``--max-tokens`` does
not change the layout.

Boundaries: the "train" stream state is reset at every epoch start, the "eval" stream state at every validation
start and at the first segment of each validation subset; validation never touches the training state.
``fairseq-eval-lm --task streaming_lm`` is the streaming protocol ``stream(B=--batch-size, T=--tokens-per-sample,
cold)`` over the whole split; ``--context-window`` (the sliding-window protocol) is rejected.
After each optimizer step, every module that defines ``after_optimizer_step()`` is called (parameter clamps such
as adaptive-span values in [0, 1] go there, never into ``forward``).
"""

import glob
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from fairseq import utils
from fairseq.data import Dictionary, data_utils, iterators
from fairseq.data.indexed_dataset import get_available_dataset_impl
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II
from torch import Tensor, nn

from fairseq_ext.data import StreamDataset, concat_lines
from fairseq_ext.models.base import StatefulDecoder, reset_stream_state

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
    batch_size: Optional[int] = II("dataset.batch_size")
    dataset_impl: Optional[ChoiceEnum(get_available_dataset_impl())] = II("dataset.dataset_impl")


def dictionary_fingerprint(dictionary: Dictionary) -> Dict[str, Any]:
    """Size and SHA-1 of the symbol list: enough to tell two dictionaries apart."""
    digest = hashlib.sha1("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()
    return {"size": len(dictionary), "sha1": digest}


@register_task("streaming_lm", dataclass=StreamingLMConfig)
class StreamingLMTask(FairseqTask):
    """Train and evaluate LMs on contiguous streams; see the module docstring."""

    STATE_KEY = "dictionary_fingerprint"

    def __init__(self, cfg: StreamingLMConfig, dictionary: Dictionary) -> None:
        super().__init__(cfg)
        self.dictionary = dictionary
        self.state.merge_state_dict({self.STATE_KEY: dictionary_fingerprint(dictionary)})  # saved in checkpoints

    @classmethod
    def setup_task(cls, cfg: StreamingLMConfig, from_checkpoint: bool = False) -> "StreamingLMTask":
        if cfg.add_bos_token:
            raise ValueError("--task streaming_lm does not support --add-bos-token: a stream's first input is </s> "
                             "and segments continue each other without a <s>")
        if not cfg.data:
            raise ValueError("--task streaming_lm needs a data directory (fairseq-preprocess output); "
                             + PREPARE_HINT.format(path="data-bin/<corpus>"))
        path = utils.split_paths(cfg.data)[0]
        dict_path = os.path.join(path, "dict.txt")
        if not os.path.isfile(dict_path):
            raise FileNotFoundError(f"no fairseq data directory at {path} (missing {dict_path}); "
                                    + PREPARE_HINT.format(path=path))
        dictionary = Dictionary.load(dict_path)
        logger.info("dictionary: %d types", len(dictionary))
        return cls(cfg, dictionary)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Checkpoint task state: refuse a checkpoint whose dictionary differs from the data directory's."""
        saved, current = state_dict.get(self.STATE_KEY), dictionary_fingerprint(self.dictionary)
        if saved is not None and saved != current:
            raise ValueError(
                f"dictionary mismatch: the checkpoint was trained with a dictionary of {saved['size']} types "
                f"(sha1 {saved['sha1'][:12]}), but {self.cfg.data}/dict.txt has {current['size']} types "
                f"(sha1 {current['sha1'][:12]}); binarise the data with the training dictionary "
                f"(fairseq-preprocess --srcdict <training data dir>/dict.txt)")
        super().load_state_dict(state_dict)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False,
                     data_selector: Optional[Callable[..., Any]] = None,
                     tpu: bool = False, task_cfg: Optional[FairseqDataclass] = None) -> None:
        """Load ``split`` as one token stream. ``task_cfg`` (a checkpoint's task config, passed by
        fairseq-validate/generate) is not needed: the layout comes from this task's config."""
        if data_selector is not None or tpu:
            raise ValueError("--task streaming_lm supports neither data selectors nor TPUs")
        if self.cfg.batch_size is None:
            raise ValueError("--task streaming_lm needs --batch-size: the number of contiguous streams per worker")
        paths = utils.split_paths(self.cfg.data)
        data_path = paths[(epoch - 1) % len(paths)]
        split_path = os.path.join(data_path, split)
        lines = data_utils.load_indexed_dataset(split_path, self.dictionary, self.cfg.dataset_impl, combine=combine)
        if lines is None:
            available = sorted(os.path.basename(p)[:-len(".idx")] for p in glob.glob(os.path.join(data_path, "*.idx")))
            raise FileNotFoundError(f"split {split!r} not found in {data_path} (no {split}.bin/.idx); available "
                                    f"splits: {available or 'none'}; " + PREPARE_HINT.format(path=data_path))
        tokens = concat_lines(lines, len(self.dictionary))
        if len(tokens) and int(tokens.max()) >= len(self.dictionary):
            raise ValueError(f"{split_path} holds token id {int(tokens.max())} but {data_path}/dict.txt has only "
                             f"{len(self.dictionary)} types: the split was binarised with another dictionary")
        self.datasets[split] = StreamDataset(tokens, self.cfg.batch_size, self.cfg.tokens_per_sample,
                                             pad=self.dictionary.pad(), eos=self.dictionary.eos())
        logger.info("%s: %s tokens in %s lines", split_path, f"{len(tokens):,}", f"{len(lines):,}")

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
            raise ValueError("--task streaming_lm needs --batch-size (and --batch-size-valid for validation): the "
                             "number of contiguous streams per worker; --max-tokens does not set the layout")
        laid_out = dataset.with_layout(max_sentences, num_shards)
        if len(laid_out) == 0:
            raise ValueError("the split is empty: there is no token to stream")
        logger.info("streams: %d per worker x %d workers, %s tokens each, %d segments of T=%d",
                    max_sentences, num_shards, f"{laid_out.max_stream_length:,}", laid_out.num_segments,
                    laid_out.tokens_per_sample)
        return iterators.EpochBatchIterator(
            dataset=laid_out,
            collate_fn=laid_out.collater,
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
        """fairseq-eval-lm: the streaming protocol over the whole split, segments in order."""
        if context_window > 0:
            raise ValueError(CONTEXT_WINDOW_ERROR.format(window=context_window))
        if batch_size is None:
            raise ValueError("fairseq-eval-lm --task streaming_lm needs --batch-size: the number of evaluation "
                             "streams B (the protocol is stream(B, T=--tokens-per-sample))")
        logger.info("evaluation protocol: stream(B=%d, T=%d, cold), %s tokens scored",
                    batch_size, self.cfg.tokens_per_sample, f"{len(dataset.tokens):,}")
        return self.get_batch_iterator(
            dataset=dataset, max_sentences=batch_size, num_shards=num_shards, shard_id=shard_id,
            num_workers=num_workers, data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)

    def build_model(self, cfg: FairseqDataclass, from_checkpoint: bool = False) -> nn.Module:
        model = super().build_model(cfg, from_checkpoint)
        stateful = any(isinstance(module, StatefulDecoder) for module in model.modules())
        logger.info("%s %s", type(model).__name__, "carries state across segments" if stateful else
                    "is stateless: every segment is scored without context from earlier segments")
        return model

    def begin_epoch(self, epoch: int, model: nn.Module) -> None:
        reset_stream_state(model, "train")

    def begin_valid_epoch(self, epoch: int, model: nn.Module) -> None:
        reset_stream_state(model, "eval")

    def valid_step(self, sample: Dict[str, Any], model: nn.Module, criterion: Any) -> Tuple[Tensor, int, Dict]:
        if sample.get("segment") == 0:  # a validation subset starts: its streams start cold
            reset_stream_state(model, "eval")
        return super().valid_step(sample, model, criterion)

    def optimizer_step(self, optimizer: Any, model: nn.Module, update_num: int) -> None:
        super().optimizer_step(optimizer, model, update_num)
        for module in model.modules():
            if callable(getattr(module, "after_optimizer_step", None)):
                module.after_optimizer_step()

    @property
    def source_dictionary(self) -> Dictionary:
        return self.dictionary

    @property
    def target_dictionary(self) -> Dictionary:
        return self.dictionary
