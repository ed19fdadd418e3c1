"""Logging for the command-line entry points: villa's own loggers at INFO, third-party chatter at WARNING."""

from __future__ import annotations

import logging

OUR_LOGGERS = ("villa", "docmnist", "preprocess", "__main__")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # Hydra sets the root to INFO; open_clip logs there
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)
