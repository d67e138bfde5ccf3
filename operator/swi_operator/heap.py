"""Giving the C heap's free pages back to the system after a fleet-wide pass.

glibc's malloc keeps what Python frees above pymalloc's 512-byte objects (the tables of large
dicts and lists, the text of a LIST's JSON) for reuse, so a process's resident set stays at the
peak of its largest pass: the drift check of a fleet of 2,000 resources left 70 MiB free but
resident (docs/benchmarks.md, "Identity pools"). ``malloc_trim(0)`` returns those pages. Where the
C library is not glibc (musl, macOS) this does nothing.

Besides the drift cycle's own call, ``trim_periodically`` returns them every 10 s (a trim takes
about a millisecond): a burst of work (5,000 resources created at once: kopf holds a worker and a
body per object) kept what it freed resident until the next drift cycle, ten minutes later by
default, and a trim 30 s after a cycle still returned 34 MiB the cycle's own had not (what the
cycle's tasks and Events still held when it ended).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _find_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _find_trim()


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system; whether the C library could."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


TRIM_EVERY_S = 10.0


async def trim_periodically(every: float = TRIM_EVERY_S) -> None:
    """``release_free_memory`` every ``every`` seconds, until cancelled (or at once, where the C
    library cannot)."""
    while True:
        if not release_free_memory():
            return
        await asyncio.sleep(every)
