"""``fairseq_ext.hub``: load any checkpoint of this project (trained here or converted from an original) and score,
stream or sample text, the same way for every family.

    import fairseq_ext.hub as hub
    lm = hub.load("checkpoints/transformer_xl")            # a checkpoint file, or a directory holding one
    lm.score("the cat sat")["log_probs"]                   # per-token log-probs, identical on every call
    lm.score_document(open("valid.txt").read())            # the streaming evaluation of fairseq-eval-lm
    lm.sample("the cat", max_new_tokens=20, seed=0)        # incremental decoding

Text is what ``fairseq-preprocess`` read: one sequence per line, symbols separated by whitespace; every line ends in
``</s>``, and the lines of a text are one token stream x_0 .. x_{n-1} whose first input is ``</s>`` (the layout of
``streaming_lm``). Unknown symbols become ``<unk>``.

Protocols (``score_document``; each result names its own):

* ``stream``: segments of T = ``tokens_per_sample`` tokens, read in order by one stream (B = 1) from a cold state.
  A memory model carries its state across segments: this is ``fairseq-eval-lm --task streaming_lm --batch-size 1``.
  A stateless model reads every segment alone: ``nonoverlap(T)``.
* ``sliding`` (stateless models only): blocks of T - C targets, each read after the C tokens before it
  (``fairseq-eval-lm --task language_modeling --context-window C``): ``sliding(L=T, S=T-C)``.

State never outlives a call: every call starts cold, and the model's stream state is reset when it returns.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fairseq_ext.errors import ConfigError, MissingFileError

CHECKPOINT_NAMES = ("checkpoint_best.pt", "checkpoint_last.pt", "model.pt")
PROTOCOLS = ("stream", "sliding")
Result = Dict[str, Any]


def load(path: str, data: Optional[str] = None, device: Union[str, torch.device, None] = None,
         overrides: Optional[Dict[str, Any]] = None) -> "LanguageModel":
    """A checkpoint file, or a directory holding ``checkpoint_best.pt`` / ``checkpoint_last.pt`` / ``model.pt``.

    ``data``: the directory with the training dictionary ``dict.txt`` (default: the checkpoint's directory if it
    holds one, else the data directory the checkpoint was trained on). ``overrides``: model/task settings, as
    ``--model-overrides`` (e.g. ``{"mem_len": 1600}``). ``device``: default CUDA when available, else CPU.
    """
    from fairseq import checkpoint_utils
    from fairseq.dataclass.utils import overwrite_args_by_name

    checkpoint = _checkpoint_file(path)
    state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
    data_dir = _data_dir(checkpoint, data, state)
    arg_overrides = {"data": data_dir, **(overrides or {})}
    # load_model_ensemble_and_task applies arg_overrides only when it reads the file itself: with a state given, the
    # checkpoint's own data directory (gone on another machine) would be used, so the state's config is overridden
    # here as load_checkpoint_to_cpu does
    if state.get("cfg") is not None:
        overwrite_args_by_name(state["cfg"], arg_overrides)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides=arg_overrides,
                                                                      state=state)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return LanguageModel(models[0], task.target_dictionary, int(cfg.task.tokens_per_sample), device)


def _checkpoint_file(path: str) -> str:
    if os.path.isdir(path):
        for name in CHECKPOINT_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise MissingFileError(f"{path} holds none of {', '.join(CHECKPOINT_NAMES)}: pass the checkpoint file")
    if not os.path.isfile(path):
        raise MissingFileError(f"no checkpoint at {path}: pass a checkpoint file or the directory holding it")
    return path


def _data_dir(checkpoint: str, data: Optional[str], state: Dict[str, Any]) -> str:
    if data is not None:
        if not os.path.isfile(os.path.join(data, "dict.txt")):
            raise MissingFileError(f"data={data!r} holds no dict.txt: pass the data-bin directory the model was "
                                   f"trained on (or one with its dictionary)")
        return data
    candidates = [os.path.dirname(os.path.abspath(checkpoint))]
    cfg = state.get("cfg")
    trained_on = cfg.get("task", {}).get("data") if cfg is not None else None
    if trained_on:
        candidates.append(str(trained_on).split(":")[0])
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "dict.txt")):
            return candidate
    raise MissingFileError(f"no dict.txt next to {checkpoint} or in its training data directory "
                           f"({candidates[-1]}): pass data=<the data-bin directory with the training dictionary>")


class LanguageModel:
    """A loaded model with its dictionary; see the module docstring. ``model`` is the fairseq model."""

    def __init__(self, model: nn.Module, dictionary, tokens_per_sample: int, device: torch.device) -> None:
        if tokens_per_sample < 1:
            raise ConfigError(f"tokens_per_sample must be >= 1, got {tokens_per_sample}")
        self.model = model.to(device).eval()
        self.dictionary = dictionary
        self.tokens_per_sample = tokens_per_sample
        self.device = device
        decoder = model.decoder
        self.stateful = hasattr(decoder, "attach_streams")  # a StatefulDecoder (every family; not stock fairseq)
        self.carries_state = self.stateful and bool(decoder.carries_state)
        if self.stateful:
            decoder.attach_streams("fairseq_ext.hub (one stream, in order)")

    # -- text <-> tokens ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> Tensor:
        """text -> (N,) token ids: every line's symbols and its ``</s>`` (a final newline ends the last line)."""
        lines = text.split("\n")
        if len(lines) > 1 and lines[-1] == "":
            lines = lines[:-1]
        ids = [self.dictionary.encode_line(line, add_if_not_exist=False, append_eos=True).long() for line in lines]
        return torch.cat(ids)

    def decode(self, tokens: Union[Tensor, Sequence[int]]) -> str:
        """Token ids -> text, ``</s>`` as a line break."""
        lines, current = [], []
        for token in torch.as_tensor(tokens).tolist():
            if token == self.dictionary.eos():
                lines.append(" ".join(current))
                current = []
            else:
                current.append(self.dictionary[token])
        return "\n".join(lines + ([" ".join(current)] if current else []))

    # -- scoring ------------------------------------------------------------------------------------------------
    def score(self, texts: Union[str, Sequence[str]]) -> Union[Result, List[Result]]:
        """Each text alone, from a cold state, under the ``stream`` protocol: {"tokens" (N,), "log_probs" (N,),
        "protocol"}. A list gives a list."""
        if isinstance(texts, str):
            return self.score_document(texts)
        return [self.score_document(text) for text in texts]

    def score_document(self, text: Union[str, Tensor], protocol: str = "stream", context_window: int = 0,
                       segment_length: Optional[int] = None) -> Result:
        """Log-probabilities of every token of a long text (or of (N,) token ids) under ``protocol`` (module
        docstring): {"tokens" (N,), "log_probs" (N,) fp32 natural log, "protocol": its label}.
        ``segment_length``: T (default: the checkpoint's ``tokens_per_sample``)."""
        tokens = (self.encode(text) if isinstance(text, str) else torch.as_tensor(text).long()).to(self.device)
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"score_document needs a non-empty text or 1-D token ids, got shape {tuple(tokens.shape)}")
        length = self.tokens_per_sample if segment_length is None else segment_length
        if length < 1:
            raise ValueError(f"segment_length must be >= 1, got {length}")
        inputs = torch.cat([tokens.new_tensor([self.dictionary.eos()]), tokens[:-1]])  # (N,): x_{p-1}, </s> first
        if protocol == "stream":
            if context_window:
                raise ValueError("context_window belongs to protocol='sliding'")
            log_probs = self._stream(inputs, tokens, length)
            label = f"stream(B=1, T={length}, cold)" if self.carries_state else f"nonoverlap(L={length})"
        elif protocol == "sliding":
            log_probs = self._sliding(inputs, tokens, length, context_window)
            label = f"sliding(L={length}, S={length - context_window})"
        else:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
        return {"tokens": tokens.cpu(), "log_probs": log_probs.cpu(), "protocol": label}

    def next_token_log_probs(self, inputs: Tensor, segment_length: Optional[int] = None) -> Tensor:
        """Input ids (N,) read as one stream from a cold state in segments of T -> log-distributions (N, V) of the
        token after each input."""
        length = self.tokens_per_sample if segment_length is None else segment_length
        inputs = torch.as_tensor(inputs).long().to(self.device)
        with self._cold_stream():
            return torch.cat([self._log_probs(segment)[0] for segment in inputs.split(length)])  # (N, V)

    def _stream(self, inputs: Tensor, targets: Tensor, length: int) -> Tensor:
        with self._cold_stream():
            parts = [self._log_probs(x).gather(-1, y[None, :, None])[0, :, 0]
                     for x, y in zip(inputs.split(length), targets.split(length))]
        return torch.cat(parts)  # (N,)

    def _sliding(self, inputs: Tensor, targets: Tensor, length: int, context: int) -> Tensor:
        if self.carries_state:
            raise ValueError("this model carries state across segments, so the sliding-window protocol does not "
                             "apply; use protocol='stream' (its memory is the context)")
        if not 0 < context < length:
            raise ValueError(f"protocol='sliding' needs 0 < context_window < T = {length}, got {context}")
        stride, parts = length - context, []
        with self._cold_stream():
            for start in range(0, targets.numel(), stride):
                stop = min(start + stride, targets.numel())
                window = inputs[max(0, start - context):stop]  # (<= L,): up to C tokens of context, then the block
                log_probs = self._log_probs(window)[0, -(stop - start):]  # (S, V): the block's positions
                parts.append(log_probs.gather(-1, targets[start:stop, None])[:, 0])
                if self.stateful:
                    self.model.decoder.reset_state("eval")  # every window alone
        return torch.cat(parts)

    def _log_probs(self, inputs: Tensor) -> Tensor:
        """(T,) inputs continuing the eval stream -> (1, T, V) fp32 log-probabilities."""
        net_output = self.model(inputs[None])
        return self.model.get_normalized_probs(net_output, log_probs=True).float()

    @contextlib.contextmanager
    def _cold_stream(self) -> Iterator[None]:
        """Eval mode, no gradients, the decoder's "eval" stream reset on entry and on exit."""
        self.model.eval()
        if self.stateful:
            self.model.decoder.reset_state("eval")
        try:
            with torch.no_grad():
                yield
        finally:
            if self.stateful:
                self.model.decoder.reset_state("eval")

    # -- generation ---------------------------------------------------------------------------------------------
    def sample(self, prompt: str = "", max_new_tokens: int = 20, temperature: float = 1.0, top_k: int = 0,
               seed: Optional[int] = None) -> str:
        """Continue ``prompt`` (its symbols, no ``</s>`` after them; "" = start a stream) by incremental decoding:
        ``temperature`` 0 is greedy; ``top_k`` > 0 samples among the k most likely. Reproducible with ``seed``."""
        if max_new_tokens < 1 or temperature < 0 or top_k < 0:
            raise ValueError("sample needs max_new_tokens >= 1, temperature >= 0 and top_k >= 0")
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        prompt_ids = self.encode(prompt)[:-1].tolist() if prompt else []  # without the line's </s>
        tokens = torch.tensor([[self.dictionary.eos(), *prompt_ids]], device=self.device)  # (1, 1 + P)
        incremental_state: Dict[str, Dict[str, Any]] = {}
        with torch.no_grad():
            for length in range(1, tokens.size(1)):  # the prompt, one token at a time (fairseq's decoders'
                self.model(tokens[:, :length], incremental_state=incremental_state)  # incremental contract)
            for _ in range(max_new_tokens):
                net_output = self.model(tokens, incremental_state=incremental_state)
                log_probs = self.model.get_normalized_probs(net_output, log_probs=True)[0, -1].float()  # (V,)
                tokens = torch.cat([tokens, self._draw(log_probs, temperature, top_k, generator)[None, None]], 1)
        return self.decode(tokens[0, 1 + len(prompt_ids):])

    def _draw(self, log_probs: Tensor, temperature: float, top_k: int, generator: torch.Generator) -> Tensor:
        log_probs = log_probs.clone()
        log_probs[[self.dictionary.pad(), self.dictionary.bos()]] = float("-inf")  # never generated
        if temperature == 0:
            return log_probs.argmax()
        if top_k:
            threshold = log_probs.topk(min(top_k, log_probs.numel())).values[-1]
            log_probs = log_probs.masked_fill(log_probs < threshold, float("-inf"))
        probs = torch.softmax(log_probs / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[0]
