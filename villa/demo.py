"""`make demo`: the end-to-end pipeline on an embedded default, offline, on CPU.

Generates a small DocMNIST and prints its summary. (Later pipeline steps are added here as they land.)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from docmnist.generate_docmnist import generate
from villa.errors import exit_on_error
from villa.log import setup_logging

log = logging.getLogger("villa.demo")


@exit_on_error
def main() -> None:
    setup_logging()
    root = Path(os.environ.get("VILLA_DEMO_DIR", "outputs/demo"))
    data = generate(6000, 16, out_dir=str(root / "data"), val_budget=2000, test_budget=2000, overwrite=True)
    info = json.loads((data / "generation.json").read_text())
    print(f"\nDocMNIST at {data}")
    print(f"{'split':<6} {'images':>7} {'regions':>8} {'pairs':>7} {'complexity':>10}")
    for split, s in info["splits"].items():
        print(f"{split:<6} {s['images']:>7} {s['regions']:>8} {s['pairs']:>7} {s['sample_complexity']:>10.2f}")


if __name__ == "__main__":
    main()
