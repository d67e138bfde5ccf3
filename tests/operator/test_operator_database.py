"""Database access (spec.sql) against the sandbox: the real operator, the real ODBC driver and the
Azure SQL emulator, where the operator's app is the server's Entra admin.

"Works" means what it means for a pod: the service account's TokenRequest token, exchanged at
Entra, logs in as the identity's user and reads the seed's five customers.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    DRIFT_INTERVAL_S,
    Cluster,
    Entra,
    World,
    eventually,
)
from sql_harness import DATABASE, SEEDED_USER, SqlAdmin  # type: ignore[import-not-found]

pytestmark = pytest.mark.controlplane

SA = "customer-api"
USER = "customer-api"  # the customer-api app's display name


def sql_spec(sql: SqlAdmin, roles: list[str], **extra: Any) -> dict[str, Any]:
    return {"server": sql.server, "database": DATABASE, "roles": roles, **extra}


def spec(world: World, sql: SqlAdmin, roles: list[str] | None = None, **extra: Any) -> Any:
    return {
        "serviceAccountName": SA,
        "identity": {"applicationClientId": world.customer_api.client_id},
        "sql": sql_spec(sql, ["db_datareader"] if roles is None else roles, **extra),
    }


def customers_as_pod(cluster: Cluster, entra: Entra, sql: SqlAdmin, client_id: str) -> int:
    """What the workload does: its projected token -> Entra -> Azure SQL -> the seed's rows."""
    exchanged = entra.exchange(client_id, cluster.token(SA))
    assert exchanged.status_code == 200, exchanged.text
    with sql.session(exchanged.json()["access_token"]) as cursor:
        return int(cursor.execute("SELECT COUNT(*) FROM dbo.Customer").fetchone()[0])


def database_user(cluster: Cluster, name: str) -> dict[str, Any]:
    body = cluster.get(name) or {}
    return dict((body.get("status") or {}).get("databaseUser") or {})


def test_grant_then_the_pod_reads_its_rows(
    sql: SqlAdmin, operator, cluster: Cluster, entra: Entra, world: World
):
    cluster.create("customer-api", spec(world, sql))
    cluster.wait_condition("customer-api", timeout=30)

    assert sql.users()[USER] == {"db_datareader"}
    assert sql.sid(USER) == uuid.UUID(world.customer_api.client_id).bytes_le
    record = database_user(cluster, "customer-api")
    assert record["name"] == USER and record["created"] is True
    assert record["roles"] == record["grantedRoles"] == ["db_datareader"]
    verified = cluster.condition("customer-api", "Verified")
    assert verified is not None and verified["status"] == "True"
    assert f"as {USER}" in verified["message"]
    assert customers_as_pod(cluster, entra, sql, world.customer_api.client_id) == 5
    reasons = set(cluster.reasons("customer-api"))
    assert {"DatabaseUserCreated", "DatabaseRoleGranted", "Ready"} <= reasons
    # The operator worked as the server's Entra admin (dbo), the probe as the identity's user.
    users = {(e["user"], e["kind"]) for e in sql.log() if e["database"] == DATABASE}
    assert ("dbo", "batch") in users and (USER, "login") in users


def test_drift_regrants_after_an_out_of_band_drop(
    sql: SqlAdmin, operator, cluster: Cluster, world: World
):
    cluster.create("customer-api", spec(world, sql))
    cluster.wait_condition("customer-api")

    sql.run(f"ALTER ROLE db_datareader DROP MEMBER [{USER}]")
    eventually(
        lambda: sql.users().get(USER) == {"db_datareader"},
        DRIFT_INTERVAL_S * 5,
        "the role granted again",
    )
    sql.run(f"DROP USER [{USER}]")
    eventually(
        lambda: sql.users().get(USER) == {"db_datareader"},
        DRIFT_INTERVAL_S * 5,
        "the user created again",
    )
    # The drift check posts its Events after writing the status, which follows the SQL.
    eventually(
        lambda: any(
            "again (it had been dropped)" in e.message for e in cluster.events("customer-api")
        ),
        10,
        "an Event saying the user was created again",
    )
    cluster.wait_condition("customer-api")


def test_roles_added_and_removed_but_never_ones_it_did_not_grant(
    sql: SqlAdmin, operator, cluster: Cluster, world: World
):
    cluster.create("customer-api", spec(world, sql))
    cluster.wait_condition("customer-api")
    sql.run(f"ALTER ROLE db_ddladmin ADD MEMBER [{USER}]")  # a DBA's own grant

    cluster.patch_spec(
        "customer-api", {"sql": sql_spec(sql, ["db_datareader", "db_datawriter", "db_ddladmin"])}
    )
    eventually(
        lambda: sql.users()[USER] == {"db_datareader", "db_datawriter", "db_ddladmin"},
        20,
        "db_datawriter added",
    )
    eventually(  # the status is written after the SQL
        lambda: (
            database_user(cluster, "customer-api")["grantedRoles"]
            == ["db_datareader", "db_datawriter"]
        ),
        10,
        "status.databaseUser.grantedRoles with db_datawriter",
    )

    cluster.patch_spec("customer-api", {"sql": sql_spec(sql, ["db_datareader"])})
    eventually(lambda: "db_datawriter" not in sql.users()[USER], 20, "db_datawriter dropped")
    assert sql.users()[USER] == {"db_datareader", "db_ddladmin"}  # the DBA's grant stays
    cluster.wait_condition("customer-api")


def test_delete_drops_the_user_and_retain_keeps_it(
    sql: SqlAdmin, operator, cluster: Cluster, world: World
):
    cluster.create("customer-api", spec(world, sql))
    cluster.wait_condition("customer-api")
    cluster.delete("customer-api")
    cluster.wait_gone("customer-api")
    assert USER not in sql.users()
    assert "DatabaseUserDropped" in cluster.reasons("customer-api")

    cluster.create("kept", {**spec(world, sql), "deletionPolicy": "Retain"})
    cluster.wait_condition("kept")
    cluster.delete("kept")
    cluster.wait_gone("kept")
    assert sql.users()[USER] == {"db_datareader"}


def test_an_existing_user_with_the_identitys_sid_is_adopted_and_left_on_delete(
    sql: SqlAdmin, operator, cluster: Cluster, world: World
):
    reader = {
        "serviceAccountName": "reader",
        "identity": {"applicationClientId": world.demo_app.client_id},
        "sql": sql_spec(sql, ["db_datareader", "db_datawriter"]),
    }
    cluster.create("reader", reader)
    cluster.wait_condition("reader")
    record = database_user(cluster, "reader")
    assert (record["name"], record["created"]) == (SEEDED_USER, False)
    assert record["grantedRoles"] == ["db_datawriter"]  # db_datareader was the seed's
    assert sql.users()[SEEDED_USER] == {"db_datareader", "db_datawriter"}

    cluster.delete("reader")
    cluster.wait_gone("reader")
    assert sql.users()[SEEDED_USER] == {"db_datareader"}  # only what the operator granted goes


def test_a_user_with_that_name_but_another_sid_is_a_conflict(
    sql: SqlAdmin, operator, cluster: Cluster, world: World
):
    since = time.time()
    cluster.create("customer-api", spec(world, sql, userName=SEEDED_USER))

    ready = cluster.wait_condition("customer-api", "False", reason="DatabaseUserConflict")
    assert f"[{SEEDED_USER}]" in ready["message"] and "spec.sql.userName" in ready["message"]
    assert USER not in sql.users()
    written = [e["text"] for e in sql.log(since) if e["kind"] == "batch"]
    assert not any(t.startswith(("CREATE", "ALTER", "DROP")) for t in written), written


def test_operator_not_admin_is_a_permanent_condition_naming_the_fix(
    sql: SqlAdmin, operator_with, cluster: Cluster, world: World
):
    # The operator runs as sandbox-admin: it may write any app's credentials (Graph), but it is
    # not the SQL server's Entra admin and has no user in the database: login refused (18456).
    admin = world.admin
    with operator_with(AZURE_CLIENT_ID=admin.client_id, AZURE_CLIENT_SECRET=str(admin.secret)):
        cluster.create("customer-api", spec(world, sql))
        cond = cluster.wait_condition(
            "customer-api", "False", "DatabaseAccessReady", "OperatorNotDatabaseAdmin"
        )
        assert "Login failed" in cond["message"] and "(18456)" in cond["message"]
        assert "Entra admin" in cond["message"] and admin.client_id in cond["message"]
        ready = cluster.condition("customer-api")
        assert ready is not None and ready["reason"] == "OperatorNotDatabaseAdmin"

        # With a user of its own but no right to create users: CREATE USER refused (15247).
        sid = "0x" + uuid.UUID(admin.client_id).bytes_le.hex().upper()
        sql.run(
            f"CREATE USER [sandbox-admin] WITH SID = {sid}, TYPE = E",
            "ALTER ROLE db_datareader ADD MEMBER [sandbox-admin]",
        )
        eventually(
            lambda: (
                "(15247)"
                in (cluster.condition("customer-api", "DatabaseAccessReady") or {}).get(
                    "message", ""
                )
            ),
            DRIFT_INTERVAL_S * 5,
            "CREATE USER refused with 15247",
        )
        refused = [e for e in sql.log() if e["error"] == 15247]
        assert refused and refused[-1]["user"] == "sandbox-admin"
        assert refused[-1]["text"].startswith(f"CREATE USER [{USER}] WITH SID = ")
        assert USER not in sql.users()


def test_a_transient_40613_during_reconcile_is_retried(
    sql: SqlAdmin, operator, cluster: Cluster, world: World
):
    since = time.time()
    sql.fail_logins(2, 40613)
    cluster.create("customer-api", spec(world, sql))

    cluster.wait_condition("customer-api", timeout=30)
    logins = [e for e in sql.log(since) if e["kind"] == "login"]
    assert [e["error"] for e in logins[:2]] == [40613, 40613]
    assert logins[2]["error"] is None and logins[2]["user"] == "dbo"
    warnings = [e for e in cluster.events("customer-api") if e.reason == "DatabaseUnavailable"]
    assert any("(40613)" in e.message and "retrying" in e.message for e in warnings)
    assert sql.users()[USER] == {"db_datareader"}


HOSTILE = "evil]; DROP TABLE Customer; --'\""


def test_hostile_names_are_quoted_or_rejected(
    sql: SqlAdmin, operator, cluster: Cluster, world: World
):
    since = time.time()
    cluster.create("hostile", spec(world, sql, userName=HOSTILE))
    cluster.wait_condition("hostile")

    assert HOSTILE in sql.users()  # one user, with exactly that name
    assert sql.run("SELECT COUNT(*) FROM dbo.Customer") == [(5,)]  # nothing was injected
    quoted = "[evil]]; DROP TABLE Customer; --'\"]"
    statements = [e["text"] for e in sql.log(since) if e["kind"] == "batch"]
    assert f"CREATE USER {quoted} WITH SID = " in "\n".join(statements)
    assert f"ALTER ROLE [db_datareader] ADD MEMBER {quoted}" in statements
    assert not any(e["error"] for e in sql.log(since) if e["user"] == "dbo")
    # The operator's statements carried its lock timeout (issue 18).
    ddl = [e for e in sql.log(since) if e["text"].startswith(("CREATE USER", "ALTER ROLE"))]
    assert ddl and {e["lock_timeout_ms"] for e in ddl} == {5000}

    # A database name with a ';' stays one value of the connection string: the login asks for
    # exactly that database (which does not exist), no connection keyword is added.
    semicolon = {**spec(world, sql), "serviceAccountName": "other"}
    semicolon["sql"] = {**semicolon["sql"], "database": "mydb;Encrypt=no"}
    cluster.create("semicolon", semicolon)
    cond = cluster.wait_condition(
        "semicolon", "False", "DatabaseAccessReady", "DatabaseUnavailable"
    )
    assert 'Cannot open database "mydb;Encrypt=no"' in cond["message"]

    # A server outside the allowed ones never gets the operator's token (no connection at all).
    elsewhere = {**spec(world, sql), "serviceAccountName": "elsewhere"}
    elsewhere["sql"] = {**elsewhere["sql"], "server": "tcp:sql.attacker.example,1433"}
    cluster.create("elsewhere", elsewhere)
    cond = cluster.wait_condition(
        "elsewhere", "False", "DatabaseAccessReady", "SqlServerNotAllowed"
    )
    assert "--allowed-sql-server" in cond["message"]

    # Role names are checked by the CRD (and again by the operator): refused at the API.
    with pytest.raises(Exception, match="roles") as refused:
        cluster.create("role", spec(world, sql, roles=["db_datareader]; DROP USER x; --"]))
    assert getattr(refused.value, "status", None) == 422

    cluster.delete("hostile")
    cluster.wait_gone("hostile")
    assert HOSTILE not in sql.users()
    assert f"DROP USER IF EXISTS {quoted}" in [e["text"] for e in sql.log(since)]


def test_the_crd_documents_spec_sql(cluster: Cluster):
    explained = cluster.kubectl("explain", "swi.spec.sql").stdout
    for field in ("server", "database", "roles", "userName"):
        assert field in explained


def test_object_id_form_lets_the_server_resolve_the_service_principal(
    sql: SqlAdmin, operator_with, cluster: Cluster, world: World
):
    since = time.time()
    with operator_with(SWI_SQL_USER_FORM="object-id"):
        cluster.create("customer-api", spec(world, sql))
        cluster.wait_condition("customer-api")

        sp_object_id = "5e0c1d9a-7b3f-4c2e-9a1d-0000000000b3"  # customer-api's, in the world
        created = [e["text"] for e in sql.log(since) if e["text"].startswith("CREATE USER")]
        assert created == [
            f"CREATE USER [{USER}] FROM EXTERNAL PROVIDER WITH OBJECT_ID = '{sp_object_id}'"
        ]
        # The server stores the app's client id as the SID either way.
        assert sql.sid(USER) == uuid.UUID(world.customer_api.client_id).bytes_le
