"""``swi-workload serve`` against the sandbox: probes, queries on a schedule and on request, token
refresh over several token lifetimes, and a clean stop on SIGTERM. Real ODBC driver, real Entra
emulator tokens, a real process."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlbox import DEMO, SqlBox, TestIssuer, federate

from sandbox.demo import SEED_QUERY
from sandbox.entra.ctl import AdminClient

SUBJECT = "system:serviceaccount:workload-demo:serve-test"
# The Entra emulator's access-token lifetime for the refresh test. Above azure-identity's 30 s
# pause between refresh attempts: below it the credential hands out its cached token even when
# that has expired (a token lives an hour or more in Azure, so only a test gets there).
LIFETIME_S = 45


@pytest.fixture(scope="module")
def issuer(sqlbox_session: SqlBox) -> Iterator[TestIssuer]:
    stand_in = TestIssuer(sqlbox_session.state_dir)
    federate(sqlbox_session, DEMO, stand_in.url, SUBJECT)
    yield stand_in
    stand_in.close()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, proc: subprocess.Popen[str], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def get(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.port}{path}", timeout=60)

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited: {self.log.read_text()}")
            try:
                self.get("/healthz")
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise AssertionError(f"serve never listened: {self.log.read_text()}")

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, self.log.read_text()


@contextlib.contextmanager
def _serve(box: SqlBox, tmp_path: Path, token: str, *args: str, **env: str) -> Iterator[Served]:
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(token)
    port = _port()
    log = tmp_path / "stderr.log"
    run_env = box.process_env(
        AZURE_CLIENT_ID=DEMO.app_id,
        AZURE_FEDERATED_TOKEN_FILE=str(token_file),
        AZ_CLIENT_SECRET="",
        **env,
    )
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "swi_workload", "serve", "--port", str(port), *args],
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    served = Served(proc, port, log)
    try:
        served.wait_serving()
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def serve(sqlbox: SqlBox, issuer: TestIssuer, tmp_path: Path) -> Iterator[Any]:
    with contextlib.ExitStack() as stack:

        def start(*args: str, token: str | None = None, **env: str) -> Served:
            chosen = token or issuer.token(SUBJECT)
            return stack.enter_context(_serve(sqlbox, tmp_path, chosen, *args, **env))

        yield start


def test_probes_queries_on_request_and_on_schedule_then_a_clean_stop(serve: Any) -> None:
    served = serve("--every", "0.5", "--json", AZ_QUERY=SEED_QUERY)

    health = served.get("/healthz")
    assert health.status_code == 200 and health.json()["alive"] is True
    ready = served.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True
    answered = served.get("/query")
    assert answered.status_code == 200, answered.text
    assert [r["first_name"] for r in answered.json()["rows"]] == [
        "John",
        "Jane",
        "Alice",
        "Bob",
        "Emily",
    ]
    assert served.get("/nope").status_code == 404

    code, out, err = served.stop()
    assert code == 0, err
    assert "stopped" in err
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert runs and all(run["rowcount"] == 5 for run in runs)


def test_readiness_names_the_broken_link_while_liveness_stays_up(
    serve: Any, issuer: TestIssuer
) -> None:
    # A service account no federated credential names: Entra refuses the exchange.
    stranger = issuer.token("system:serviceaccount:workload-demo:stranger")
    served = serve("--ready-cache", "0", token=stranger, AZ_QUERY=SEED_QUERY)

    assert served.get("/healthz").status_code == 200
    ready = served.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["reason"] == "NoMatchingFederatedCredential"
    assert "stranger" in ready.json()["message"]
    failed = served.get("/query")
    assert failed.status_code == 503
    assert failed.json()["error"] == "NoMatchingFederatedCredential"
    assert served.stop()[0] == 0


def test_without_a_query_it_serves_probes_and_says_what_is_missing(serve: Any) -> None:
    served = serve()
    assert served.get("/readyz").status_code == 200
    missing = served.get("/query")
    assert missing.status_code == 400
    assert "AZ_QUERY" in missing.json()["message"]
    assert served.stop()[0] == 0


def test_every_without_a_query_is_refused_at_start(sqlbox: SqlBox) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "swi_workload", "serve", "--every", "5"],
        env=sqlbox.process_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--every needs" in done.stderr and "AZ_QUERY" in done.stderr


def test_tokens_are_refreshed_and_logins_renewed_over_several_lifetimes(
    sqlbox: SqlBox, serve: Any, issuer: TestIssuer
) -> None:
    """Entra issues tokens that live LIFETIME_S: over two lifetimes the one process keeps
    querying, reconnecting with a new token 10 s before each one expires."""
    entra = AdminClient.from_state_dir(sqlbox.state_dir)
    entra.controls(tokenLifetimeSeconds=LIFETIME_S)
    try:
        served = serve("--every", "1", "--recycle-margin", "10", AZ_QUERY=SEED_QUERY)
        time.sleep(2 * LIFETIME_S)  # wall time for the process to live through the lifetimes
        stats = served.get("/healthz").json()
        ready = served.get("/readyz")
        code, out, err = served.stop()
    finally:
        entra.controls(tokenLifetimeSeconds=3599)
    assert code == 0, err
    assert "error:" not in err, err
    assert ready.status_code == 200, ready.text
    # A new login, with a new token, 10 s before each token expired: at ~35 s and ~70 s (the
    # emulator's SQL login refuses an expired token, so a stale one would have failed here).
    assert stats["connects"] >= 3, stats
    assert stats["queries"] >= LIFETIME_S, stats
    assert out.count("(5 rows)") >= stats["queries"]
