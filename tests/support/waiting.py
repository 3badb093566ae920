"""The one polling helper of the tests: a deadline for effects that happen asynchronously, not a timing assertion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0, *,
             details: Callable[[], str] | None = None) -> T:
    """Poll ``check`` until it returns something true, and return that. On timeout an AssertionError names
    ``what``, followed by ``details()`` (e.g. the tail of a daemon's log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(0.1)
