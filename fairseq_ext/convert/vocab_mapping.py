"""The original vocabulary placed into a fairseq dictionary: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3 first,
then the original symbols in original order; fairseq specials the original lacks are *dead* rows (zero embedding,
zero output row and bias, and the fixed logit ``DEAD_BIAS`` in the model's ``dead_rows`` buffers,
modules/dead_rows.py: invisible to training). Every adaptive-softmax cluster keeps its members and order."""
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .errors import ConversionError, ConversionFlagError

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary ids 0..3
DEFAULT_SYMBOL_MAP = {"<eos>": "</s>", "<unk>": "<unk>", "<s>": "<s>", "<pad>": "<pad>", "</s>": "</s>"}
DEAD_BIAS = -40.0


def check_vocab_size(symbols: Sequence[str], n_token: int) -> None:
    """The vocabulary passed has one symbol per row of the model (``n_token``)."""
    if len(symbols) != n_token:
        raise ConversionError(f"vocabulary size mismatch: {len(symbols)} symbols, but the model has n_token "
                              f"{n_token}; pass the vocabulary the model was trained with")


def check_dead_bias(dead_bias: float) -> None:
    """``--dead-bias`` keeps the dead fairseq specials improbable."""
    if dead_bias >= -10:
        raise ConversionFlagError(f"--dead-bias {dead_bias} would give the dead fairseq specials real probability")


@dataclass
class VocabMapping:
    """Original ids <-> fairseq ids. ``fs_to_orig[f]`` is -1 for a dead row (a fairseq special the original lacks)."""

    symbols: List[str]  # fairseq dictionary symbols in id order (4 specials first)
    orig_to_fs: List[int]
    fs_to_orig: List[int]
    cutoffs: List[int]  # fairseq cutoffs
    mapped: Dict[str, str]  # original symbol -> fairseq special

    @property
    def dead(self) -> List[int]:
        return [f for f, o in enumerate(self.fs_to_orig) if o < 0]


def build_vocab_mapping(symbols: Sequence[str], cutoffs: Sequence[int],
                        symbol_map: Optional[Mapping[str, str]] = None) -> VocabMapping:
    """Place the original vocabulary into a fairseq dictionary (see the module docstring)."""
    symbol_map = dict(DEFAULT_SYMBOL_MAP if symbol_map is None else symbol_map)
    if symbol_map.get("<unk>") == "<unk>" and "<unk>" not in symbols and "<UNK>" not in symbol_map:
        symbol_map["<UNK>"] = "<unk>"  # lm1b's vocabulary spells it <UNK>: the <unk> mapping applies to it
    for orig, special in symbol_map.items():
        if special and special not in FAIRSEQ_SPECIALS:
            raise ConversionFlagError(f"--map-symbol {orig}={special}: the target must be a fairseq special "
                                      f"{FAIRSEQ_SPECIALS}")
    seen: Dict[str, int] = {}
    for i, sym in enumerate(symbols):
        if not sym or any(c.isspace() for c in sym):
            raise ConversionError(f"original symbol {i} ({sym!r}) is empty or contains whitespace; fairseq "
                                  f"dictionaries hold whitespace-free tokens")
        if sym in seen:
            raise ConversionError(f"original symbol {sym!r} appears twice (ids {seen[sym]} and {i})")
        seen[sym] = i
    head = cutoffs[0] if cutoffs else len(symbols)
    special_of: Dict[int, str] = {}
    for orig, special in symbol_map.items():
        if not special or orig not in seen:
            continue
        idx = seen[orig]
        if special in special_of.values():
            other = symbols[next(i for i, s in special_of.items() if s == special)]
            raise ConversionError(f"both {other!r} and {orig!r} map onto the fairseq special {special}; drop one "
                                  f"mapping (--map-symbol {orig}=)")
        if idx >= head:
            raise ConversionError(
                f"original symbol {orig!r} (id {idx}) maps onto the fairseq special {special} (id "
                f"{FAIRSEQ_SPECIALS.index(special)}), but it lies outside the head cluster [0, {head}) of the adaptive "
                f"softmax, and fairseq's specials are always ids 0-3 (head). This layout cannot be converted exactly")
        special_of[idx] = special
    for sym in FAIRSEQ_SPECIALS:
        if sym in seen and seen[sym] not in special_of:
            raise ConversionError(f"the original vocabulary has the symbol {sym!r} but it is not mapped onto fairseq's "
                                  f"{sym}; fairseq reserves that name (map it with --map-symbol '{sym}={sym}')")
    fs_symbols = list(FAIRSEQ_SPECIALS)
    orig_to_fs = [-1] * len(symbols)
    fs_to_orig = [-1] * len(FAIRSEQ_SPECIALS)
    for idx, special in special_of.items():
        orig_to_fs[idx] = FAIRSEQ_SPECIALS.index(special)
        fs_to_orig[orig_to_fs[idx]] = idx
    for idx, sym in enumerate(symbols):
        if idx not in special_of:
            orig_to_fs[idx] = len(fs_symbols)
            fs_to_orig.append(idx)
            fs_symbols.append(sym)
    n_dead = len(FAIRSEQ_SPECIALS) - len(special_of)
    fs_cutoffs = [c + n_dead for c in cutoffs]
    mapping = VocabMapping(fs_symbols, orig_to_fs, fs_to_orig, fs_cutoffs,
                           {symbols[i]: s for i, s in sorted(special_of.items())})
    _check_clusters(mapping, cutoffs, len(symbols))
    return mapping


def _check_clusters(mapping: VocabMapping, cutoffs: Sequence[int], vocab: int) -> None:
    """Every symbol stays in its cluster; tails keep their order (a head permutation is harmless)."""
    orig_ends = [0] + list(cutoffs) + [vocab]
    fs_ends = [0] + mapping.cutoffs + [len(mapping.symbols)]
    for i in range(len(orig_ends) - 1):
        members = [f for f in range(fs_ends[i], fs_ends[i + 1]) if mapping.fs_to_orig[f] >= 0]
        origs = [mapping.fs_to_orig[f] for f in members]
        if any(not orig_ends[i] <= o < orig_ends[i + 1] for o in origs) or (i > 0 and origs != sorted(origs)):
            raise ConversionError(f"cluster {i} changes members or order under the vocabulary mapping; this is a bug "
                                  f"or an unsupported --map-symbol")


def gather_rows(table: Tensor, mapping: VocabMapping, fs_lo: int, fs_hi: int, orig_lo: int,
                 fill: float) -> Tensor:
    """Rows [fs_lo, fs_hi) in fairseq order from ``table`` whose row r is original id orig_lo + r; dead rows
    get ``fill``. table (V_i, ...) -> (fs_hi - fs_lo, ...)."""
    index = torch.tensor(mapping.fs_to_orig[fs_lo:fs_hi], dtype=torch.long)
    live = index >= 0
    out = table.new_full((fs_hi - fs_lo,) + tuple(table.shape[1:]), fill)
    out[live] = table[index[live] - orig_lo]
    return out
