"""The chart's `helm test` check (swi_operator.install_check) against local servers: a TLS server
with a certificate for a Service name, reached through the `<SERVICE>_SERVICE_HOST` address as in
a pod, and a plain metrics endpoint. The e2e tier runs it in the chart's test pod."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from swi_operator import install_check
from swi_operator.webhooks import issue_bundle, server_ssl_context

HOST = "swi-webhook.swi-system.svc"
ENV = {"SWI_WEBHOOK_SERVICE_HOST": "127.0.0.1", "SWI_METRICS_SERVICE_HOST": "127.0.0.1"}


class Handler(BaseHTTPRequestHandler):
    answer_uid: str | None = None  # None: echo the request's uid
    metrics = '# TYPE swi_build_info gauge\nswi_build_info{version="0.1.0"} 1.0\n'

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = self.metrics.encode() if self.path == "/metrics" else b"not found"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        uid = self.answer_uid or review["request"]["uid"]
        message = f"host {self.headers['Host']}"
        body = json.dumps(
            {"response": {"uid": uid, "allowed": False, "status": {"message": message}}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    bundle = issue_bundle([HOST], [])
    (tmp_path / "tls.crt").write_bytes(bundle.tls_crt)
    (tmp_path / "tls.key").write_bytes(bundle.tls_key)
    (tmp_path / "ca.crt").write_bytes(bundle.ca_crt)
    context = server_ssl_context()
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for port in _serve(server):
        yield port, tmp_path / "ca.crt"


@pytest.fixture
def metrics_server() -> Iterator[int]:
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler))


@pytest.fixture(autouse=True)
def service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    Handler.answer_uid = None


def test_service_address_is_the_service_link_variable_else_the_name() -> None:
    assert install_check.service_address(HOST, ENV) == "127.0.0.1"
    assert install_check.service_address("other.ns.svc", ENV) == "other.ns.svc"


def test_tls_is_verified_for_the_service_name_with_the_given_ca(
    tls_server: tuple[int, Path], tmp_path: Path
) -> None:
    port, ca = tls_server
    assert "TLS verified" in install_check.check_tls(f"https://{HOST}:{port}", str(ca))
    other = tmp_path / "other-ca.crt"
    other.write_bytes(issue_bundle([HOST], []).ca_crt)
    with pytest.raises(install_check.CheckFailed, match="CERTIFICATE_VERIFY_FAILED"):
        install_check.check_tls(f"https://{HOST}:{port}", str(other))


def test_a_certificate_for_another_name_fails(tls_server: tuple[int, Path]) -> None:
    port, ca = tls_server
    url = f"https://swi-webhook.elsewhere.svc:{port}"  # same address, a name not in the cert
    with pytest.raises(install_check.CheckFailed, match="CERTIFICATE_VERIFY_FAILED"):
        install_check.check_tls(url, str(ca))


def test_the_policy_review_must_answer_our_request(tls_server: tuple[int, Path]) -> None:
    port, ca = tls_server
    url = f"https://{HOST}:{port}"
    detail = install_check.check_policy_review(url, str(ca), "swi-system")
    assert "refused" in detail and f"host {HOST}:{port}" in detail
    Handler.answer_uid = "someone-else"
    with pytest.raises(install_check.CheckFailed, match="not a review of our request"):
        install_check.check_policy_review(url, str(ca), "swi-system")


def test_metrics_need_the_build_info_and_the_version(metrics_server: int) -> None:
    url = f"http://swi-metrics.swi-system.svc:{metrics_server}/metrics"
    assert "version 0.1.0" in install_check.check_metrics(url, "0.1.0")
    with pytest.raises(install_check.CheckFailed, match=r"runs version 0\.1\.0, not 0\.2\.0"):
        install_check.check_metrics(url, "0.2.0")
    with pytest.raises(install_check.CheckFailed, match="HTTP 404"):
        install_check.check_metrics(url.replace("/metrics", "/nothing"), "")


def test_main_reports_each_check_and_fails_when_one_fails(
    tls_server: tuple[int, Path], metrics_server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    port, ca = tls_server
    args = [
        f"--webhook-url=https://{HOST}:{port}",
        f"--ca-file={ca}",
        "--policy-webhook",
        f"--metrics-url=http://swi-metrics.swi-system.svc:{metrics_server}/metrics",
    ]
    assert install_check.main([*args, "--version=0.1.0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0:2] for line in out] == [
        ["ok", " webhook TLS"],
        ["ok", " policy webhook"],
        ["ok", " metrics"],
    ]
    assert install_check.main([*args, "--version=9.9.9"]) == 1
    assert "FAILED: metrics" in capsys.readouterr().out


def test_nothing_to_check_or_no_ca_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        install_check.main([])
    assert "nothing to check" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        install_check.main(["--webhook-url=https://x.y.svc"])
    assert "--webhook-url needs --ca-file" in capsys.readouterr().err


def test_unreachable_names_the_url_and_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWI_METRICS_SERVICE_HOST", "127.0.0.1")
    with pytest.raises(install_check.CheckFailed, match=r"\(at 127.0.0.1\)"):
        install_check.check_metrics("http://swi-metrics.ns.svc:1/metrics", "")


def test_a_missing_ca_file_is_a_failed_check_not_a_crash(
    tls_server: tuple[int, Path], tmp_path: Path
) -> None:
    port, _ = tls_server
    with pytest.raises(install_check.CheckFailed, match="the CA file"):
        install_check.check_tls(f"https://{HOST}:{port}", str(tmp_path / "absent.crt"))
