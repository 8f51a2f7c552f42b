"""The composable long-context core: position terms (``positions``), key/value sources (``sources``), mixers
(``softmax_mixer``, ``recurrent_mixers``), one block (``block``), the per-layer layout and its rules (``layout``)
and the mixer builder (``build``). ``models/composed_lm.py`` assembles them into a language model."""
from .block import ComposedBlock
from .build import MixerSizes, build_mixer
from .layout import FAST_WEIGHT_MIXERS, LAYER_POSITIONS, MIXERS, LayerSpec, check_layer, parse_layout
from .positions import ABSOLUTE, POSITIONS, PositionTerm, build_position
from .sources import SOURCES, build_source

__all__ = ["ABSOLUTE", "ComposedBlock", "FAST_WEIGHT_MIXERS", "LAYER_POSITIONS", "LayerSpec", "MIXERS", "MixerSizes",
           "POSITIONS", "PositionTerm", "SOURCES", "build_mixer", "build_position", "build_source", "check_layer",
           "parse_layout"]
