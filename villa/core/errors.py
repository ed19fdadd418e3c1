"""One exception type for bad input, and the one-line reporting the command-line entry points share."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class VillaError(Exception):
    """Bad input or state: the message names the problem and the fix, on one line."""


def error_line(e: BaseException) -> str:
    """The one line to print for an error. A VillaError raised in a DataLoader worker reaches the main process
    wrapped in torch's "Caught VillaError in DataLoader worker process 0. Original Traceback ..." text: its own
    message is the traceback's last line."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        head, sep, message = last.partition(": ")
        text = message if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Exception")) else last
    return text.splitlines()[0] if text else type(e).__name__


def exit_on_error(fn: F) -> F:
    """Wrap a CLI ``main``: a :class:`VillaError` prints one ``error:`` line and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VillaError as e:
            print(f"error: {error_line(e)}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
