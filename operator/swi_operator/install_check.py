"""The chart's ``helm test``: checks an installed operator from a pod of the release's namespace
(charts/sql-workload-identity-operator/templates/tests/install-check.yaml).

Each check is what a platform engineer would otherwise try by hand after an install:

* the webhook Service answers TLS with a certificate for its DNS name that the configurations'
  CA (the mounted ``ca.crt``) verifies -- the API server's view of the webhook;
* with the policy webhook on, a server-side AdmissionReview of a SqlWorkloadIdentity gets a
  review back for the same request uid (allowed or refused, with the reason);
* with metrics on, the metrics Service serves ``swi_build_info`` (and the expected version, when
  the chart names one).

The standard library and prometheus-client's parser, both in the operator's image; nothing here
needs the cluster's API, so the test pod has no ServiceAccount token.
Exit status 0 when every check passed, 1 otherwise; one line per check on stdout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import ssl
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

POLICY_PATH = "/validate-sqlworkloadidentity"
TIMEOUT_S = 10.0


class CheckFailed(Exception):
    """One check failed; the message says what was seen."""


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str


def service_address(host: str, environ: Mapping[str, str]) -> str:
    """Where to connect for a Service's DNS name: the address Kubernetes puts in every pod's
    ``<SERVICE>_SERVICE_HOST`` for the Services of its namespace (so no cluster DNS is needed),
    else the name itself."""
    service = host.split(".", 1)[0]
    return environ.get(f"{service.upper().replace('-', '_')}_SERVICE_HOST") or host


class _Connection(http.client.HTTPSConnection):
    """HTTPS to ``address`` that verifies the certificate for ``host`` (SNI and name check)."""

    def __init__(self, host: str, port: int, address: str, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=TIMEOUT_S, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


def _request(
    url: str,
    ca_file: str | None,
    body: bytes | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request; the status and body, or CheckFailed naming the URL and the transport error."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    address = service_address(host, os.environ if environ is None else environ)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        try:
            context = ssl.create_default_context(cafile=ca_file)  # verified, hostname checked
        except (OSError, ValueError) as exc:  # missing or not a PEM certificate
            raise CheckFailed(f"the CA file {ca_file}: {exc}") from None
        connection = _Connection(host, parts.port or 443, address, context)
    else:
        connection = http.client.HTTPConnection(address, parts.port or 80, timeout=TIMEOUT_S)
    headers = {"Host": parts.netloc}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request("POST" if body else "GET", parts.path or "/", body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        via = f" (at {address})" if address != host else ""
        raise CheckFailed(f"{url}{via}: {exc}") from None
    finally:
        connection.close()


def check_tls(webhook_url: str, ca_file: str) -> str:
    """The webhook Service's certificate is valid for its name and issued by ``ca_file``'s CA."""
    status, _ = _request(webhook_url.rstrip("/") + "/", ca_file)
    host = urlsplit(webhook_url).hostname
    return f"{host}: TLS verified with the configurations' CA (HTTP {status} on /)"


def review(namespace: str) -> dict[str, object]:
    """A dry-run AdmissionReview of creating a SqlWorkloadIdentity, as the API server sends it."""
    obj = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlWorkloadIdentity",
        "metadata": {"name": "helm-test", "namespace": namespace},
        "spec": {
            "serviceAccountName": "helm-test",
            "identity": {"applicationClientId": "00000000-0000-0000-0000-000000000000"},
        },
    }
    gvk = {"group": "sqlidentity.io", "version": "v1alpha1", "kind": "SqlWorkloadIdentity"}
    gvr = {"group": "sqlidentity.io", "version": "v1alpha1", "resource": "sqlworkloadidentities"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": "helm-test",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:helm-test"},
            "object": obj,
            "oldObject": None,
            "dryRun": True,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def check_policy_review(webhook_url: str, ca_file: str, namespace: str) -> str:
    """The policy webhook answers a review of a SqlWorkloadIdentity for the same uid."""
    body = review(namespace)
    uid = body["request"]["uid"]  # type: ignore[index]
    url = webhook_url.rstrip("/") + POLICY_PATH
    status, raw = _request(url, ca_file, json.dumps(body).encode())
    if status != 200:
        raise CheckFailed(f"{POLICY_PATH}: HTTP {status}: {raw[:200]!r}")
    try:
        answer = json.loads(raw).get("response") or {}
    except (ValueError, AttributeError):
        raise CheckFailed(f"{POLICY_PATH}: not an AdmissionReview: {raw[:200]!r}") from None
    if answer.get("uid") != uid or not isinstance(answer.get("allowed"), bool):
        raise CheckFailed(f"{POLICY_PATH}: not a review of our request: {answer!r:.300}")
    verdict = "allowed" if answer["allowed"] else "refused"
    message = (answer.get("status") or {}).get("message", "")
    return f"{POLICY_PATH}: answered the review ({verdict}{': ' + message if message else ''})"


def check_metrics(metrics_url: str, version: str | None) -> str:
    """The metrics endpoint serves the operator's families, build info first."""
    status, raw = _request(metrics_url, None)
    if status != 200:
        raise CheckFailed(f"{metrics_url}: HTTP {status}")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    info = families.get("swi_build_info")
    if info is None or not info.samples:
        raise CheckFailed(f"{metrics_url}: no swi_build_info among {len(families)} families")
    running = info.samples[0].labels.get("version", "")
    if version and running != version:
        raise CheckFailed(f"{metrics_url}: the operator runs version {running}, not {version}")
    return f"{metrics_url}: {len(families)} metric families, version {running}"


def run(args: argparse.Namespace) -> list[Result]:
    checks: list[tuple[str, Callable[[], str]]] = []
    if args.webhook_url:
        checks.append(("webhook TLS", lambda: check_tls(args.webhook_url, args.ca_file)))
    if args.webhook_url and args.policy_webhook:
        checks.append(
            (
                "policy webhook",
                lambda: check_policy_review(args.webhook_url, args.ca_file, args.namespace),
            )
        )
    if args.metrics_url:
        checks.append(("metrics", lambda: check_metrics(args.metrics_url, args.version)))
    results = []
    for name, check in checks:
        try:
            results.append(Result(name, True, check()))
        except CheckFailed as exc:
            results.append(Result(name, False, str(exc)))
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m swi_operator.install_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--webhook-url", default="", help="https://<service>.<ns>.svc:443")
    parser.add_argument("--ca-file", default="", help="the CA the configurations trust")
    parser.add_argument("--namespace", default="default", help="namespace of the test review")
    parser.add_argument("--policy-webhook", action="store_true", help="send it a review")
    parser.add_argument("--metrics-url", default="", help="http://<service>:<port>/metrics")
    parser.add_argument("--version", default="", help="the version the operator must report")
    args = parser.parse_args(argv)
    if args.webhook_url and not args.ca_file:
        parser.error("--webhook-url needs --ca-file: the CA the webhook configurations trust")
    if not args.webhook_url and not args.metrics_url:
        parser.error("nothing to check: give --webhook-url, --metrics-url or both")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    results = run(parse_args(argv))
    for result in results:
        print(f"{'ok' if result.ok else 'FAILED'}: {result.name}: {result.detail}", flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
