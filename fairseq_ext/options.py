"""``python -m fairseq_ext.options ARCH``: a model's options with the values the ``--arch`` preset gives them.

fairseq lists a model's options in ``fairseq-train --help`` only once ``--arch`` is on the command line
(``fairseq-train --arch ARCH --help``, amid every other option). This prints just the model's: each flag, the value
the preset sets (``preset``) or the model's default (``default``), and its help. ``--list`` names every arch this
package registers.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from typing import Any, List, Optional, Sequence, Tuple

import fairseq_ext  # noqa: F401  (registers the models and their presets)

MODULE = "fairseq_ext.models."


def plugin_archs() -> List[str]:
    """Every ``--arch`` whose model this package registers, sorted."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    return sorted(arch for arch, model in ARCH_MODEL_REGISTRY.items() if model.__module__.startswith(MODULE))


def arch_options(arch: str) -> List[Tuple[str, Any, str, str]]:
    """(flag, value, "preset" | "default", help) for every option of ``arch``'s model."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY

    if arch not in plugin_archs():
        close = difflib.get_close_matches(arch, plugin_archs(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; python -m fairseq_ext.options --list names them"
        raise KeyError(f"{arch!r} is not an --arch of fairseq_ext{hint}")
    preset = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](preset)  # sets what the preset chooses (and, for fairseq's presets, its defaults)
    rows = []
    for f in dataclasses.fields(MODEL_DATACLASS_REGISTRY[ARCH_MODEL_NAME_REGISTRY[arch]]):
        if f.name.startswith("_"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if isinstance(default, str) and default.startswith("${"):
            default = f"from --{default[2:-1].split('.')[-1].replace('_', '-')}"  # an interpolation (II)
        value, source = (getattr(preset, f.name), "preset") if hasattr(preset, f.name) else (default, "default")
        rows.append((f"--{f.name.replace('_', '-')}", value, source, str(f.metadata.get("help", ""))))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.options", description=__doc__.split("\n")[0])
    parser.add_argument("arch", nargs="?", help="an --arch preset, e.g. transformer_xl_wiki103_base")
    parser.add_argument("--list", action="store_true", help="list every --arch of fairseq_ext")
    args = parser.parse_args(argv)
    if args.list or args.arch is None:
        print("\n".join(plugin_archs()))
        return 0
    try:
        rows = arch_options(args.arch)
    except KeyError as error:
        print(f"error: {error.args[0]}", file=sys.stderr)
        return 2
    width = max(len(flag) for flag, *_ in rows)
    print(f"{args.arch}: pass any of these to fairseq-train after --arch {args.arch}")
    for flag, value, source, text in rows:
        print(f"  {flag:<{width}}  {value!s:<20} ({source})  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
