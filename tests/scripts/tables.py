"""Reading what the bench scripts (scripts/bench_*.py) print: their markdown tables and the numbers in the cells."""
import re
from typing import Dict, List


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
