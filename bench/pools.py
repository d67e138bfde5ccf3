"""Identity pools at scale (issue 21): namespaces onboarded onto one pool that grows itself, across
two clusters, against Graph's write quota; then a fleet on pools at rest, and the operator's memory.

    python bench/pools.py [--namespaces 1000] [--clusters 1|2] [--at-rest 5000]
                          [--steady 330] [--restart-steady 120]
                          [--state-dir DIR] [--no-limits] [--name RESULTS]

One sandbox (and with ``--clusters 2`` a second cluster attached to its cloud: its own control
plane and issuer, the same Entra and SQL emulators), in this order:

1. onboarding: a SqlIdentityPool of one app registration (``bench-app-000``) that may grow to
   ``ceil(namespaces / 20) + 10`` members, the same manifest in each cluster, and the policy that
   lets the bench's namespaces use it; then one namespace per team, each with a Deployment and a
   SqlWorkloadIdentity naming the pool, split evenly between the clusters and created at once, an
   operator in each cluster. The clock stops when the last resource is Ready in both. The lower
   bound is Graph's write quota (shared with the other cluster's operator: the same app) over the
   credential writes plus the grown apps' two writes each (the application, its service
   principal); nothing was created by hand but the first member.
2. at rest (``--at-rest M``, 0 to skip): the cloud reset, no latency or quotas; M resources over
   M / 10 namespaces in the first cluster, onto a new pool that grows to ``ceil(M / 20)``
   members; once all are Ready, ``--steady`` seconds at rest with a drift check and a pool status
   every 60 s and the sweep every 300 s (the default 330 s holds at least one of each); the
   operator's resident memory after it, the most it held at rest (sampled every second from the
   end of the first drift cycle after Ready, later cycles included: a memory limit must hold
   through them; the samples are in the results) and its peak, against 512 MiB. Then
   (``--restart-steady S``, 0 to skip) a new operator over the same fleet, as after an upgrade:
   kopf resumes every resource at once; the time and CPU to resume them all, and the most it
   holds in the S seconds from the end of the first drift cycle after the last resume.

Prints tables and writes bench/results/<name>.json; nothing is asserted (tests/bench/ checks the
driver runs).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    GROUP,
    VERSION,
    CloudProfile,
    Identity,
    Member,
    Meters,
    OperatorProcess,
    ReadyTracker,
    Sandbox,
    SecondCluster,
    machine,
    save,
    table,
)

POOLS = "sqlidentitypools"
CREDENTIALS_PER_MEMBER = 20  # Entra's limit
REST_PER_NAMESPACE = 10
MEMORY_BOUND_MIB = 512
STEADY_DRIFT_S = 60.0
SETTLE_S = 5.0


def pool_members(prefix: str, n: int, namespaces: int, pool: Identity) -> list[Member]:
    """``n`` members over ``namespaces`` namespaces, every one on ``pool``."""
    return [
        Member(
            index=i,
            namespace=f"{prefix}-{i % namespaces:04d}",
            name=f"swi-{i:04d}",
            service_account=f"sa-{i:04d}",
            deployment=f"app-{i:04d}",
            identity=pool,
        )
        for i in range(n)
    ]


def create_pool(cluster: Sandbox, name: str, first_member: str, max_members: int) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SqlIdentityPool",
        "metadata": {"name": name},
        "spec": {
            "members": [{"applicationClientId": first_member}],
            "growth": {"maxMembers": max_members},
        },
    }
    cluster.api("CustomObjectsApi").create_cluster_custom_object(GROUP, VERSION, POOLS, body)


def delete_pool(cluster: Sandbox, name: str) -> None:
    with contextlib.suppress(Exception):
        cluster.api("CustomObjectsApi").delete_cluster_custom_object(GROUP, VERSION, POOLS, name)


def pool_status(cluster: Sandbox, name: str) -> dict[str, Any]:
    obj = cluster.api("CustomObjectsApi").get_cluster_custom_object(GROUP, VERSION, POOLS, name)
    return dict(obj.get("status") or {})


def credentials_per_member(sandbox: Sandbox, names: set[str]) -> list[int]:
    """Federated credentials (every issuer's) on each principal named in ``names`` (two apps of
    one name count as two members)."""
    state = sandbox.admin.call("GET", "state")
    return [len(p["credentials"]) for p in state["principals"] if p["name"] in names]


def apps_named(sandbox: Sandbox, prefix: str) -> list[str]:
    """Display names of the applications whose name starts with ``prefix`` (duplicates kept)."""
    state = sandbox.admin.call("GET", "state")
    return sorted(
        str(p["name"])
        for p in state["principals"]
        if p["kind"] == "application" and str(p["name"]).startswith(prefix)
    )


@contextlib.contextmanager
def operators(clusters: Sequence[Sandbox], tag: str, drift: float) -> Iterator[list[Any]]:
    with contextlib.ExitStack() as stack:
        running = [
            stack.enter_context(
                OperatorProcess(
                    c.operator_env(drift_interval=drift), c.state_dir / f"operator-{tag}.log"
                )
            )
            for c in clusters
        ]
        yield running


def why_not_ready(tracker: ReadyTracker, keys: Sequence[tuple[str, str, int]]) -> dict[str, str]:
    """One message of each condition that holds a resource back, by condition type and reason."""
    found: dict[str, str] = {}
    for namespace, name, _ in keys:
        obj = tracker.last.get((namespace, name)) or {}
        if (namespace, name, 1) in tracker.ready_at:
            continue
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("status") != "True" and c.get("type") != "Ready":
                found.setdefault(f"{c.get('type')}/{c.get('reason')}", str(c.get("message")))
    return found


def split(members: Sequence[Member], parts: int) -> list[list[Member]]:
    """Whole namespaces to each cluster, in turn."""
    namespaces = sorted({m.namespace for m in members})
    owner = {ns: i % parts for i, ns in enumerate(namespaces)}
    return [[m for m in members if owner[m.namespace] == i] for i in range(parts)]


def run_onboarding(
    clusters: Sequence[Sandbox], namespaces: int, profile: CloudProfile, timeout: float
) -> dict[str, Any]:
    first = clusters[0]
    tag = f"p{int(time.time()) % 100000}"
    pool = Identity.pool(f"bench-pool-{tag}")
    seed = first.world.apps[0]
    needed = math.ceil(namespaces / CREDENTIALS_PER_MEMBER)
    members = pool_members(tag, namespaces, namespaces, pool)
    shares = split(members, len(clusters))
    first.reset()
    for cluster, share in zip(clusters, shares, strict=True):
        create_pool(cluster, pool.name, seed.client_id, needed + 10)
        cluster.prepare(share, tag)  # namespaces, Deployments, the pool's policy
    time.sleep(SETTLE_S)
    profile.apply(first.admin)
    meters = Meters(first)
    try:
        with (
            operators(clusters, tag, drift=600) as running,
            contextlib.ExitStack() as trackers,
        ):
            tracking = [trackers.enter_context(ReadyTracker(c, tag)) for c in clusters]
            time.sleep(2)
            idle = [(op.cpu_seconds(), op.memory_mib()["rss"]) for op in running]
            second_cp = [
                c.controlplane_cpu_seconds() for c in clusters if isinstance(c, SecondCluster)
            ]
            before, wall = meters.read(), time.time()
            started = time.monotonic()
            for cluster, share in zip(clusters, shares, strict=True):
                cluster.apply(share, tag, sql=True)
            applied = time.monotonic() - started
            done: list[float | None] = []
            for tracker, share in zip(tracking, shares, strict=True):
                keys = [(m.namespace, m.name, 1) for m in share]
                left = max(1.0, timeout - (time.monotonic() - started))
                done.append(tracker.wait(keys, left))
            finished = None if None in done else max(d for d in done if d is not None)
            seconds = finished - started if finished is not None else None
            delta = meters.since(before)
            second_cp_cpu = sum(
                c.controlplane_cpu_seconds() for c in clusters if isinstance(c, SecondCluster)
            ) - sum(second_cp)
            per_cluster = []
            for cluster, op, (cpu0, rss0), tracker, share in zip(
                clusters, running, idle, tracking, shares, strict=True
            ):
                keys = [(m.namespace, m.name, 1) for m in share]
                status = pool_status(cluster, pool.name)
                per_cluster.append(
                    {
                        "resources": len(share),
                        "ready": sum(1 for k in keys if k in tracker.ready_at),
                        "last_ready_s": max(
                            (tracker.ready_at[k] - started for k in keys if k in tracker.ready_at),
                            default=None,
                        ),
                        "not_ready": dict(tracker.not_ready(keys)),
                        "not_ready_why": why_not_ready(tracker, keys),
                        "operator_cpu_s": op.cpu_seconds() - cpu0,
                        "operator_rss_idle_mib": rss0,
                        "operator_rss_mib": op.memory_mib()["rss"],
                        "operator_peak_rss_mib": op.memory_mib()["peak"],
                        "pool_members": status.get("memberCount"),
                        "pool_grown": len(status.get("grown") or []),
                        "pool_credentials": status.get("credentials"),
                    }
                )
    finally:
        meters.close()
        for cluster in clusters:
            cluster.retire(tag)
            delete_pool(cluster, pool.name)
    grown_prefix = f"swi-pool-{pool.name}-"
    grown_apps = apps_named(first, grown_prefix)
    counts = credentials_per_member(first, {seed.name, *grown_apps})
    graph_writes = sum(
        n
        for route, n in delta.entra.items()
        if route.startswith("graph.") and route.rsplit(".", 1)[-1] in ("create", "update", "delete")
    )
    # The fewest Graph writes that do the job: one credential each, two writes per member grown.
    bound = profile.lower_bound("app", [namespaces + 2 * (needed - 1)])
    return {
        "namespaces": namespaces,
        "clusters": len(clusters),
        "pool": pool.name,
        "members_needed": needed,
        "seconds": seconds,
        "apply_s": applied,
        "lower_bound_s": bound,
        "apps_created": len(grown_apps),
        "apps_created_distinct_names": len(set(grown_apps)),
        "credentials_per_member": {
            "members_used": sum(1 for n in counts if n),
            "max": max(counts, default=0),
            "min_used": min((n for n in counts if n), default=0),
            "total": sum(counts),
        },
        "graph_writes": graph_writes,
        "entra_calls": dict(delta.entra),
        "throttled": sum(
            1 for r in first.admin.requests()["log"] if r["at"] >= wall and r["status"] == 429
        ),
        "cpu_s": {**delta.cpu, "controlplane-2": second_cp_cpu},
        "api_requests_first_cluster": delta.api_total(),
        "per_cluster": per_cluster,
    }


def restart_at_rest(
    env: dict[str, str], log: Path, n: int, steady: float, timeout: float
) -> dict[str, Any]:
    """A new operator over the fleet at rest (an upgrade, a rescheduled pod): kopf resumes all
    ``n`` resources at once. Sampled every second until ``steady`` seconds after the end of the
    first drift cycle that follows the last resume, which is where "at rest" is judged from."""
    series: list[tuple[float, float, int, int]] = []  # s since start, RSS MiB, resumed, cycles
    resumed_s = resume_cpu_s = rest_from = None
    with OperatorProcess(env, log) as operator:
        cycles_then = operator.drift_checks()
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < timeout:
            time.sleep(1)
            resumed, cycles = operator.resumed(), operator.drift_checks() - cycles_then
            series.append(
                (round(elapsed, 1), round(operator.memory_mib()["rss"], 1), resumed, cycles)
            )
            if resumed_s is None and resumed >= n:
                resumed_s, resume_cpu_s, cycles_resumed = elapsed, operator.cpu_seconds(), cycles
            if rest_from is None and resumed_s is not None and cycles > cycles_resumed:
                rest_from = elapsed
            if rest_from is not None and elapsed >= rest_from + steady:
                break
        memory = operator.memory_mib()
    return {
        "resumed_s": resumed_s,
        "resume_cpu_s": resume_cpu_s,
        "resumed": series[-1][2] if series else 0,
        "rest_from_s": rest_from,
        "rss_at_rest_max_mib": max(
            (rss for t, rss, _, _ in series if rest_from is not None and t >= rest_from),
            default=None,
        ),
        "rss_mib": memory["rss"],
        "peak_rss_mib": memory["peak"],
        "rss_series": series,
    }


def run_at_rest(
    sandbox: Sandbox, n: int, steady: float, timeout: float, restart_steady: float = 0
) -> dict[str, Any]:
    tag = f"r{int(time.time()) % 100000}"
    pool = Identity.pool(f"bench-rest-{tag}")
    needed = math.ceil(n / CREDENTIALS_PER_MEMBER)
    members = pool_members(tag, n, max(1, n // REST_PER_NAMESPACE), pool)
    sandbox.reset()
    CloudProfile.none().apply(sandbox.admin)
    create_pool(sandbox, pool.name, sandbox.world.apps[0].client_id, needed)
    sandbox.prepare(members, tag)
    time.sleep(SETTLE_S)
    log = sandbox.state_dir / f"operator-{tag}.log"
    try:
        with (
            OperatorProcess(sandbox.operator_env(drift_interval=STEADY_DRIFT_S), log) as operator,
            ReadyTracker(sandbox, tag) as tracker,
        ):
            time.sleep(2)
            idle = operator.memory_mib()["rss"]
            started = time.monotonic()
            sandbox.apply(members, tag, sql=True)
            keys = [(m.namespace, m.name, 1) for m in members]
            done = tracker.wait(keys, timeout)
            setup_s = done - started if done is not None else None
            ready = sum(1 for k in keys if k in tracker.ready_at)
            after_setup = operator.memory_mib()
            cycles_before = operator.drift_checks()
            sweeps_before = operator.sweeps()
            cpu_before = operator.cpu_seconds()
            # Sampled every second through the drift cycles and sweeps (a memory limit must hold
            # through them too): seconds since Ready, RSS MiB, drift cycles finished since Ready.
            series: list[tuple[float, float, int]] = []
            start = time.monotonic()
            while (now := time.monotonic()) < start + steady:
                time.sleep(min(1.0, start + steady - now))
                series.append(
                    (
                        round(time.monotonic() - start, 1),
                        round(operator.memory_mib()["rss"], 1),
                        operator.drift_checks() - cycles_before,
                    )
                )
            rest_cpu = operator.cpu_seconds() - cpu_before
            cycles = operator.drift_checks() - cycles_before
            sweeps = operator.sweeps() - sweeps_before
            memory = operator.memory_mib()
            status = pool_status(sandbox, pool.name)
            not_ready = dict(tracker.not_ready(keys))
            not_ready_why = why_not_ready(tracker, keys)
        restart = None
        if restart_steady:
            env = sandbox.operator_env(drift_interval=STEADY_DRIFT_S)
            again = log.with_name(f"operator-{tag}-restart.log")
            restart = restart_at_rest(env, again, n, restart_steady, timeout)
    finally:
        sandbox.retire(tag)
        delete_pool(sandbox, pool.name)
    return {
        "resources": n,
        "namespaces": len({m.namespace for m in members}),
        "pool": pool.name,
        "members_needed": needed,
        "pool_members": status.get("memberCount"),
        "pool_credentials": status.get("credentials"),
        "setup_s": setup_s,
        "ready": ready,
        "not_ready": not_ready,
        "not_ready_why": not_ready_why,
        "steady_s": steady,
        "drift_cycles": cycles,
        "sweeps": sweeps,
        "steady_cpu_s": rest_cpu,
        "operator_rss_idle_mib": idle,
        "operator_rss_after_setup_mib": after_setup["rss"],
        "operator_rss_mib": memory["rss"],
        # At rest: from the end of the first drift cycle after Ready (the fleet checked once).
        "operator_rss_at_rest_max_mib": max(
            (rss for _, rss, cycles in series if cycles >= 1), default=memory["rss"]
        ),
        "operator_rss_series": series,
        "operator_peak_rss_mib": memory["peak"],
        "memory_bound_mib": MEMORY_BOUND_MIB,
        "restart": restart,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(results: dict[str, Any]) -> str:
    out = []
    onboard = results.get("onboarding")
    if onboard:
        seconds, bound = onboard["seconds"], onboard["lower_bound_s"]
        per = onboard["credentials_per_member"]
        each = onboard["per_cluster"]
        out.append(
            table(
                [
                    "namespaces",
                    "clusters",
                    "Ready",
                    "operator s",
                    "lower bound s",
                    "operator / bound",
                    "members needed",
                    "apps grown (distinct names)",
                    "credentials / member (max, min)",
                    "Graph writes",
                    "429s",
                    "operator CPU s (each)",
                    "RSS MiB peak (each)",
                ],
                [
                    [
                        onboard["namespaces"],
                        onboard["clusters"],
                        sum(c["ready"] for c in each),
                        _fmt(seconds),
                        _fmt(bound),
                        _fmt(seconds / bound, 2) if seconds and bound else "-",
                        onboard["members_needed"],
                        f"{onboard['apps_created']} ({onboard['apps_created_distinct_names']})",
                        f"{per['max']}, {per['min_used']}",
                        onboard["graph_writes"],
                        onboard["throttled"],
                        ", ".join(_fmt(c["operator_cpu_s"]) for c in each),
                        ", ".join(_fmt(c["operator_peak_rss_mib"], 0) for c in each),
                    ]
                ],
            )
        )
    rest = results.get("at_rest")
    if rest:
        out.append(
            table(
                [
                    "resources",
                    "namespaces",
                    "pool members",
                    "Ready",
                    "setup s",
                    "drift cycles, sweeps",
                    "RSS MiB idle -> at rest (most at rest; peak of the run)",
                    "bound MiB",
                ],
                [
                    [
                        rest["resources"],
                        rest["namespaces"],
                        rest["pool_members"],
                        rest["ready"],
                        _fmt(rest["setup_s"]),
                        f"{rest['drift_cycles']}, {rest.get('sweeps', '-')}",
                        f"{rest['operator_rss_idle_mib']:.0f} -> "
                        f"{rest['operator_rss_mib']:.0f} "
                        f"({rest['operator_rss_at_rest_max_mib']:.0f}; "
                        f"{rest['operator_peak_rss_mib']:.0f})",
                        rest["memory_bound_mib"],
                    ]
                ],
            )
        )
    again = (rest or {}).get("restart")
    if again:
        out.append(
            table(
                [
                    "after a restart: resumed",
                    "in s (operator CPU s)",
                    "RSS MiB most at rest (from the first drift cycle after the resume)",
                    "peak",
                    "bound MiB",
                ],
                [
                    [
                        again["resumed"],
                        f"{_fmt(again['resumed_s'])} ({_fmt(again['resume_cpu_s'])})",
                        _fmt(again["rss_at_rest_max_mib"], 0),
                        _fmt(again["peak_rss_mib"], 0),
                        MEMORY_BOUND_MIB,
                    ]
                ],
            )
        )
    return "\n\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=1000, help="onboarded onto one pool")
    parser.add_argument("--clusters", type=int, choices=(1, 2), default=2)
    parser.add_argument("--at-rest", type=int, default=5000, help="resources at rest (0: skip)")
    parser.add_argument(
        "--steady", type=float, default=330.0, help="seconds at rest (330: a sweep falls in them)"
    )
    parser.add_argument(
        "--restart-steady",
        type=float,
        default=120.0,
        help="then restart the operator: seconds at rest after its resume (0: no restart)",
    )
    parser.add_argument("--state-dir", type=Path, help="a running sandbox to use")
    parser.add_argument("--no-limits", action="store_true", help="no injected latency or quotas")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for Ready")
    parser.add_argument("--name", default="pools", help="results: bench/results/NAME.json")
    args = parser.parse_args()
    profile = CloudProfile.none() if args.no_limits else CloudProfile()
    results: dict[str, Any] = {"machine": machine(), "profile": profile.describe()}
    with Sandbox(args.state_dir) as sandbox, contextlib.ExitStack() as stack:
        clusters: list[Sandbox] = [sandbox]
        if args.clusters == 2:
            clusters.append(stack.enter_context(SecondCluster(sandbox)))
        if args.namespaces:
            print(f"onboarding {args.namespaces} namespaces ...", file=sys.stderr, flush=True)
            results["onboarding"] = run_onboarding(clusters, args.namespaces, profile, args.timeout)
        if args.at_rest:
            print(f"{args.at_rest} resources at rest ...", file=sys.stderr, flush=True)
            results["at_rest"] = run_at_rest(
                sandbox, args.at_rest, args.steady, args.timeout, args.restart_steady
            )
    path = save(args.name, results)
    print(summary(results))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
