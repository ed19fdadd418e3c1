"""Embed a DocMNIST dataset, as the original README: ``python preprocess/preprocess_docmnist.py --data_dir=docmnist_30000_15.2``."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preprocess.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main(default_config="docmnist")
