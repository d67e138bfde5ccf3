"""The emulator as a sandbox service: contract, routing by host, snapshot, CLI, speed."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
from cryptography import x509
from entra_harness import REPO_ROOT, WORLD_FILE, EntraService, start_emulator, stop_emulator

EXPECTED_ENV = {
    "AZURE_AUTHORITY_HOST",
    "SANDBOX_ENTRA_URL",
    "SANDBOX_GRAPH_URL",
    "SANDBOX_ARM_URL",
    "AZ_TENANT_ID",
    "AZ_CLIENT_ID",
    "AZ_CLIENT_SECRET",
    "AZURE_TENANT_ID",
    "SANDBOX_SUBSCRIPTION_ID",
}


def test_service_file_and_environment(entra: EntraService) -> None:
    info = json.loads((entra.state_dir / "entra.json").read_text())
    assert info["name"] == "entra" and info["pid"] == entra.process.pid
    assert info["url"] == f"https://localhost:{info['port']}"
    assert set(info["env"]) == EXPECTED_ENV
    demo = entra.principal("SP-AZURESQL-USER")
    assert (info["env"]["AZ_CLIENT_ID"], info["env"]["AZ_CLIENT_SECRET"]) == (
        demo.client_id,
        demo.secrets[0],
    )
    assert info["env"]["SANDBOX_GRAPH_URL"] == f"{info['url']}/v1.0"


def test_certificate_names_cover_azure_hosts(entra: EntraService) -> None:
    cert = x509.load_pem_x509_certificate((entra.state_dir / "entra.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {
        "localhost",
        "login.microsoftonline.com",
        "login.windows.net",
        "sts.windows.net",
        "graph.microsoft.com",
        "management.azure.com",
    } <= set(names.get_values_for_type(x509.DNSName))


def test_routes_by_host_header(entra: EntraService) -> None:
    token_path = f"/{entra.tenant_id}/v2.0/.well-known/openid-configuration"

    def get(host: str, path: str) -> requests.Response:
        return entra.http.get(f"{entra.url}{path}", headers={"Host": host}, timeout=10)

    as_login = get("login.microsoftonline.com", token_path)
    assert as_login.status_code == 200
    assert as_login.json()["token_endpoint"].startswith(
        f"https://login.microsoftonline.com/{entra.tenant_id}/"
    )
    assert get("graph.microsoft.com", token_path).status_code == 404
    assert get("management.azure.com", "/v1.0/applications").status_code == 404
    assert get("graph.microsoft.com", "/v1.0/applications").status_code == 401  # Graph, no token
    # The unauthenticated admin API is for loopback names only, never for Azure's.
    assert get("login.microsoftonline.com", "/_sandbox/health").status_code == 404
    assert get(f"localhost:{entra.url.rsplit(':', 1)[1]}", "/_sandbox/health").json() == {
        "ok": True
    }


def test_double_slashes_are_normalised(entra: EntraService) -> None:
    object_id = entra.principal("customer-api").app_object_id
    response = entra.graph("GET", f"//applications/{object_id}//federatedIdentityCredentials")
    assert response.status_code == 200 and response.json()["value"] == []


def test_ctl_cli(entra: EntraService) -> None:
    def ctl(*args: str) -> dict[str, object]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandbox.entra",
                "ctl",
                "--state-dir",
                str(entra.state_dir),
                *args,
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, object] = json.loads(done.stdout)
        return result

    ctl("fail", "login.discovery", "--status", "503", "--count", "1")
    ctl("latency", "login.keys", "0.2")
    assert ctl("propagation", "30")["propagationSeconds"] == 30
    failed = entra.http.get(
        f"{entra.url}/{entra.tenant_id}/v2.0/.well-known/openid-configuration", timeout=10
    )
    assert failed.status_code == 503 and failed.json()["error"] == "temporarily_unavailable"
    started = time.monotonic()
    entra.http.get(f"{entra.url}/common/discovery/keys", timeout=10).raise_for_status()
    assert time.monotonic() - started >= 0.2
    assert ctl("requests", "--route", "login.*")["counts"] == {
        "login.discovery": 1,
        "login.keys": 1,
    }
    ctl("reset")
    assert ctl("status") == {
        "clockSkewSeconds": 0.0,
        "propagationSeconds": 0.0,
        "armWriteSeconds": 0.0,
        "graphReadLagSeconds": 0.0,
        "tokenLifetimeSeconds": 3599,  # Entra's: an hour, less a second
        "latency": {},
        "jitter": {},
        "failures": [],
        "rateLimits": [],
    }


def test_snapshot_and_signing_key_survive_restart(tmp_path: Path) -> None:
    state_dir, snapshot = tmp_path / "state", tmp_path / "entra-state.json"
    args = ("--world", str(WORLD_FILE), "--snapshot", str(snapshot))
    process, _ = start_emulator(state_dir, *args)
    first = EntraService.attach(state_dir, process)
    first.add_app_credential("customer-api", "kept", "https://issuer.example", "sa:kept", "aud")
    keys_before = first.http.get(f"{first.url}/common/discovery/keys", timeout=10)
    assert stop_emulator(process) == 0
    assert not (state_dir / "entra.json").exists()

    process, _ = start_emulator(state_dir, *args)
    second = EntraService.attach(state_dir, process)
    try:
        object_id = second.principal("customer-api").app_object_id
        listed = second.graph("GET", f"/applications/{object_id}/federatedIdentityCredentials")
        assert [c["name"] for c in listed.json()["value"]] == ["kept"]
        keys_after = second.http.get(f"{second.url}/common/discovery/keys", timeout=10)
        assert keys_after.json() == keys_before.json()
    finally:
        assert stop_emulator(process) == 0


def test_start_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sandbox.entra", "serve", "--state-dir", str(tmp_path), *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    missing = serve("--world", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("error:") and len(missing.stderr.splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = serve("--port", str(busy.getsockname()[1]))
    assert taken.returncode == 2 and taken.stderr.startswith("error:")


def test_latency_without_injection(entra: EntraService) -> None:
    """A token request and a Graph GET take a few milliseconds (recorded in the docs)."""
    demo = entra.principal("sandbox-admin")
    session = entra.http
    form = {
        "grant_type": "client_credentials",
        "client_id": demo.client_id,
        "client_secret": demo.secrets[0],
        "scope": "https://graph.microsoft.com/.default",
    }
    token_url = f"{entra.url}/{entra.tenant_id}/oauth2/v2.0/token"
    token = session.post(token_url, data=form, timeout=10).json()["access_token"]
    object_id = entra.principal("customer-api").app_object_id
    graph_url = f"{entra.graph_url}/applications/{object_id}/federatedIdentityCredentials"
    headers = {"Authorization": f"Bearer {token}"}

    def timed(call: Callable[[], object], n: int = 100) -> list[float]:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            call()
            samples.append((time.perf_counter() - started) * 1000)
        return samples

    token_ms = timed(lambda: session.post(token_url, data=form, timeout=10).raise_for_status())
    graph_ms = timed(lambda: session.get(graph_url, headers=headers, timeout=10).raise_for_status())
    server = entra.admin.requests()["log"]
    server_ms = {
        route: statistics.median(r["ms"] for r in server if r["route"] == route)
        for route in ("login.token", "graph.fic.list")
    }
    for label, samples in (("token request", token_ms), ("Graph GET", graph_ms)):
        ordered = sorted(samples)
        print(
            f"\n{label}: median {statistics.median(samples):.2f} ms, "
            f"p95 {ordered[int(len(ordered) * 0.95)]:.2f} ms (client round trip, keep-alive)"
        )
    print(f"server-side median: {server_ms}")
    assert statistics.median(token_ms) < 25 and statistics.median(graph_ms) < 25


def test_latency_jitter_draws_a_different_delay_per_call(entra: EntraService) -> None:
    entra.admin.latency("login.keys", 0.01, jitter=0.05)
    for _ in range(12):
        assert entra.http.get(f"{entra.url}/common/discovery/keys", timeout=10).status_code == 200
    delays = [r["delay_ms"] for r in entra.admin.requests("login.keys")["log"]]
    assert len(delays) == 12
    assert all(10.0 <= d <= 60.0 for d in delays), delays
    assert len(set(delays)) > 1, "jitter must vary the delay"
    assert entra.admin.controls()["jitter"] == {"login.keys": 0.05}
    entra.admin.latency("login.keys", 0)
    assert entra.admin.controls()["jitter"] == {}
