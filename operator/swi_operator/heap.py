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

A trim only returns what glibc's heap holds. Python's own allocator (pymalloc) keeps objects of
up to 512 bytes in 1 MiB arenas and returns an arena only once every object in it is gone: after
a burst (5,000 resources resumed at once) the few objects that live on (kopf's memory of each
resource, the caches' entries) are spread over nearly every arena the burst made, and the
operator stayed at 725 to 749 MiB at rest for about 30 MiB of live objects (tracemalloc). So the
operator runs on jemalloc (``ALLOCATOR_ENV``, set by ``ensure_allocator`` before anything is
imported, or by the image): Python's objects on it too (``PYTHONMALLOC=malloc``), whose freed
pages go back to the system by themselves a few seconds after (a background thread). glibc's
malloc for Python's objects brought that restart to 370 to 410 MiB but took about half again
pymalloc's CPU on JSON decoding; jemalloc took about the same as pymalloc there.
docs/benchmarks.md ("Identity pools") has the figures.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


JEMALLOC = "libjemalloc.so.2"  # Debian's libjemalloc2 (the image installs it; make system-deps)
ALLOCATOR_ENV: Mapping[str, str] = {
    "PYTHONMALLOC": "malloc",
    "LD_PRELOAD": JEMALLOC,
    # Freed pages back to the system within seconds, by jemalloc's own thread, also when idle.
    "MALLOC_CONF": "background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0",
}


def allocator_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to run the operator in (``environ`` with ``ALLOCATOR_ENV``, a setting of
    its own kept), or None: it already runs so, or whoever started it chose an allocator
    (PYTHONMALLOC or LD_PRELOAD set, to anything), which is respected."""
    if "PYTHONMALLOC" in environ or "LD_PRELOAD" in environ:
        return None
    return {**ALLOCATOR_ENV, **environ}


def ensure_allocator(environ: Mapping[str, str] = os.environ) -> None:
    """Start the process again, the same command line, with ``allocator_env``'s environment:
    the allocator is chosen when a process starts, not later. The process keeps its pid
    (``exec``), so supervisors and probes see nothing of it. Without jemalloc (or off Linux) it
    runs on as it is, and says what that costs."""
    env = allocator_env(environ)
    if env is None or not sys.platform.startswith("linux"):
        return
    if ctypes.util.find_library("jemalloc") is None:
        print(
            f"warning: {JEMALLOC} not found (Debian: apt-get install libjemalloc2): the operator "
            "keeps the memory of its largest burst of work (operator/swi_operator/heap.py)",
            file=sys.stderr,
        )
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # The same interpreter and command line this process was started with, nothing else.
    os.execve(sys.executable, sys.orig_argv, env)  # noqa: S606


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


# Python's cyclic collector: collect the youngest generation once 50,000 objects (not 700) were
# allocated beyond those freed, the next one every 20 of those, the oldest every 10 of the next.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_collector() -> None:
    """Take what start-up made (every imported module: kopf, the SDKs and the Kubernetes
    models, about 90,000 objects the collector tracks) out of the cyclic collector's view for good
    (``gc.freeze``), and collect less often. Onboarding 1,000 resources, the collector was about
    a twelfth of the operator's CPU (perf: ``gc_collect_main`` and the traversals it calls),
    most of it walking objects that live as long as the process. A garbage cycle now waits
    longer to be freed: at most the 50,000 youngest objects, a few MiB. Objects that
    reference counting frees (nearly all) are freed at once, frozen or not."""
    gc.collect()  # what start-up left as garbage, not frozen with the rest
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
