"""The workload's latency with the token endpoint as slow as the fleet benchmarks make it, side by
side with none: bench/workload_latency.py's measurements, twice, on one sandbox.

    python bench/workload.py [--rounds N] [--token-latency 0.05] [--name RESULTS]

Starts the Entra, proxy and Azure SQL emulators (the seed's world), measures with no injected
latency, then with ``--token-latency`` seconds on every token request (``login.token``), and
prints both with what they mean for a pod: time to first row cold and warm, and the extra cost of
a token refresh (a new token against a cached one), which a pod pays once per connection it
opens with a new token, never per query.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import machine, save, table
from bench.workload_latency import measure
from sandbox import launcher
from sandbox.entra.ctl import AdminClient

COLD = "cold client, first row (new token + login + query)"
WARM = "warm query (open connection)"
RECONNECT = "new connection, cached token (login + query)"
TOKEN_NEW = "token: new (request to Entra)"
TOKEN_CACHED = "token: cached (credential's cache)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--token-latency", type=float, default=0.05)
    parser.add_argument("--name", default="workload")
    args = parser.parse_args()
    state_dir = Path(tempfile.mkdtemp(prefix="swi-bench-workload-"))
    results: dict[str, Any] = {"machine": machine(), "token_latency_s": args.token_latency}
    launcher.up(state_dir, (launcher.ENTRA, launcher.PROXY, launcher.AZURESQL), timeout=60)
    try:
        admin = AdminClient.from_state_dir(state_dir)
        results["no latency"] = measure(state_dir, args.rounds)
        admin.latency("login.token", args.token_latency)
        results["token latency"] = measure(state_dir, args.rounds)
    finally:
        launcher.down(state_dir)
    path = save(args.name, results)
    rows = []
    for name in results["no latency"]:
        plain, slow = results["no latency"][name], results["token latency"][name]
        rows.append([name, plain["median_ms"], slow["median_ms"], slow["p95_ms"]])
    print(
        table(
            [
                "measurement (median ms)",
                "no injected latency",
                f"token endpoint +{args.token_latency * 1000:.0f} ms",
                "p95",
            ],
            rows,
        )
    )
    for label in ("no latency", "token latency"):
        r = results[label]
        refresh = r[TOKEN_NEW]["median_ms"] - r[TOKEN_CACHED]["median_ms"]
        print(
            f"{label}: first row cold / warm query = "
            f"{r[COLD]['median_ms'] / r[WARM]['median_ms']:.0f}x; a token refresh adds "
            f"{refresh:.1f} ms to the connection that needs it (reconnect with a cached token: "
            f"{r[RECONNECT]['median_ms']:.1f} ms)"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
