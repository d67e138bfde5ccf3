"""The service contract of ``python -m sandbox.azuresql serve``: start-up, state, restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyodbc
import pytest
import yaml
from sqlbox import ADMIN, OPERATOR, REPO, SqlBox

from sandbox.azuresql.odbc import DRIVER_NAME, write_odbcinst


def _serve(state_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sandbox.azuresql", "serve", "--state-dir", str(state_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _ready(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line.startswith("READY servers="), (
        line,
        process.stderr.read() if process.stderr else "",
    )
    return line


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=20)


@pytest.fixture
def own_state(sqlbox: SqlBox, tmp_path: Path) -> Path:
    """A fresh state dir sharing the sandbox's CA (so both trust the running Entra emulator)."""
    state = tmp_path / "state"
    state.mkdir()
    for name in ("ca.crt", "ca.key"):
        shutil.copy(sqlbox.state_dir / name, state / name)
    return state


def test_missing_entra_is_a_one_line_startup_error(tmp_path: Path) -> None:
    process = _serve(tmp_path)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.startswith("error: no Entra emulator:")
    assert len(err.strip().splitlines()) == 1


def test_bad_world_is_a_one_line_startup_error(sqlbox: SqlBox, own_state: Path) -> None:
    world = own_state / "world.yaml"
    world.write_text("sql:\n  servers:\n    - name: x\n")
    process = _serve(own_state, "--world", str(world), "--entra-url", sqlbox.entra_url)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.startswith("error: ") and "entraAdmin" in err


def test_state_file_odbc_registration_restart_and_persistence(
    sqlbox: SqlBox, own_state: Path
) -> None:
    process = _serve(own_state, "--entra-url", sqlbox.entra_url)
    line = _ready(process)
    info = json.loads((own_state / "azuresql.json").read_text())
    port = info["servers"]["sandbox-sql"]["port"]
    assert line == f"READY servers=sandbox-sql:{port}"
    assert info["pid"] == process.pid
    assert info["env"]["AZ_SERVER"] == f"tcp:localhost,{port}"
    assert info["env"]["AZ_DATABASE"] == "mydb"
    ini = Path(info["env"]["ODBCSYSINI"]) / "odbcinst.ini"
    driver = ini.read_text().split("Driver=", 1)[1].splitlines()[0]
    assert ini.read_text().startswith(f"[{DRIVER_NAME}]") and Path(driver).is_file()
    assert (own_state / "azuresql" / "sandbox-sql" / "mydb.sqlite").is_file()

    box = SqlBox(own_state, {**sqlbox.env, "AZ_SERVER": info["env"]["AZ_SERVER"]})
    try:
        conn = box.connect(box.token(OPERATOR))
        conn.execute("CREATE TABLE Kept (id INT)")
        conn.execute("INSERT INTO Kept (id) VALUES (7)")
        conn.close()
    finally:
        assert _stop(process) == 0
    assert not (own_state / "azuresql.json").exists()

    again = _serve(own_state, "--entra-url", sqlbox.entra_url)
    try:
        assert _ready(again) == line  # same port: AZ_SERVER stays valid across restarts
        conn = box.connect(box.token(OPERATOR))
        assert conn.execute("SELECT id FROM Kept").fetchone()[0] == 7
        assert conn.execute("SELECT COUNT(*) FROM Customer").fetchone()[0] == 5  # not reseeded
        conn.close()
    finally:
        assert _stop(again) == 0


def test_write_odbcinst_is_reusable(tmp_path: Path) -> None:
    ini = write_odbcinst(tmp_path / "odbc")
    assert ini == tmp_path / "odbc" / "odbcinst.ini"
    assert (tmp_path / "odbc" / "odbc.ini").exists()
    env = {**os.environ, "ODBCSYSINI": str(ini.parent)}
    listed = subprocess.run(
        [sys.executable, "-c", "import pyodbc; print(pyodbc.drivers())"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=30,
    )
    assert DRIVER_NAME in listed.stdout


def test_ctl_status_lists_servers_and_users(sqlbox: SqlBox) -> None:
    status = json.loads(sqlbox.ctl("status").stdout)
    assert status[0]["name"] == "sandbox-sql" and status[0]["running"]
    users = {u["name"]: u["roles"] for u in status[0]["databases"]["mydb"]}
    assert users["SP-AZURESQL-USER"] == ["db_datareader"]


def test_several_servers_each_with_its_own_admin_and_databases(
    sqlbox: SqlBox, own_state: Path
) -> None:
    world = yaml.safe_load((REPO / "sandbox" / "world.yaml").read_text())
    tenant = world["sql"]["servers"][0]["tenant"]
    world["sql"]["servers"].append(
        {
            "name": "finance-sql",
            "tenant": tenant,
            "entraAdmin": "sandbox-admin",
            "directoryReader": "sandbox-sql-server",
            "databases": [
                {"name": "ledger", "seed": "CREATE TABLE Entry (id INT, amount FLOAT);"},
                {"name": "audit", "seed": ""},
            ],
        }
    )
    world_file = own_state / "world.yaml"
    world_file.write_text(yaml.safe_dump(world))
    process = _serve(own_state, "--world", str(world_file), "--entra-url", sqlbox.entra_url)
    try:
        line = _ready(process)
        servers = json.loads((own_state / "azuresql.json").read_text())["servers"]
        assert line == (
            f"READY servers=sandbox-sql:{servers['sandbox-sql']['port']},"
            f"finance-sql:{servers['finance-sql']['port']}"
        )
        finance = SqlBox(
            own_state,
            {**sqlbox.env, "AZ_SERVER": servers["finance-sql"]["server"], "AZ_DATABASE": "ledger"},
        )
        conn = finance.connect(finance.token(ADMIN))  # sandbox-admin is this server's admin
        assert tuple(conn.execute("SELECT USER_NAME(), DB_NAME()").fetchone()) == ("dbo", "ledger")
        conn.close()
        with pytest.raises(pyodbc.Error, match=r"\(18456\)"):
            finance.connect(finance.token(OPERATOR))  # admin elsewhere, nobody here
    finally:
        assert _stop(process) == 0
