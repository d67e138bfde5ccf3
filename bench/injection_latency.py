"""Admission latency the pod injection webhook adds (goal: p95 under 5 ms added).

    python bench/injection_latency.py [--pods 200] [--warmup 20] [--state-dir DIR] [--name RESULTS]
                                      [--operator-path DIR]

One sandbox; a fresh ``python -m swi_operator`` serving the pod injection webhook (self-managed
TLS, over HTTPS on loopback, as in tests/injection), with its readiness endpoint: the measurement
starts once it answers 200 (the webhook server answers and its service account cache has listed).
In a namespace of its own, with a service account annotated with a client id, the driver creates
pods through the API server one at a time, alternating (in a shuffled order per pair) a pod
labelled ``azure.workload.identity/use: "true"`` (the API server calls the webhook) and the same
pod without the label (the objectSelector skips the webhook: the baseline, in the same run, under
the same load). Each create is timed from the client; the pods never run (a nodeSelector no node
has). Reported: p50 / p95 of both, what the webhook adds (the difference of the same percentile),
the ratio; then, to split that time, the webhook alone (the same AdmissionReview POSTed straight
to it over one keep-alive HTTPS connection, as the API server's client does) and the operator's
own time in the handler (its ``swi_webhook_duration_seconds`` metric, sum over count), and the
API server's own timing of its calls to the webhook (``apiserver_admission_webhook_admission_
duration_seconds`` of our entry, mean). What those do not explain is the rest of the API server's
work for a mutated pod (applying the patch, defaulting and validating it again, a larger object).

The floor: a third pod kind, labelled only for a second MutatingWebhookConfiguration that is a
copy of ours (same rules, selectors, failure policy, timeout) pointing at a stand-in webhook
in this process (the standard library's HTTPS server on loopback) that answers every review at
once with the JSONPatch our webhook returned for the same pod. What the floor adds is what the
API server spends calling any webhook that injects as much, on this machine, in this run; what
ours adds beyond it is ours.

``--operator-path DIR`` puts DIR first on the operator's PYTHONPATH, e.g. the ``operator/`` folder
of another checkout (``git worktree add``) to measure an older webhook against the same sandbox.
Prints a table and writes bench/results/<name>.json; nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import http.client
import json
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    CLIENT_ID_ANNOTATION,
    RESULTS_DIR,
    USE_LABEL,
    OperatorProcess,
    Sandbox,
)
from bench.tokenless_pods import (
    CONFIGURATIONS,
    OPERATOR_NAMESPACE,
    install_configurations,
    remove_configurations,
)

WEBHOOK = "inject-workload-identity"
ENTRY = "inject-workload-identity.sqlidentity.io"  # the configuration's webhook name
CLIENT_ID = "5e0c1d9a-7b3f-4c2e-9a1d-00000000be9c"
FLOOR_LABEL = "sqlidentity.io/bench-floor"
FLOOR_CONFIGURATION = "swi-bench-floor"


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


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 (our own http URL)
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _handler_seconds(metrics_url: str) -> tuple[float, float, float, float]:
    """(sum, count) of the operator's time in the injection handler, and its service account
    reads from the cache and from the API server, from its metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as answer:  # noqa: S310
        text = answer.read().decode()
    found = {}
    for source in ("cache", "api"):
        match = re.search(
            rf'^swi_webhook_service_account_reads_total\{{source="{source}"\}} (\S+)$', text, re.M
        )
        found[source] = float(match.group(1)) if match else 0.0
    for kind in ("sum", "count"):
        match = re.search(
            rf'^swi_webhook_duration_seconds_{kind}\{{webhook="{WEBHOOK}"\}} (\S+)$', text, re.M
        )
        found[kind] = float(match.group(1)) if match else 0.0
    return found["sum"], found["count"], found["cache"], found["api"]


def _review(namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    """The AdmissionReview the API server sends for creating ``pod``."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": namespace,
            "userInfo": {"username": "bench"},
            "object": {
                **pod,
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**pod["metadata"], "namespace": namespace},
            },
            "dryRun": False,
        },
    }


def _injection_patch(port: int, namespace: str, pod: dict[str, Any]) -> str:
    """The base64 JSONPatch our webhook answers for ``pod`` (what the floor webhook returns)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # our own server on loopback
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        body = json.dumps(_review(namespace, pod)).encode()
        connection.request("POST", f"/{WEBHOOK}", body, {"Content-Type": "application/json"})
        patch = json.loads(connection.getresponse().read())["response"].get("patch")
    finally:
        connection.close()
    if not patch:
        raise SystemExit("error: the webhook did not inject the floor's model pod")
    return str(patch)


@contextlib.contextmanager
def floor_webhook(patch: str) -> Iterator[tuple[int, bytes]]:
    """A webhook that answers every review at once with ``patch``: the standard library's
    threaded HTTP/1.1 server (keep-alive, as the API server's client uses it) over TLS 1.3 on
    loopback, with a certificate for localhost. Yields its port and CA (PEM)."""
    from swi_operator.webhooks import issue_bundle, server_ssl_context

    bundle = issue_bundle(["localhost"], ["127.0.0.1"])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle's algorithm the second waits for the
        # API server's delayed ACK (about 40 ms each time); aiohttp, under kopf, sets it too.
        disable_nagle_algorithm = True

        def log_message(self, *_: Any) -> None:
            pass

        def do_POST(self) -> None:
            review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = json.dumps(
                {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {
                        "uid": review["request"]["uid"],
                        "allowed": True,
                        "patchType": "JSONPatch",
                        "patch": patch,
                    },
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    with tempfile.TemporaryDirectory(prefix="swi-bench-floor-") as tmp:
        crt, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        crt.write_bytes(bundle.tls_crt)
        key.write_bytes(bundle.tls_key)
        context = server_ssl_context()
        context.load_cert_chain(crt, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="floor-webhook", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), bundle.ca_crt
    finally:
        server.shutdown()
        server.server_close()


def install_floor(box: Sandbox, port: int, ca: bytes) -> None:
    """A copy of our injection configuration for the floor webhook and its own pod label."""
    ours = next(
        doc
        for path in CONFIGURATIONS
        for doc in yaml.safe_load_all(path.read_text())
        if doc and any(w.get("name") == ENTRY for w in doc.get("webhooks") or [])
    )
    floor = copy.deepcopy(ours)
    floor["metadata"] = {"name": FLOOR_CONFIGURATION}
    (entry,) = [w for w in floor["webhooks"] if w["name"] == ENTRY]
    entry["name"] = "floor.bench.sqlidentity.io"
    entry["objectSelector"] = {"matchLabels": {FLOOR_LABEL: "true"}}
    entry["clientConfig"] = {
        "url": f"https://localhost:{port}/",
        "caBundle": base64.b64encode(ca).decode(),
    }
    floor["webhooks"] = [entry]
    admission = box.api("AdmissionregistrationV1Api")
    with contextlib.suppress(Exception):  # left by an interrupted run
        admission.delete_mutating_webhook_configuration(FLOOR_CONFIGURATION)
    admission.create_mutating_webhook_configuration(floor)


def _direct_round_trips(
    port: int, namespace: str, pod: dict[str, Any], rounds: int, fresh: bool = False
) -> list[float]:
    """The webhook alone: the AdmissionReview the API server would send, POSTed over one
    keep-alive HTTPS connection, as the API server's webhook client does (``fresh``: a new
    connection, with its TLS handshake, for each)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # our own server on loopback; the API server verifies it
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    samples = []
    try:
        for i in range(rounds + 5):
            if fresh:
                connection.close()
            review = _review(namespace, pod)
            body = json.dumps(review).encode()
            started = time.perf_counter()
            connection.request("POST", f"/{WEBHOOK}", body, {"Content-Type": "application/json"})
            answer = json.loads(connection.getresponse().read())
            elapsed = (time.perf_counter() - started) * 1000
            if not answer["response"].get("patch"):
                raise SystemExit(f"error: the webhook did not inject: {answer}")
            if i >= 5:  # the first few: the TLS handshake and warm-up
                samples.append(elapsed)
    finally:
        connection.close()
    return samples


def _apiserver_webhook_seconds(box: Sandbox) -> tuple[float, float]:
    """(sum, count) of the API server's own timing of its calls to our webhook entry (from
    encoding the review to decoding the answer: apiserver_admission_webhook_admission_duration)."""
    text = subprocess.run(
        [box.kubectl, "get", "--raw", "/metrics"],
        check=True,
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=30,
    ).stdout
    found = {}
    for kind in ("sum", "count"):
        total = 0.0
        for line in text.splitlines():
            if (
                line.startswith(f"apiserver_admission_webhook_admission_duration_seconds_{kind}{{")
                and f'name="{ENTRY}"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        found[kind] = total
    return found["sum"], found["count"]


KIND_LABELS = {"ours": {USE_LABEL: "true"}, "none": {"b": "1"}, "floor": {FLOOR_LABEL: "true"}}


def _pod(name: str, labelled: bool | str, service_account: str) -> dict[str, Any]:
    kind = labelled if isinstance(labelled, str) else ("ours" if labelled else "none")
    return {
        "metadata": {"name": name, "labels": dict(KIND_LABELS[kind])},
        "spec": {
            "serviceAccountName": service_account,
            # No node has it: the pods stay Pending, admission is all that is measured.
            "nodeSelector": {"sqlidentity.io/admission-test-only": "true"},
            "containers": [{"name": "app", "image": "example.invalid/app:1"}],
        },
    }


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
    }


def measure(
    box: Sandbox,
    pods: int,
    warmup: int,
    log: Path,
    operator_path: Path | None,
    url_host: str = "localhost",
) -> dict[str, Any]:
    core = box.api("CoreV1Api")
    ns = f"inject-latency-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    service_account = "bench-app"
    core.create_namespaced_service_account(
        ns,
        {"metadata": {"name": service_account, "annotations": {CLIENT_ID_ANNOTATION: CLIENT_ID}}},
    )
    port, ready_port, metrics_port = _port(), _port(), _port()
    extra = {}
    if operator_path is not None:
        extra["PYTHONPATH"] = os.pathsep.join(
            [str(operator_path), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
    env = box.operator_env(
        600,
        SWI_NAMESPACES=ns,
        SWI_INJECTION_WEBHOOK="true",
        SWI_WORKLOAD_WEBHOOK="false",
        SWI_WEBHOOK_ADDR="127.0.0.1",
        SWI_WEBHOOK_PORT=str(port),
        SWI_WEBHOOK_URL_HOST=url_host,
        SWI_WEBHOOK_NAMESPACE=OPERATOR_NAMESPACE,
        SWI_READINESS=f"http://127.0.0.1:{ready_port}/readyz",
        SWI_METRICS_PORT=str(metrics_port),
        SWI_METRICS_ADDRESS="127.0.0.1",
        **extra,
    )
    kinds = list(KIND_LABELS)  # ours, none (the baseline), floor
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    rng = random.Random(19)
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    admission = box.api("AdmissionregistrationV1Api")
    with OperatorProcess(env, log):
        _wait(
            "the operator's readiness", lambda: _ready(f"http://127.0.0.1:{ready_port}/readyz"), 90
        )

        def injected(name: str) -> bool:
            made = core.create_namespaced_pod(ns, _pod(name, True, service_account))
            return any(e.name == "AZURE_CLIENT_ID" for e in made.spec.containers[0].env or [])

        probe = iter(range(1000))
        _wait("the webhook to inject", lambda: injected(f"probe-{next(probe)}"), 60, 0.5)
        patch = _injection_patch(port, ns, _pod("model", True, service_account))
        with floor_webhook(patch) as (floor_port, floor_ca):
            install_floor(box, floor_port, floor_ca)
            try:

                def floor_injects(name: str) -> bool:
                    made = core.create_namespaced_pod(ns, _pod(name, "floor", service_account))
                    env = made.spec.containers[0].env or []
                    return any(e.name == "AZURE_CLIENT_ID" for e in env)

                _wait("the floor webhook to inject", lambda: floor_injects(
                    f"floor-probe-{next(probe)}"), 60, 0.5)  # fmt: skip
                for i in range(warmup):  # connections, TLS sessions, the webhook clients
                    for kind in kinds:
                        core.create_namespaced_pod(
                            ns, _pod(f"warm-{i}-{kind}", kind, service_account)
                        )
                handler_before = _handler_seconds(metrics_url)
                apiserver_before = _apiserver_webhook_seconds(box)
                for i in range(pods):
                    order = list(kinds)
                    rng.shuffle(order)
                    for kind in order:
                        body = _pod(f"p-{i}-{kind}", kind, service_account)
                        started = time.perf_counter()
                        # The raw answer: decoding the larger injected pod into the client's
                        # models would be counted against the webhook otherwise.
                        core.create_namespaced_pod(ns, body, _preload_content=False).read()
                        samples[kind].append((time.perf_counter() - started) * 1000)
                handler_after = _handler_seconds(metrics_url)
                apiserver_after = _apiserver_webhook_seconds(box)
            finally:
                with contextlib.suppress(Exception):
                    admission.delete_mutating_webhook_configuration(FLOOR_CONFIGURATION)
        direct = _direct_round_trips(port, ns, _pod("direct", True, service_account), pods)
        handshakes = _direct_round_trips(
            port, ns, _pod("direct", True, service_account), pods // 2, fresh=True
        )
    with contextlib.suppress(Exception):
        core.delete_namespace(ns)
    with_webhook, baseline = _percentiles(samples["ours"]), _percentiles(samples["none"])
    floor = _percentiles(samples["floor"])
    calls = handler_after[1] - handler_before[1]
    handler_ms = (handler_after[0] - handler_before[0]) / calls * 1000 if calls else float("nan")
    server_calls = apiserver_after[1] - apiserver_before[1]
    server_ms = (
        (apiserver_after[0] - apiserver_before[0]) / server_calls * 1000
        if server_calls
        else float("nan")
    )
    return {
        "pods_per_kind": pods,
        "warmup": warmup,
        "operator_path": str(operator_path) if operator_path else None,
        "url_host": url_host,
        "baseline": baseline,
        "with_webhook": with_webhook,
        "added_ms": {
            "p50": round(with_webhook["p50_ms"] - baseline["p50_ms"], 2),
            "p95": round(with_webhook["p95_ms"] - baseline["p95_ms"], 2),
        },
        "floor": floor,
        "floor_added_ms": {
            "p50": round(floor["p50_ms"] - baseline["p50_ms"], 2),
            "p95": round(floor["p95_ms"] - baseline["p95_ms"], 2),
        },
        "added_over_floor_ms": {
            "p50": round(with_webhook["p50_ms"] - floor["p50_ms"], 2),
            "p95": round(with_webhook["p95_ms"] - floor["p95_ms"], 2),
        },
        "ratio": {
            "p50": round(with_webhook["p50_ms"] / baseline["p50_ms"], 2),
            "p95": round(with_webhook["p95_ms"] / baseline["p95_ms"], 2),
        },
        "direct_to_webhook": _percentiles(direct),
        "direct_new_connection_each": _percentiles(handshakes),
        "apiserver_webhook_call_mean_ms": round(server_ms, 3),
        "apiserver_webhook_calls": int(server_calls),
        "handler_mean_ms": round(handler_ms, 3),
        "service_account_reads": {
            "cache": int(handler_after[2] - handler_before[2]),
            "api": int(handler_after[3] - handler_before[3]),
        },
        "handler_calls": int(calls),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200, help="pods of each kind")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--state-dir", type=Path, help="a running sandbox to use")
    parser.add_argument("--name", default="injection-latency", help="results file name (or path)")
    parser.add_argument("--operator-path", type=Path, help="first on the operator's PYTHONPATH")
    parser.add_argument(
        "--url-host", default="localhost", help="the host the API server calls the webhook at"
    )
    args = parser.parse_args()
    out = Path(args.name) if "/" in args.name else RESULTS_DIR / f"{args.name}.json"
    with Sandbox(args.state_dir) as box:
        core = box.api("CoreV1Api")
        with contextlib.suppress(Exception):  # it exists
            core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
        installed = install_configurations(box)
        try:
            result = measure(
                box,
                args.pods,
                args.warmup,
                out.with_suffix(".log"),
                args.operator_path,
                args.url_host,
            )
        finally:
            remove_configurations(box, installed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    base, hooked, added = result["baseline"], result["with_webhook"], result["added_ms"]
    print(f"pod creates, {result['pods_per_kind']} of each kind, interleaved")
    print(f"{'':22} {'p50 ms':>8} {'p95 ms':>8}")
    print(f"{'without the label':22} {base['p50_ms']:>8.2f} {base['p95_ms']:>8.2f}")
    print(f"{'labelled (webhook)':22} {hooked['p50_ms']:>8.2f} {hooked['p95_ms']:>8.2f}")
    print(f"{'added by the webhook':22} {added['p50']:>8.2f} {added['p95']:>8.2f}")
    floor, over = result["floor"], result["added_over_floor_ms"]
    print(f"{'floor webhook':22} {floor['p50_ms']:>8.2f} {floor['p95_ms']:>8.2f}")
    print(f"{'added by the floor':22} {result['floor_added_ms']['p50']:>8.2f} "
          f"{result['floor_added_ms']['p95']:>8.2f}")  # fmt: skip
    print(f"{'ours over the floor':22} {over['p50']:>8.2f} {over['p95']:>8.2f}")
    print(f"ratio p50 {result['ratio']['p50']}, p95 {result['ratio']['p95']}")
    direct = result["direct_to_webhook"]
    print(
        f"the webhook alone (AdmissionReview over keep-alive HTTPS): p50 {direct['p50_ms']} ms, "
        f"p95 {direct['p95_ms']} ms; the operator's handler, mean: {result['handler_mean_ms']} ms"
    )
    fresh = result["direct_new_connection_each"]
    print(f"the webhook alone, a new TLS connection each: p50 {fresh['p50_ms']} ms")
    print(
        f"the API server's own timing of its call to the webhook, mean: "
        f"{result['apiserver_webhook_call_mean_ms']} ms over {result['apiserver_webhook_calls']}"
    )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
