"""Issue 18 against the SQL emulator, through the real ODBC driver and the operator's own
``OdbcDatabase``: a tenant's open transaction cannot hold the operator's statements past its lock
timeout (1222, retried as DatabaseBusy), and a DDL trigger a tenant with db_ddladmin creates is
seen, so the operator refuses the database before any DDL of its own."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.identity.aio import ClientSecretCredential
from sqlbox import ADMIN, OPERATOR, TENANT, SqlBox
from swi_operator.errors import PermanentError, Reason, TransientError
from swi_operator.locks import KeyedLocks
from swi_operator.pipeline import resource_ref
from swi_operator.spec import parse_spec
from swi_operator.sql import (
    PROBE_SESSION_SHARED_S,
    OdbcDatabase,
    Probed,
    SqlTarget,
    server_host,
    sid_of,
)
from swi_operator.steps import Context
from swi_operator.steps.database import DatabaseAccessStep


def _sid(client_id: str) -> str:
    return "0x" + uuid.UUID(client_id).bytes_le.hex()


@pytest.fixture
def tenant(admin_db: Any) -> Iterator[str]:
    """The sandbox-admin app as a tenant's user with ``db_ddladmin`` and ``db_accessadmin``."""
    admin_db.execute("DROP USER IF EXISTS [sandbox-admin]")
    admin_db.execute(f"CREATE USER [sandbox-admin] WITH SID = {_sid(ADMIN.app_id)}, TYPE = E")
    admin_db.execute("ALTER ROLE db_ddladmin ADD MEMBER [sandbox-admin]")
    admin_db.execute("ALTER ROLE db_accessadmin ADD MEMBER [sandbox-admin]")
    yield "sandbox-admin"
    admin_db.execute("DROP TRIGGER IF EXISTS make_me_dbo ON DATABASE")
    for name in ("sandbox-admin", "held-by-tenant", "stalled-user"):
        admin_db.execute(f"DROP USER IF EXISTS [{name}]")


def _target(sqlbox: SqlBox) -> SqlTarget:
    return SqlTarget(sqlbox.env["AZ_SERVER"], sqlbox.env["AZ_DATABASE"])


async def _with_operator(
    sqlbox: SqlBox, work: Any, *, lock_timeout: float, clock: Callable[[], float] = time.time
) -> Any:
    credential = ClientSecretCredential(
        TENANT,
        OPERATOR.app_id,
        str(OPERATOR.secret),
        authority=sqlbox.entra_url,
        disable_instance_discovery=True,
        connection_verify=str(sqlbox.ca),
    )
    database = OdbcDatabase(
        credential,
        OPERATOR.app_id,
        4,
        (server_host(sqlbox.env["AZ_SERVER"]),),
        clock,
        lock_timeout=lock_timeout,
        statement_timeout=20,
    )
    try:
        return await work(database)
    finally:
        await database.close()
        await credential.close()


def test_a_tenants_open_transaction_holds_the_operator_no_longer_than_its_lock_timeout(
    sqlbox: SqlBox, tenant: str, admin_db: Any
) -> None:
    target = _target(sqlbox)
    sid = uuid.uuid4().bytes_le
    held = sqlbox.connect(sqlbox.token(ADMIN), autocommit=False)
    # The tenant opens a transaction that writes to the catalog, and keeps it open.
    held.execute(f"CREATE USER [held-by-tenant] WITH SID = {_sid(str(uuid.uuid4()))}, TYPE = E")
    timings: dict[str, float] = {}

    async def stalled(database: OdbcDatabase) -> set[str]:
        started = time.monotonic()
        with pytest.raises(TransientError) as busy:
            await database.create_user(target, "stalled-user", sid, None)
        timings["blocked write"] = time.monotonic() - started
        assert busy.value.reason is Reason.DATABASE_BUSY, busy.value.message
        assert "1222" in busy.value.message and "Lock request time out" in busy.value.message
        # Meanwhile the operator's reads of that database still run (the drift check, reviews).
        started = time.monotonic()
        roles = await database.role_names(target)
        timings["read meanwhile"] = time.monotonic() - started
        return roles

    try:
        roles = asyncio.run(_with_operator(sqlbox, stalled, lock_timeout=1.0))
    finally:
        held.rollback()
        held.close()
    assert "db_datareader" in roles
    print(
        "\nSQL stall (noisy shared machine): "
        + ", ".join(f"{what} {seconds:.2f}s" for what, seconds in timings.items())
    )

    async def afterwards(database: OdbcDatabase) -> None:
        await database.create_user(target, "stalled-user", sid, None)
        await database.drop_user(target, "stalled-user")

    asyncio.run(_with_operator(sqlbox, afterwards, lock_timeout=1.0))


def test_a_ddl_trigger_of_a_db_ddladmin_tenant_makes_the_operator_refuse_the_database(
    sqlbox: SqlBox, tenant: str, admin_db: Any
) -> None:
    target = _target(sqlbox)
    as_tenant = sqlbox.connect(sqlbox.token(ADMIN))
    try:
        as_tenant.execute(
            "CREATE TRIGGER make_me_dbo ON DATABASE FOR CREATE_USER, ALTER_ROLE AS "
            "ALTER ROLE db_owner ADD MEMBER [sandbox-admin]"
        )
    finally:
        as_tenant.close()
    rows = admin_db.execute(
        "SELECT name, parent_class, type FROM sys.triggers WHERE parent_class = 0"
    ).fetchall()
    assert [tuple(r) for r in rows] == [("make_me_dbo", 0, "TR")]

    spec = parse_spec(
        {
            "serviceAccountName": "reader",
            "identity": {"applicationClientId": "5e0c1d9a-7b3f-4c2e-9a1d-000000000003"},
            "sql": {"server": target.server, "database": target.database},
        }
    )
    body = {"metadata": {"namespace": "ns", "name": "reader", "uid": "u"}}

    async def reconcile(database: OdbcDatabase) -> PermanentError:
        from swi_operator.cloud import ResolvedIdentity

        assert await database.ddl_triggers(target) == ["make_me_dbo"]
        ctx = Context(resource_ref(body), spec, {}, TENANT)
        ctx.identity = ResolvedIdentity(
            spec.identity, "5e0c1d9a-7b3f-4c2e-9a1d-000000000003", TENANT, "customer-api", "o"
        )
        with pytest.raises(PermanentError) as refused:
            await DatabaseAccessStep(database, KeyedLocks()).reconcile(ctx)
        return refused.value

    refused = asyncio.run(_with_operator(sqlbox, reconcile, lock_timeout=5.0))
    assert refused.reason is Reason.DATABASE_HAS_DDL_TRIGGERS
    assert "[make_me_dbo]" in refused.message
    users = {r[0] for r in admin_db.execute("SELECT name FROM sys.database_principals")}
    assert "customer-api" not in users, "no CREATE USER may run while the trigger exists"
    assert sid_of("5e0c1d9a-7b3f-4c2e-9a1d-000000000003")  # the SID the user would have had


def test_a_user_created_by_another_session_meanwhile_is_user_exists(
    sqlbox: SqlBox, tenant: str, admin_db: Any
) -> None:
    """Azure SQL's 15023 on CREATE USER (another cluster's operator made it between the look and
    the statement) reaches the database step as ``UserExists``, which it retries and adopts."""
    from swi_operator.sql import UserExists

    target = _target(sqlbox)
    sid = uuid.uuid4().bytes_le
    admin_db.execute(f"CREATE USER [stalled-user] WITH SID = 0x{sid.hex()}, TYPE = E")

    async def create_again(database: OdbcDatabase) -> None:
        await database.create_user(target, "stalled-user", sid, None)

    with pytest.raises(UserExists, match=r"15023"):
        asyncio.run(_with_operator(sqlbox, create_again, lock_timeout=5))


def test_a_first_probe_queries_on_a_recent_login_of_its_identity_and_no_other(
    sqlbox: SqlBox, tenant: str
) -> None:
    """Issue 23: onboarding a fleet, a resource's first probe may run its queries on a session
    another probe of the same identity logged in to less than PROBE_SESSION_SHARED_S ago; never
    on another identity's session, nor on an older one, nor when not asked to share."""
    target = _target(sqlbox)
    now = [1_800_000_000.0]

    async def probes(database: OdbcDatabase) -> list[Probed]:
        tenant_token = sqlbox.token(ADMIN)
        done = [
            await database.probe(target, tenant_token, read_table=False, share=True),
            await database.probe(target, tenant_token, read_table=False, share=True),
            await database.probe(target, tenant_token, read_table=False, share=False),
            # The operator's own identity (the server's admin): another identity's session.
            await database.probe(target, sqlbox.token(OPERATOR), read_table=False, share=True),
        ]
        now[0] += PROBE_SESSION_SHARED_S + 1  # every session kept is now too old to share
        done.append(await database.probe(target, tenant_token, read_table=False, share=True))
        return done

    found = asyncio.run(_with_operator(sqlbox, probes, lock_timeout=1.0, clock=lambda: now[0]))
    assert [p.user for p in found] == [tenant, tenant, tenant, "dbo", tenant]
    assert found[0].login_age is None  # nothing to share yet: its own login
    assert found[1].login_age == 0.0  # the first one's session, logged in "just now"
    assert found[2].login_age is None  # not asked to share
    assert found[3].login_age is None  # another identity
    assert found[4].login_age is None  # too old: a login of its own
