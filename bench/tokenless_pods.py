"""Pods created without a token after a Deployment create (goal: 0), with and without the workload
labelling webhook.

    python bench/tokenless_pods.py [--deployments 10] [--replicas 2] [--drift-interval 10]
                                   [--state-dir DIR] [--name RESULTS]

One sandbox; for each mode a fresh ``python -m swi_operator`` serving the pod injection webhook
(the AKS add-on's stand-in), with the workload labelling webhook off (``drift``: the drift check
labels, as before) or on (``webhook``). In a namespace of its own, each mode applies one
SqlWorkloadIdentity per Deployment and waits until they are Ready; then it creates the
Deployments (README step 9's shape: ``app`` on the pod template only) and waits until every one
is labelled and its labelled ReplicaSet has its pods. Counted then: the pods of those service
accounts that the API server created without the injected token, and the seconds from a
Deployment's create to its labelled template (the API server's answer in ``webhook`` mode).

The sandbox has no kubelet: pods stay Pending, so a rollout never finishes and the tokenless pods
of the first ReplicaSet stay to be counted. Prints a table and writes bench/results/<name>.json;
nothing is asserted (tests/bench/ checks that the driver runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.harness import (
    FLEET_LABEL,
    GROUP,
    PLURAL,
    REPO,
    RESULTS_DIR,
    USE_LABEL,
    VERSION,
    OperatorProcess,
    Sandbox,
)

OPERATOR_NAMESPACE = "sql-workload-identity-system"
CONFIGURATIONS = (
    REPO / "deploy/base/webhook.yaml",
    REPO / "deploy/components/injection-webhook/mutatingwebhookconfiguration.yaml",
)
TOKEN_ENV = "AZURE_FEDERATED_TOKEN_FILE"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise SystemExit(f"error: timed out waiting for {what}")


def install_configurations(box: Sandbox) -> list[str]:
    """The deployed MutatingWebhookConfigurations (the operator points them at itself)."""
    admission = box.api("AdmissionregistrationV1Api")
    names = []
    for path in CONFIGURATIONS:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "MutatingWebhookConfiguration":
                continue
            name = doc["metadata"]["name"]
            with contextlib.suppress(Exception):  # absent is fine
                admission.delete_mutating_webhook_configuration(name)
            admission.create_mutating_webhook_configuration(doc)
            names.append(name)
    return names


def remove_configurations(box: Sandbox, names: list[str]) -> None:
    admission = box.api("AdmissionregistrationV1Api")
    for name in names:
        with contextlib.suppress(Exception):  # already gone
            admission.delete_mutating_webhook_configuration(name)


def _deployment(name: str, service_account: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": service_account,
                    "containers": [{"name": "app", "image": "example.invalid/app:1"}],
                },
            },
        },
    }


def _has_token(pod: Any) -> bool:
    return any(e.name == TOKEN_ENV for c in pod.spec.containers for e in c.env or [])


def run_mode(
    box: Sandbox, mode: str, deployments: int, replicas: int, drift: float, log: Path
) -> dict[str, Any]:
    core, apps = box.api("CoreV1Api"), box.api("AppsV1Api")
    custom = box.api("CustomObjectsApi")
    ns = f"tokenless-{mode}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns, "labels": {FLEET_LABEL: "true"}}})
    # An app of its own per mode: each resource adds a federated credential (20 at most each).
    identity = box.world.apps[0 if mode == "drift" else 1]
    box.authorize([identity])
    port = _port()
    env = box.operator_env(
        drift,
        SWI_NAMESPACES=ns,
        SWI_INJECTION_WEBHOOK="true",
        SWI_WORKLOAD_WEBHOOK="true" if mode == "webhook" else "false",
        SWI_WEBHOOK_ADDR="127.0.0.1",
        SWI_WEBHOOK_PORT=str(port),
        SWI_WEBHOOK_URL_HOST="localhost",
        SWI_WEBHOOK_NAMESPACE=OPERATOR_NAMESPACE,
    )
    names = [f"api-{i}" for i in range(deployments)]
    with OperatorProcess(env, log):
        admission = box.api("AdmissionregistrationV1Api")
        injection = "sql-workload-identity-operator-injection"
        _wait(
            "the injection webhook",
            lambda: (
                admission.read_mutating_webhook_configuration(injection)
                .webhooks[0]
                .client_config.url
                or ""
            ).startswith(f"https://localhost:{port}/"),
            60,
        )
        if mode == "webhook":
            workloads = "sql-workload-identity-operator-workloads"
            _wait(
                "the workload webhook",
                lambda: (
                    admission.read_mutating_webhook_configuration(workloads)
                    .webhooks[0]
                    .client_config.url
                    or ""
                ).startswith(f"https://localhost:{port}/"),
                60,
            )
        for name in names:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "SqlWorkloadIdentity",
                "metadata": {"name": name},
                "spec": {
                    "serviceAccountName": name,
                    "identity": identity.spec(),
                    "workloads": {"selector": {"matchLabels": {"app": name}}},
                },
            }
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

        def all_ready() -> bool:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            return len(items) == deployments and all(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (i.get("status") or {}).get("conditions") or []
                )
                for i in items
            )

        _wait("the resources to be Ready", all_ready, 300)

        created: dict[str, float] = {}
        labelled: dict[str, float] = {}
        for name in names:
            created[name] = time.monotonic()
            made = apps.create_namespaced_deployment(ns, _deployment(name, name, replicas))
            if (made.spec.template.metadata.labels or {}).get(USE_LABEL) == "true":
                labelled[name] = time.monotonic()

        def settled() -> bool:
            for d in apps.list_namespaced_deployment(ns).items:
                if (
                    d.metadata.name not in labelled
                    and (d.spec.template.metadata.labels or {}).get(USE_LABEL) == "true"
                ):
                    labelled[d.metadata.name] = time.monotonic()
            if len(labelled) < deployments:
                return False
            pods = core.list_namespaced_pod(ns).items
            injected = [p for p in pods if _has_token(p)]
            # Every Deployment's labelled ReplicaSet has made its pods (or its surge share).
            return len({p.spec.service_account_name for p in injected}) == deployments

        _wait("every Deployment labelled with injected pods", settled, 60 + 3 * drift, 0.5)
        pods = [
            p for p in core.list_namespaced_pod(ns).items if p.spec.service_account_name in names
        ]
        # Deleted while the operator runs: its finalizer removes the federated credentials.
        for name in names:
            custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        _wait(
            "the resources to be deleted",
            lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"],
            120,
        )
    core.delete_namespace(ns)
    without = sorted(p.metadata.name for p in pods if not _has_token(p))
    to_label = [labelled[n] - created[n] for n in names]
    return {
        "mode": mode,
        "deployments": deployments,
        "replicas": replicas,
        "drift_interval_s": drift,
        "pods": len(pods),
        "pods_without_token": len(without),
        "pods_without_token_names": without[:20],
        "create_to_labelled_s": {
            "median": statistics.median(to_label),
            "max": max(to_label),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployments", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--drift-interval", type=float, default=10.0)
    parser.add_argument("--state-dir", type=Path, help="a running sandbox to use")
    parser.add_argument("--name", default="tokenless-pods", help="results file name (or path)")
    args = parser.parse_args()
    out = Path(args.name) if "/" in args.name else RESULTS_DIR / f"{args.name}.json"
    runs = []
    with Sandbox(args.state_dir) as box:
        core = box.api("CoreV1Api")
        with contextlib.suppress(Exception):  # it exists
            core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
        installed = install_configurations(box)
        try:
            for mode in ("drift", "webhook"):
                log = out.with_suffix(f".{mode}.log")
                runs.append(
                    run_mode(box, mode, args.deployments, args.replicas, args.drift_interval, log)
                )
        finally:
            remove_configurations(box, installed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    header = ("mode", "deployments", "pods", "without token", "to label (median, max)")
    print("{:8} {:>11} {:>5} {:>14} {:>24}".format(*header))
    for run in runs:
        label = run["create_to_labelled_s"]
        print(
            f"{run['mode']:8} {run['deployments']:>11} {run['pods']:>5} "
            f"{run['pods_without_token']:>14} {label['median']:>14.2f} s, {label['max']:.2f} s"
        )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
