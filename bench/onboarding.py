"""Onboarding at scale: N SqlWorkloadIdentities from apply to all Ready, against the one-shot way.

    python bench/onboarding.py [--n 100 --n 500 --n 1000] [--kind app|mi] [--state-dir DIR]
                               [--no-limits] [--skip-baseline] [--name RESULTS]
                               [--profile DIR]

One sandbox, one run, for each N in turn (the Entra emulator reset between phases, so both start
from an identity with no credentials, under the same injected latency and quotas):

1. baseline: ``bench/oneshot.py`` onboards N service accounts one after another (sequential SDK
   calls, as the azwi CLI does);
2. operator: a fresh ``python -m swi_operator``; N resources are created across 50 namespaces
   (12 client threads) and the clock stops when the last one is Ready.

Each member has a Deployment running as its service account (what the label step labels), and an
identity shared by at most 14 members (``--kind app``: app registrations through Graph; ``mi``:
user-assigned managed identities through ARM). Prints a table and writes
bench/results/<name>.json; nothing is asserted (tests/bench/ checks the harness itself).
``--profile DIR`` samples the operator with py-spy from the first create to the last Ready and
writes a flame graph per N (DIR/operator-<N><kind>.svg) and its largest frames into the results.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    CloudProfile,
    Kind,
    Member,
    Meters,
    OperatorProcess,
    Profiler,
    ReadyTracker,
    Sandbox,
    fleet,
    machine,
    profile_top,
    save,
    table,
)
from bench.oneshot import OneShot

PROFILE = bool(os.environ.get("SWI_BENCH_PROFILE"))  # cProfile the operator (for finding why)
SETTLE_S = 5.0  # after creating the Deployments, let the controller-manager catch up


def throttled_since(sandbox: Sandbox, since_wall: float) -> int:
    log = sandbox.admin.requests()["log"]
    return sum(1 for r in log if r["at"] >= since_wall and r["status"] == 429)


def credentials_held(sandbox: Sandbox) -> int:
    state = sandbox.admin.call("GET", "state")
    return sum(len(p["credentials"]) for p in state["principals"])


def run_baseline(
    sandbox: Sandbox, members: list[Member], profile: CloudProfile, sql: bool
) -> dict[str, Any]:
    sandbox.reset()
    profile.apply(sandbox.admin)
    meters = Meters(sandbox)
    before, wall = meters.read(), time.time()

    async def go() -> dict[str, Any]:
        oneshot = OneShot(sandbox, sql)
        try:
            return await oneshot.run(members)
        finally:
            await oneshot.close()

    timed = asyncio.run(go())
    delta = meters.since(before)
    meters.close()
    return {
        "seconds": timed["total_s"],
        "per_member_median_s": sorted(timed["per_member_s"])[len(members) // 2],
        "entra_calls": dict(delta.entra),
        "sql": {f"{who} {kind}": n for (who, kind), n in delta.sql.items()},
        "throttled": throttled_since(sandbox, wall),
        "credentials": credentials_held(sandbox),
        "api_requests": delta.api_total(),
        "cpu_s": delta.cpu,
    }


def run_operator(
    sandbox: Sandbox,
    members: list[Member],
    phase: str,
    profile: CloudProfile,
    sql: bool,
    timeout: float,
    flame: Path | None = None,
) -> dict[str, Any]:
    sandbox.reset()
    profile.apply(sandbox.admin)
    meters = Meters(sandbox)
    top: list[dict[str, Any]] = []
    log = sandbox.state_dir / f"operator-{phase}.log"
    env = sandbox.operator_env(drift_interval=600)
    profile_path = sandbox.state_dir / f"operator-{phase}.prof" if PROFILE else None
    try:
        with (
            OperatorProcess(env, log, profile_path) as operator,
            ReadyTracker(sandbox, phase) as tracker,
        ):
            time.sleep(2)  # let kopf's watch settle
            idle_cpu, idle_mem = operator.cpu_seconds(), operator.memory_mib()
            spy = Profiler(operator.pid, flame) if flame else None
            before, wall = meters.read(), time.time()
            started = time.monotonic()
            sandbox.apply(members, phase, sql)
            applied = time.monotonic() - started
            keys = [(m.namespace, m.name, 1) for m in members]
            done = tracker.wait(keys, timeout)
            if spy is not None:
                top = profile_top(spy.stop())
            seconds = (done - started) if done is not None else None
            delta = meters.since(before)
            cpu = operator.cpu_seconds() - idle_cpu
            memory = operator.memory_mib()
            ready_times = sorted(
                tracker.ready_at[k] - started for k in keys if k in tracker.ready_at
            )
            not_ready = tracker.not_ready(keys)
    finally:
        meters.close()
        sandbox.retire(phase)
    return {
        "seconds": seconds,
        "apply_s": applied,
        "ready": len(ready_times),
        "not_ready": dict(not_ready),
        "ready_curve_s": ready_times,
        "entra_calls": dict(delta.entra),
        "sql": {f"{who} {kind}": n for (who, kind), n in delta.sql.items()},
        "cpu_s": delta.cpu,
        "throttled": throttled_since(sandbox, wall),
        "credentials": credentials_held(sandbox),
        "api_requests": delta.api_total(),
        "api_requests_by_verb": dict(
            Counter({f"{verb} {res}": n for (verb, res), n in delta.apiserver.items() if n})
        ),
        "operator_cpu_s": cpu,
        "operator_rss_idle_mib": idle_mem["rss"],
        "operator_rss_mib": memory["rss"],
        "operator_peak_rss_mib": memory["peak"],
        "watch_events": tracker.events,
        **({"profile": {"svg": str(flame), "top": top}} if flame else {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="resources (repeatable)")
    parser.add_argument("--kind", choices=("app", "mi"), default="app")
    parser.add_argument("--state-dir", type=Path, help="a running sandbox to use")
    parser.add_argument("--no-limits", action="store_true", help="no injected latency or quotas")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--graph-lag", type=float, default=0.0, help="Graph reads miss writes for S seconds"
    )
    parser.add_argument(
        "--jitter", type=float, default=0.0, help="plus 0..S s random latency per cloud call"
    )
    parser.add_argument(
        "--no-sql", dest="sql", action="store_false", help="federation only (no spec.sql)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the operator from first create to last Ready: DIR/operator-N.svg",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for Ready")
    parser.add_argument(
        "--name", default=None, help="results: bench/results/NAME.json, or a path ending in .json"
    )
    args = parser.parse_args()
    sizes: list[int] = args.n or [100]
    kind: Kind = args.kind
    profile = CloudProfile.none() if args.no_limits else CloudProfile()
    profile = dataclasses.replace(
        profile, graph_read_lag=args.graph_lag, latency_jitter=args.jitter
    )
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine(),
        "profile": profile.describe(),
        "kind": kind,
        "sql": args.sql,
        "runs": [],
    }
    with Sandbox(args.state_dir) as sandbox:
        pool = sandbox.world.pool(kind)
        for n in sizes:
            tag = f"{n}{kind}{int(time.time()) % 100000}"
            baseline_members = fleet(f"b{tag}", n, pool)
            operator_members = fleet(f"o{tag}", n, pool)
            sandbox.prepare(operator_members, f"o{tag}")
            if not args.skip_baseline:
                sandbox.prepare(baseline_members, f"b{tag}")
            time.sleep(SETTLE_S)
            per_identity = Counter(m.identity.name for m in operator_members)
            bound = profile.lower_bound(kind, list(per_identity.values()))
            run: dict[str, Any] = {
                "n": n,
                "identities": len(per_identity),
                "namespaces": len({m.namespace for m in operator_members}),
                "lower_bound_s": bound,
            }
            if not args.skip_baseline:
                print(f"N={n}: baseline (one-shot, sequential) ...", file=sys.stderr, flush=True)
                run["baseline"] = run_baseline(sandbox, baseline_members, profile, args.sql)
            print(f"N={n}: operator ...", file=sys.stderr, flush=True)
            run["operator"] = run_operator(
                sandbox,
                operator_members,
                f"o{tag}",
                profile,
                args.sql,
                args.timeout,
                flame=args.profile / f"operator-{n}{kind}.svg" if args.profile else None,
            )
            results["runs"].append(run)
            print_run(run)
    name = args.name or f"onboarding-{kind}{'-nolimits' if args.no_limits else ''}"
    path = save(name, results)
    print(f"\nresults: {path}")
    print(summary(results))
    return 0


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_run(run: dict[str, Any]) -> None:
    op = run["operator"]
    print(
        f"N={run['n']}: operator {_fmt(op['seconds'])} s ({op['ready']}/{run['n']} Ready"
        + (f", not ready: {op['not_ready']}" if op["not_ready"] else "")
        + f"), lower bound {run['lower_bound_s']:.1f} s"
        + (f", baseline {run['baseline']['seconds']:.1f} s" if "baseline" in run else ""),
        file=sys.stderr,
        flush=True,
    )


def summary(results: dict[str, Any]) -> str:
    rows = []
    for run in results["runs"]:
        n, op, bound = run["n"], run["operator"], run["lower_bound_s"]
        base = run.get("baseline")
        seconds = op["seconds"]
        cloud = sum(op["entra_calls"].values())
        rows.append(
            [
                n,
                run["identities"],
                _fmt(bound),
                _fmt(base["seconds"]) if base else "-",
                _fmt(seconds),
                _fmt(seconds / bound, 2) if seconds and bound else "-",
                _fmt(base["seconds"] / seconds, 1) if base and seconds else "-",
                f"{cloud / n:.2f}",
                op["throttled"],
                f"{op['api_requests'] / n:.1f}",
                _fmt(op["operator_cpu_s"]),
                _fmt(op["cpu_s"].get("controlplane")),
                _fmt(op["operator_cpu_s"] / control, 2)
                if (control := op["cpu_s"].get("controlplane"))
                else "-",
                f"{op['operator_rss_idle_mib']:.0f} -> {op['operator_rss_mib']:.0f}",
            ]
        )
    return table(
        [
            "N",
            "identities",
            "lower bound s",
            "one-shot s",
            "operator s",
            "operator / bound",
            "one-shot / operator",
            "cloud calls / resource",
            "429s",
            "API requests / resource",
            "operator CPU s",
            "control plane CPU s",
            "operator / control plane CPU",
            "RSS MiB idle -> after",
        ],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main())
