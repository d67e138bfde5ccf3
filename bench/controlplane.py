"""Measure the sandbox control plane: build (cached or cold), start-to-ready time, resident memory.

Usage: ``python bench/controlplane.py [--runs N] [--cold]``. ``--cold`` rebuilds into an empty
binary cache (Go's own module and build caches stay warm unless you clear them yourself), which is
what a fresh clone on a machine with a warm Go cache costs. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from sandbox import launcher


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="rebuild into an empty binary cache")
    args = parser.parse_args()

    if args.cold:
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="swi-cold-cache-")
    started = time.monotonic()
    bin_dir = launcher.build_controlplane(quiet=True)
    build_s = time.monotonic() - started
    size_mib = (bin_dir / "swi-controlplane").stat().st_size / 2**20

    ready, rss_ready, rss_settled = [], [], []
    for _ in range(args.runs):
        state = Path(tempfile.mkdtemp(prefix="swi-bench-cp-"))
        t0 = time.monotonic()
        running = launcher.up(state, [launcher.CONTROLPLANE])[0]
        ready.append(time.monotonic() - t0)
        assert running.pid is not None
        rss_ready.append(_rss_mib(running.pid))
        time.sleep(10)  # let controllers finish their initial sync
        rss_settled.append(_rss_mib(running.pid))
        launcher.down(state)

    print(f"machine: {os.cpu_count()} cores")
    print(f"build ({'cold binary cache' if args.cold else 'cached'}): {build_s:8.1f} s")
    print(f"binary size:                      {size_mib:8.1f} MiB")
    print(f"start-to-ready (fresh state), median of {args.runs}: {statistics.median(ready):6.2f} s")
    print(f"RSS at ready, median:             {statistics.median(rss_ready):8.1f} MiB")
    print(f"RSS 10 s after ready, median:     {statistics.median(rss_settled):8.1f} MiB")


if __name__ == "__main__":
    main()
