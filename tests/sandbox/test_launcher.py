"""`python -m sandbox`: crash recovery, clean stops, and one-line errors that say what to do."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client, config

from sandbox import launcher

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sandbox", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=False,
        timeout=300,
    )


def _listening_ports(pid: int) -> set[int]:
    """Ports a process (and its threads) listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _port_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def test_second_control_plane_survives_kill_9_and_stops_cleanly(sandbox, tmp_path):
    """A second sandbox beside the session's one: no collision, crash recovery, clean stop."""
    state = tmp_path / "second"
    first = launcher.up(state, [launcher.CONTROLPLANE])[0]
    assert first.alive and first.pid
    assert first.info["server"] != sandbox.component("controlplane").info["server"]
    ports = _listening_ports(first.pid)
    assert ports, "the control plane should listen on loopback ports"

    api = config.new_client_from_config(config_file=str(first.info["kubeconfig"]))
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name="kept-across-crash"))
    )
    api.close()

    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while launcher.inspect(state, launcher.CONTROLPLANE).alive and time.monotonic() < deadline:
        time.sleep(0.1)
    status = _cli("--state-dir", str(state), "status")
    assert "controlplane: dead" in status.stdout
    assert "python -m sandbox up" in status.stdout

    # `up` after a crash recovers with no manual clean-up, and keeps what etcd stored.
    again = _cli("--state-dir", str(state), "up", "--only", "controlplane")
    assert again.returncode == 0, again.stderr
    second = launcher.inspect(state, launcher.CONTROLPLANE)
    assert second.alive and second.pid != first.pid
    api = config.new_client_from_config(config_file=str(second.info["kubeconfig"]))
    try:
        assert client.CoreV1Api(api).read_namespace("kept-across-crash").metadata.name
    finally:
        api.close()

    ports = _listening_ports(second.pid)
    down = _cli("--state-dir", str(state), "down")
    assert down.returncode == 0 and "controlplane" in down.stdout
    assert not Path(f"/proc/{second.pid}").exists() or launcher._is_zombie(second.pid)
    assert not [p for p in ports if _port_listening(p)], "ports left listening after down"
    assert not (state / "run" / "controlplane.pid").exists()


def test_missing_go_toolchain_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # nothing cached
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(launcher.SandboxError) as err:
        launcher.build_controlplane(quiet=True)
    assert "Go toolchain not found" in str(err.value)
    assert "\n" not in str(err.value)


def test_env_on_a_stopped_sandbox_says_what_to_do(tmp_path):
    result = _cli("--state-dir", str(tmp_path / "never-started"), "env")
    assert result.returncode == 2
    assert result.stderr.startswith("error:")
    assert "python -m sandbox up" in result.stderr
    assert result.stderr.count("\n") == 1


def test_env_exports_what_clients_need(sandbox):
    result = _cli("--state-dir", str(sandbox.state_dir), "env")
    assert result.returncode == 0, result.stderr
    exported = dict(
        line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines()
    )
    assert exported["KUBECONFIG"] == sandbox.kubeconfig
    assert exported["SANDBOX_CA"] == str(sandbox.ca)
    assert exported["PATH"].startswith(str(launcher.controlplane_bin_dir()))
    # The shell that evals it can use kubectl against the sandbox straight away.
    shell = subprocess.run(
        [
            "bash",
            "-c",
            f'eval "$({sys.executable} -m sandbox env)" && kubectl get ns default -o name',
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        env={**os.environ, launcher.STATE_DIR_ENV: str(sandbox.state_dir)},
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip() == "namespace/default"


def test_stale_pid_file_is_recovered(tmp_path):
    """A pid file naming a process that is gone (or is someone else's) is not 'running'."""
    state = tmp_path / "stale"
    (state / "run").mkdir(parents=True)
    (state / "run" / "controlplane.pid").write_text(f"{os.getpid()}\n")  # alive, but not ours
    assert not launcher.inspect(state, launcher.CONTROLPLANE).alive
    status = _cli("--state-dir", str(state), "status")
    assert "controlplane: dead" in status.stdout


def test_busy_port_is_one_line_saying_what_to_do(sandbox, tmp_path, monkeypatch):
    sandbox.component("entra")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        monkeypatch.setenv("SWI_SANDBOX_PROXY_PORT", str(busy))
        state = tmp_path / "busy"
        state.mkdir()
        # The proxy forwards to the session's Entra emulator; only its own port is the problem.
        (state / "entra.json").write_text((sandbox.state_dir / "entra.json").read_text())
        with pytest.raises(launcher.SandboxError) as err:
            launcher.up(state, [launcher.PROXY])
    message = str(err.value)
    assert f"127.0.0.1:{busy}" in message
    assert "choose another --port" in message
    assert "\n" not in message
    assert not launcher.inspect(state, launcher.PROXY).alive


def test_ctl_forwards_to_the_emulators_test_controls(sandbox):
    entra = _cli("--state-dir", str(sandbox.state_dir), "ctl", "entra", "status")
    assert entra.returncode == 0, entra.stderr
    assert "propagationSeconds" in json.loads(entra.stdout)
    sql = _cli("--state-dir", str(sandbox.state_dir), "ctl", "azuresql", "status")
    assert sql.returncode == 0, sql.stderr
    assert "sandbox-sql" in {server["name"] for server in json.loads(sql.stdout)}


def test_a_second_cluster_through_the_cli(sandbox, tmp_path):
    """`up --cloud-of`: its own control plane and issuer, the first sandbox's Azure; `env`,
    `status` and `down` speak of it; occupied or wrong directories are one `error:` line."""
    second = tmp_path / "second"
    started = _cli("--state-dir", str(second), "up", "--cloud-of", str(sandbox.state_dir))
    try:
        assert started.returncode == 0, started.stderr
        assert [ln.split(":")[0] for ln in started.stdout.splitlines()[:-1]] == ["controlplane"]
        env = dict(
            line.removeprefix("export ").split("=", 1)
            for line in _cli("--state-dir", str(second), "env").stdout.splitlines()
        )
        assert env["KUBECONFIG"] != sandbox.kubeconfig
        assert env["SANDBOX_ISSUER"] != sandbox.issuer
        for shared in ("AZURE_AUTHORITY_HOST", "SANDBOX_GRAPH_URL", "HTTPS_PROXY"):
            assert env[shared].strip("'") == sandbox.env[shared], shared
        assert (second / "ca.crt").read_bytes() == sandbox.ca.read_bytes()
        status = _cli("--state-dir", str(second), "status")
        assert status.returncode == 0, status.stdout
        assert [ln.split(":")[0] for ln in status.stdout.splitlines()][:2] == [
            "controlplane",
            "entra",
        ]
        # Its own API server answers with its own kubeconfig.
        api = config.new_client_from_config(config_file=env["KUBECONFIG"].strip("'"))
        try:
            names = [n.metadata.name for n in client.CoreV1Api(api).list_namespace().items]
            assert "default" in names
        finally:
            api.close()

        for args, says in (
            # a sandbox of its own cannot become a second cluster
            (("--state-dir", str(sandbox.state_dir), "up", "--cloud-of", str(second)), "itself"),
            (("--state-dir", str(tmp_path / "third"), "up", "--cloud-of", str(second)), "itself"),
            (("--state-dir", str(second), "up", "--only", "entra"), "run there"),
            (
                ("--state-dir", str(tmp_path / "fourth"), "up", "--cloud-of", str(tmp_path)),
                "no Entra emulator runs",
            ),
        ):
            refused = _cli(*args)
            assert refused.returncode == 2, (args, refused.stdout)
            assert refused.stderr.startswith("error:") and says in refused.stderr, refused.stderr
            assert refused.stderr.count("\n") == 1
    finally:
        stopped = _cli("--state-dir", str(second), "down")
    assert stopped.stdout.strip() == "stopped: controlplane"
    assert launcher.inspect(sandbox.state_dir, launcher.ENTRA).alive  # the first one's, untouched
