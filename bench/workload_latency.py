"""Workload latency against the sandbox: time to first row, warm queries, new vs cached tokens.

    python bench/workload_latency.py [--state-dir DIR] [--rounds N] [--json]

Starts Entra + proxy + Azure SQL emulators through the launcher in a temporary state directory
(or uses a running sandbox with ``--state-dir``), then measures with the real ODBC Driver 18:

* cold process: ``python -m swi_workload`` from spawn to exit (imports, token, TLS, login, query);
* cold client: a new ``SqlClient`` in a warm process (new credential: token, login, query);
* warm query: the seed's query on an open connection;
* new connection with a cached token: reconnect cost alone;
* token: ``get_token`` on a fresh credential (a request to Entra) vs on one that has it cached.

Results go to docs/workload.md by hand; they are loopback numbers, so they show the client's own
overhead and the relative costs, not Azure's network latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "workload")]

from sandbox import launcher  # noqa: E402


def _timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return (time.perf_counter() - started) * 1000


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {
        "n": len(samples),
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(p95, 2),
        "min_ms": round(ordered[0], 2),
    }


def measure(state_dir: Path, rounds: int) -> dict[str, dict[str, float]]:
    env = launcher.environment(state_dir)
    os.environ.update(env)
    os.environ.pop("HTTPS_PROXY", None)
    os.environ.pop("https_proxy", None)
    from swi_workload import Settings, SqlClient, TokenSource

    from sandbox.demo import SEED_QUERY

    settings = Settings.from_env()
    results: dict[str, dict[str, float]] = {}

    process_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'workload'}"}
    results["cold process (spawn to exit)"] = _summary(
        [
            _timed(
                lambda: subprocess.run(
                    [sys.executable, "-m", "swi_workload", "--json"],
                    check=True,
                    capture_output=True,
                    env=process_env,
                )
            )
            for _ in range(max(rounds // 10, 3))
        ]
    )

    cold: list[float] = []
    for _ in range(max(rounds // 10, 3)):
        client = SqlClient(settings)
        cold.append(_timed(lambda c=client: c.query(SEED_QUERY)))  # type: ignore[misc]
        client.close()
    results["cold client, first row (new token + login + query)"] = _summary(cold)

    with SqlClient(settings) as client:
        client.query(SEED_QUERY)
        results["warm query (open connection)"] = _summary(
            [_timed(lambda: client.query(SEED_QUERY)) for _ in range(rounds)]
        )
        reconnect: list[float] = []
        for _ in range(max(rounds // 10, 3)):
            client.close()
            reconnect.append(_timed(lambda: client.query(SEED_QUERY)))
        results["new connection, cached token (login + query)"] = _summary(reconnect)
        assert client.stats.token_requests == client.stats.connects  # one per connection

    results["token: new (request to Entra)"] = _summary(
        [_timed(lambda: TokenSource(settings).get()) for _ in range(max(rounds // 10, 3))]
    )
    source = TokenSource(settings)
    source.get()
    results["token: cached (credential's cache)"] = _summary(
        [_timed(source.get) for _ in range(rounds)]
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, help="a running sandbox to use")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    own = args.state_dir is None
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="swi-bench-"))
    if own:
        launcher.up(state_dir, (launcher.ENTRA, launcher.PROXY, launcher.AZURESQL), timeout=60)
    try:
        results = measure(state_dir, args.rounds)
    finally:
        if own:
            launcher.down(state_dir)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| measurement | n | median ms | p95 ms | min ms |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['n']:.0f} | {r['median_ms']} | {r['p95_ms']} | {r['min_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
