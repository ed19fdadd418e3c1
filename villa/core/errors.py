"""One exception type for bad input, and the one-line reporting the command-line entry points share."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class VillaError(Exception):
    """Bad input or state: the message names the problem and the fix, on one line."""


def exit_on_error(fn: F) -> F:
    """Wrap a CLI ``main``: a :class:`VillaError` prints one ``error:`` line and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VillaError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
