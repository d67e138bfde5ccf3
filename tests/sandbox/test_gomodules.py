"""sandbox/gomodules.sh: a Go module the module proxy refuses stops a build with one clear line
that names the module, the version, the proxy's answer and the go.mod to change."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.launcher import REPO_ROOT

HELPER = REPO_ROOT / "sandbox" / "gomodules.sh"


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A module proxy that refuses everything, as a proxy with a deny list answers."""

    def do_GET(self) -> None:
        self.send_response(403)
        self.end_headers()
        self.wfile.write(b"forbidden by policy\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_proxy() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_refused_module_is_one_line(refusing_proxy: str, tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.fail("the Go toolchain is needed for this test: install Go 1.26+")
    module = tmp_path / "mod"
    module.mkdir()
    (module / "go.mod").write_text(
        "module example.com/probe\n\ngo 1.26\n\nrequire example.com/refused v1.2.3\n"
    )
    env = {
        **os.environ,
        "GOPROXY": refusing_proxy,
        "GOSUMDB": "off",
        "GOMODCACHE": str(tmp_path / "modcache"),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=mod",
    }
    proc = subprocess.run(
        ["bash", "-c", f'. "{HELPER}" && swi_go_mod_download "{module}"'],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: go module example.com/refused@v1.2.3 was refused by the module proxy "
        f"(403 Forbidden): pin a version the proxy serves in {module}/go.mod"
    ]


def test_served_modules_download_quietly(tmp_path: Path) -> None:
    module = tmp_path / "mod"
    module.mkdir()
    (module / "go.mod").write_text("module example.com/probe\n\ngo 1.26\n")
    proc = subprocess.run(
        ["bash", "-c", f'. "{HELPER}" && swi_go_mod_download "{module}"'],
        capture_output=True,
        text=True,
        env={**os.environ, "GOTOOLCHAIN": "local"},
        timeout=120,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
