"""Draw the benchmarks' results: onboarding time against N (operator, one-shot, lower bound), the
Ready curve of the largest run, and the churn convergence latencies.

    python bench/plot.py [--onboarding FILE] [--fleet FILE] [--out PNG]

Reads the JSON files bench/onboarding.py and bench/fleet.py wrote (by default the recorded full
run, bench/results/full-*.json) and writes one PNG (matplotlib's Agg backend: no display).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def load(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path and path.exists() else None


def onboarding_panel(ax: Any, data: dict[str, Any]) -> None:
    runs = sorted(data["runs"], key=lambda r: r["n"])
    ns = [r["n"] for r in runs]
    ax.plot(ns, [r["lower_bound_s"] for r in runs], "k--", marker="_", label="lower bound (quotas)")
    ax.plot(ns, [r["operator"]["seconds"] for r in runs], "o-", label="operator")
    if all("baseline" in r for r in runs):
        ax.plot(ns, [r["baseline"]["seconds"] for r in runs], "s-", label="one-shot, sequential")
    ax.set_xlabel("resources (N)")
    ax.set_ylabel("seconds, apply to all Ready")
    ax.set_title(
        f"Onboarding ({'app registrations' if data['kind'] == 'app' else 'managed identities'})"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()


def curve_panel(ax: Any, data: dict[str, Any]) -> None:
    run = max(data["runs"], key=lambda r: r["n"])
    curve = run["operator"]["ready_curve_s"]
    ax.step(curve, range(1, len(curve) + 1), where="post", label="operator: Ready")
    bound = data["profile"]
    rate = (
        bound["graph_write_rate"] if data["kind"] == "app" else bound["arm_subscription_write_rate"]
    )
    ax.plot([0, run["n"] / rate], [0, run["n"]], "k--", label=f"quota ({rate:g} writes/s)")
    if "baseline" in run:
        seconds = run["baseline"]["seconds"]
        ax.plot([0, seconds], [0, run["n"]], ":", label="one-shot (average pace)")
        ax.set_xlim(0, max(curve[-1], seconds) * 1.05)
    ax.set_xlabel("seconds since apply")
    ax.set_ylabel("resources Ready")
    ax.set_title(f"N = {run['n']}: resources Ready over time")
    ax.grid(True, alpha=0.3)
    ax.legend()


def churn_panel(ax: Any, fleet: dict[str, Any]) -> None:
    churn = fleet["churn"]
    ax.bar(
        ["p50", "p95", "max"],
        [churn["latency_p50_s"] or 0, churn["latency_p95_s"] or 0, churn["latency_max_s"] or 0],
    )
    ax.axhline(churn["lower_bound_s"], color="k", linestyle="--", label="lower bound per change")
    ax.set_ylabel("seconds, change to Ready")
    ax.set_title(f"Churn at N = {fleet['n']}: {churn['per_minute']} changes a minute")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onboarding", type=Path, default=RESULTS / "full-onboarding-app.json")
    parser.add_argument("--fleet", type=Path, default=RESULTS / "full-fleet-app-1000.json")
    parser.add_argument("--out", type=Path, default=DOCS / "benchmarks.png")
    args = parser.parse_args()
    onboarding, fleet = load(args.onboarding), load(args.fleet)
    if onboarding is None:
        print(f"error: no onboarding results at {args.onboarding}", file=sys.stderr)
        return 2
    panels = 3 if fleet else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    onboarding_panel(axes[0], onboarding)
    curve_panel(axes[1], onboarding)
    if fleet:
        churn_panel(axes[2], fleet)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
