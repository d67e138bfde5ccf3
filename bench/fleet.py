"""A fleet at rest and under churn: what N resources cost per hour when nothing changes, what an
operator restart costs, and how fast they converge when 10% of them change every minute.

    python bench/fleet.py [--n 1000] [--kind app|mi] [--steady 300] [--probe-window 180]
                          [--churn-minutes 3] [--state-dir DIR] [--no-sql] [--name RESULTS]

One sandbox, in this order:

1. control: the fleet's namespaces and Deployments, no operator, ``--control`` seconds: the API
   server's own background traffic (controller-manager, leases), later subtracted;
2. setup: the operator onboards N resources (no injected latency, so that it is quick) until all
   are Ready; from here on the cloud has its latency and quotas (bench/harness.py CloudProfile);
3. steady: ``--steady`` seconds with nothing changing, a drift check every ``--drift-interval``
   seconds (60) and probes at their default hourly interval (none falls due): the cost of one
   drift cycle, over the cycles the operator's log says it finished;
4. restart: a new operator process with the default settings; its resume pass over N resources,
   over ``--restart-window`` seconds;
5. churn: 10% of the resources a minute, spread evenly, move to the other identity of their pair
   (both members of a couple at once, so no identity goes over its 20 credentials); each change is
   timed from the patch to Ready at the new generation;
6. probes: a new operator probing at every drift check (``--verify-interval 1``): one window of
   ``--probe-window`` seconds, after its own resume pass, gives what a Verified probe costs.

Per resource per hour at the defaults (drift every 600 s, a probe every 3600 s) is then
6 x (one drift cycle) + 1 x (one probe). Prints tables and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    GROUP,
    PLURAL,
    VERSION,
    CloudProfile,
    Delta,
    Kind,
    Member,
    Meters,
    OperatorProcess,
    ReadyTracker,
    Sandbox,
    fleet,
    machine,
    save,
    table,
)

DEFAULT_DRIFT_S = 600.0
DEFAULT_VERIFY_S = 3600.0
STEADY_DRIFT_S = 60.0
CHURN_SHARE_PER_MINUTE = 0.10
PHASE = "fleet"


def totals(delta: Delta, cpu: float) -> dict[str, float]:
    """What one window cost, by kind of call."""

    def writes(prefix: str) -> int:
        verbs = ("create", "update", "delete", "put")
        return sum(
            v
            for k, v in delta.entra.items()
            if k.startswith(prefix) and k.rsplit(".", 1)[-1] in verbs
        )

    def calls(prefix: str) -> int:
        return sum(v for k, v in delta.entra.items() if k.startswith(prefix))

    return {
        "graph_reads": calls("graph.") - writes("graph."),
        "graph_writes": writes("graph."),
        "arm_reads": calls("arm.") - writes("arm."),
        "arm_writes": writes("arm."),
        "token_requests": delta.entra.get("login.token", 0),
        "sql_logins": sum(v for (_, kind), v in delta.sql.items() if kind == "login"),
        "sql_reads": sum(v for (_, kind), v in delta.sql.items() if kind == "read"),
        "sql_writes": sum(v for (_, kind), v in delta.sql.items() if kind == "write"),
        "api_reads": delta.api_total(writes=False),
        "api_writes": delta.api_total(writes=True),
        "operator_cpu_s": cpu,
    }


def probes(delta: Delta) -> int:
    """Verified probes that ran: each makes one TokenRequest."""
    return delta.apiserver.get(("POST", "serviceaccounts/token"), 0)


def record(measured: Window) -> dict[str, Any]:
    delta = measured.delta
    return {
        "seconds": delta.seconds,
        "drift_cycles": measured.cycles,
        "totals": totals(delta, measured.cpu),
        "entra": dict(delta.entra),
        "sql": {f"{who} {kind}": v for (who, kind), v in delta.sql.items()},
        "api": {f"{verb} {res}": v for (verb, res), v in delta.apiserver.items() if v},
    }


def per_hour(steady: Window, probing: Window, n: int) -> dict[str, Any]:
    """Per resource per hour at the defaults: six drift cycles and one probe. A drift cycle's cost
    comes from the steady window; a probe's from the probing window, less its drift cycles."""
    cycles = steady.cycles
    if not cycles:
        raise SystemExit("error: no drift check finished in the steady window; make it longer")
    base = totals(steady.delta, steady.cpu)
    per_cycle = {k: v / (n * cycles) for k, v in base.items()}
    mixed = totals(probing.delta, probing.cpu)
    ran, probe_cycles = probes(probing.delta), probing.cycles
    per_probe = {
        k: max(0.0, mixed[k] - per_cycle.get(k, 0.0) * n * probe_cycles) / ran if ran else 0.0
        for k in mixed
    }
    hour = {
        k: (3600 / DEFAULT_DRIFT_S) * per_cycle.get(k, 0.0)
        + (3600 / DEFAULT_VERIFY_S) * per_probe[k]
        for k in mixed
    }
    return {
        "drift_cycles_measured": cycles,
        "probes_measured": ran,
        "per_drift_cycle": per_cycle,
        "per_probe": per_probe,
        "per_hour": hour,
    }


@dataclass
class Window:
    delta: Delta  # less the control window's background traffic
    cpu: float  # the operator's CPU seconds
    cycles: int  # drift checks the operator finished in it


def window(sandbox: Sandbox, operator: OperatorProcess, seconds: float, control: Delta) -> Window:
    meters = Meters(sandbox)
    try:
        before, cpu, cycles = meters.read(), operator.cpu_seconds(), operator.drift_checks()
        time.sleep(seconds)
        delta = meters.since(before).minus(control)
        return Window(delta, operator.cpu_seconds() - cpu, operator.drift_checks() - cycles)
    finally:
        meters.close()


def onboard(
    sandbox: Sandbox, members: list[Member], sql: bool, timeout: float, drift_interval: float
) -> tuple[OperatorProcess, float]:
    """The fleet, Ready, under an operator checking drift every ``drift_interval`` s (returned,
    running)."""
    CloudProfile.none().apply(sandbox.admin)
    env = sandbox.operator_env(drift_interval=drift_interval)
    operator = OperatorProcess(env, sandbox.state_dir / "operator-fleet-1.log").__enter__()
    with ReadyTracker(sandbox, PHASE) as tracker:
        started = time.monotonic()
        sandbox.apply(members, PHASE, sql)
        done = tracker.wait([(m.namespace, m.name, 1) for m in members], timeout)
        if done is None:
            operator.stop()
            missing = tracker.not_ready([(m.namespace, m.name, 1) for m in members])
            raise SystemExit(f"error: the fleet did not get Ready: {dict(missing)}")
    return operator, done - started


def churn(
    sandbox: Sandbox,
    members: list[Member],
    minutes: float,
    pool_pairs: dict[str, Any],
    timeout: float,
) -> dict[str, Any]:
    """Swap couples between their pair of identities at 10% of the fleet per minute."""
    custom = sandbox.api("CustomObjectsApi")
    couples = [members[i : i + 2] for i in range(0, len(members) - 1, 2)]
    per_minute = max(1, round(len(members) * CHURN_SHARE_PER_MINUTE / 2))
    total = max(1, round(per_minute * minutes))
    spacing = 60.0 / per_minute
    current = {m.name: m.identity for m in members}
    changes: list[tuple[tuple[str, str, int], float]] = []
    meters = Meters(sandbox)
    try:
        with ReadyTracker(sandbox, PHASE) as tracker:
            before = meters.read()
            started = time.monotonic()
            for k in range(total):
                due = started + k * spacing
                time.sleep(max(0.0, due - time.monotonic()))
                for m in couples[k % len(couples)]:
                    other = pool_pairs[current[m.name].name]
                    current[m.name] = other
                    patched = custom.patch_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        m.namespace,
                        PLURAL,
                        m.name,
                        {"spec": {"identity": other.spec()}},
                    )
                    key = (m.namespace, m.name, int(patched["metadata"]["generation"]))
                    changes.append((key, time.monotonic()))
            last_change = time.monotonic()
            done = tracker.wait([key for key, _ in changes], timeout)
            delta = meters.since(before)
            latencies = sorted(
                tracker.ready_at[key] - at for key, at in changes if key in tracker.ready_at
            )
            missing = tracker.not_ready([key for key, _ in changes])
    finally:
        meters.close()
    quantile = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "changes": len(changes),
        "per_minute": per_minute * 2,
        "minutes": minutes,
        "converged": len(latencies),
        "not_converged": dict(missing),
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": quantile[94] if latencies else None,
        "latency_max_s": latencies[-1] if latencies else None,
        "settle_after_last_change_s": (done - last_change) if done else None,
        "entra": dict(delta.entra),
        "sql": {f"{who} {kind}": v for (who, kind), v in delta.sql.items()},
        "api_requests": delta.api_total(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--kind", choices=("app", "mi"), default="app")
    parser.add_argument("--state-dir", type=Path, help="a running sandbox to use")
    parser.add_argument("--control", type=float, default=60, help="seconds without operator")
    parser.add_argument("--steady", type=float, default=300, help="seconds at rest")
    parser.add_argument("--restart-window", type=float, default=90)
    parser.add_argument("--probe-window", type=float, default=180)
    parser.add_argument("--churn-minutes", type=float, default=3)
    parser.add_argument(
        "--drift-interval",
        type=float,
        default=STEADY_DRIFT_S,
        help="seconds between the measured operators' drift checks (the hourly figures assume "
        "the default 600 s either way)",
    )
    parser.add_argument("--no-sql", dest="sql", action="store_false")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    kind: Kind = args.kind
    profile = CloudProfile()
    results: dict[str, Any] = {
        "machine": machine(),
        "profile": profile.describe(),
        "n": args.n,
        "kind": kind,
        "sql": args.sql,
    }
    with Sandbox(args.state_dir) as sandbox:
        pool = sandbox.world.pool(kind)
        members = fleet(f"f{int(time.time()) % 100000}", args.n, pool)
        pairs = {pool[i].name: pool[i ^ 1] for i in range(len(pool))}
        sandbox.prepare(members, PHASE)
        sandbox.reset()
        try:
            step("control: no operator", args.control)
            meters = Meters(sandbox)
            before = meters.read()
            time.sleep(args.control)
            control = meters.since(before)
            meters.close()

            step(f"setup: onboarding {args.n} resources", None)
            operator, onboarded = onboard(
                sandbox, members, args.sql, args.timeout, args.drift_interval
            )
            results["setup_s"] = onboarded
            profile.apply(sandbox.admin)
            time.sleep(args.drift_interval)  # the first drift check after onboarding, not measured
            step("steady: nothing changes", args.steady)
            rss_before = operator.memory_mib()
            steady = window(sandbox, operator, args.steady, control)
            results["steady"] = record(steady)
            memory = operator.memory_mib()
            results["operator_memory_mib"] = {"start": rss_before, **memory}
            operator.stop()

            step("restart: resume pass", args.restart_window)
            env = sandbox.operator_env(drift_interval=DEFAULT_DRIFT_S)
            log = sandbox.state_dir / "operator-fleet-2.log"
            with OperatorProcess(env, log) as restarted:
                resumed = window(sandbox, restarted, args.restart_window, control)
                results["restart"] = record(resumed)
                results["restart"]["rss_mib"] = restarted.memory_mib()
                step(f"churn: {CHURN_SHARE_PER_MINUTE:.0%} a minute", args.churn_minutes * 60)
                results["churn"] = churn(sandbox, members, args.churn_minutes, pairs, args.timeout)
                results["churn"]["lower_bound_s"] = churn_bound(profile, kind)

            step("probes: a probe at every drift check", args.probe_window)
            env = sandbox.operator_env(drift_interval=args.drift_interval, SWI_VERIFY_INTERVAL="1")
            log = sandbox.state_dir / "operator-fleet-3.log"
            with OperatorProcess(env, log) as probing:
                time.sleep(args.restart_window)  # its resume pass probes everything once
                probed = window(sandbox, probing, args.probe_window, control)
                results["probe"] = record(probed)
        finally:
            sandbox.retire()
    results.update(per_hour(steady, probed, args.n))
    path = save(args.name or f"fleet-{kind}-{args.n}", results)
    print(f"\nresults: {path}")
    print(report(results))
    return 0


def churn_bound(profile: CloudProfile, kind: Kind) -> float:
    """One change needs, at least: a list, the new credential and the old one's removal."""
    if kind == "app":
        return profile.graph_latency * 3
    return profile.arm_latency * 3 + profile.arm_write_seconds * 2


def step(what: str, seconds: float | None) -> None:
    took = f" ({seconds:.0f} s)" if seconds else ""
    print(f"{time.strftime('%H:%M:%S')} {what}{took}", file=sys.stderr, flush=True)


def report(results: dict[str, Any]) -> str:
    n = results["n"]
    hour = results["per_hour"]
    rows = [
        ["Graph reads", f"{hour['graph_reads']:.2f}"],
        ["Graph writes", f"{hour['graph_writes']:.2f}"],
        ["ARM reads", f"{hour['arm_reads']:.2f}"],
        ["ARM writes", f"{hour['arm_writes']:.2f}"],
        ["token requests (probes' exchanges, the operator's own)", f"{hour['token_requests']:.2f}"],
        ["SQL logins", f"{hour['sql_logins']:.2f}"],
        ["SQL reads", f"{hour['sql_reads']:.2f}"],
        ["SQL writes", f"{hour['sql_writes']:.2f}"],
        ["Kubernetes API reads", f"{hour['api_reads']:.1f}"],
        ["Kubernetes API writes", f"{hour['api_writes']:.2f}"],
        ["operator CPU s", f"{hour['operator_cpu_s']:.3f}"],
    ]
    memory = results["operator_memory_mib"]
    restart = {k: v / n for k, v in results["restart"]["totals"].items()}
    churned = results["churn"]
    lines = [
        f"steady state at N={n}, per resource per hour (drift 600 s, probe 3600 s):",
        table(["what", "per resource per hour"], rows),
        "",
        f"operator RSS at N={n}: {memory['rss']:.0f} MiB (peak {memory['peak']:.0f} MiB)",
        f"restart (resume pass), per resource: Graph/ARM writes "
        f"{restart['graph_writes'] + restart['arm_writes']:.2f}, reads "
        f"{restart['graph_reads'] + restart['arm_reads']:.2f}, API requests "
        f"{restart['api_reads'] + restart['api_writes']:.1f}",
        "",
        f"churn: {churned['changes']} changes ({churned['per_minute']} a minute for "
        f"{churned['minutes']:g} min), {churned['converged']} converged; latency p50 "
        f"{_s(churned['latency_p50_s'])}, p95 {_s(churned['latency_p95_s'])}, max "
        f"{_s(churned['latency_max_s'])}; all converged {_s(churned['settle_after_last_change_s'])}"
        f" after the last change (lower bound per change {churned['lower_bound_s']:.1f} s)",
    ]
    return "\n".join(lines)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


if __name__ == "__main__":
    sys.exit(main())
