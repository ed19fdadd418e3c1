"""What every benchmark does with its results: the command that made them, and an atomic JSON write."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def command_line(module: str, argv: Optional[Sequence[str]] = None) -> str:
    """``python -m <module> <args>``: the exact command, recorded in the results file and quoted in the docs."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def save(res: dict[str, Any], path: Optional[str]) -> None:
    """Write ``res`` to ``path`` (nothing without one) under a temporary name and rename it; say where."""
    if not path:
        return
    from villa.core.io import write_json_atomic

    write_json_atomic(Path(path), res)
    print(f"wrote {path}")
