"""The bench scripts (scripts/bench*.py) from tests: importing one as a module (or putting scripts/ on the path), and
reading the markdown tables it prints and the numbers in their cells."""
import importlib.util
import os
import re
import sys
from types import ModuleType
from typing import Dict, List

from tests.harness import REPO_ROOT


def parse_tables(stdout: str) -> List[List[Dict[str, str]]]:
    """Every markdown table in the output, as a list of row dicts."""
    tables, current = [], []
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            header = [c.strip() for c in current[0].strip("|").split("|")]
            tables.append([dict(zip(header, (c.strip() for c in row.strip("|").split("|")))) for row in current[2:]])
            current = []
    return tables


def number(text: str) -> float:
    """A cell's number without thousands separators, a ratio's ``×`` or a parameter count's ``M``."""
    return float(re.sub(r"[,×M]", "", text))


def script_module(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``name`` (once per session: every test shares it)."""
    scripts_on_path()  # what the scripts import (benchlib, benchrow, originals)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "scripts", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def scripts_on_path() -> None:
    """Put scripts/ on sys.path, as every bench script does for itself, so that tests can import its modules
    (``benchlib``, ``benchrow``, ``originals``)."""
    scripts = os.path.join(REPO_ROOT, "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
