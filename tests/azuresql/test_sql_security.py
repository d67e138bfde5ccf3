"""Database users and roles: the Entra admin manages them, everyone else is refused."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pyodbc
import pytest
from sqlbox import ADMIN, CUSTOMER_API, DEMO, OPERATOR, SqlBox


@pytest.fixture
def clean(admin_db: Any) -> Iterator[Any]:
    for name in ("customer-api", "api-by-oid", "sandbox-admin"):
        admin_db.execute(f"DROP USER IF EXISTS [{name}]")
    yield admin_db
    for name in ("customer-api", "api-by-oid", "sandbox-admin"):
        admin_db.execute(f"DROP USER IF EXISTS [{name}]")


def _principals(conn: Any) -> dict[str, tuple[str, str, bytes]]:
    rows = conn.execute(
        "SELECT name, type, type_desc, sid FROM sys.database_principals WHERE type IN ('E', 'X')"
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _roles_of(conn: Any, name: str) -> set[str]:
    rows = conn.execute(
        "SELECT r.name FROM sys.database_role_members m "
        "JOIN sys.database_principals r ON r.principal_id = m.role_principal_id "
        "JOIN sys.database_principals u ON u.principal_id = m.member_principal_id "
        "WHERE u.name = ?",
        name,
    ).fetchall()
    return {r[0] for r in rows}


def test_admin_is_dbo(admin_db: Any) -> None:
    assert admin_db.execute("SELECT USER_NAME()").fetchone()[0] == "dbo"


def test_create_user_from_external_provider_resolves_the_name_in_the_directory(
    clean: Any,
) -> None:
    clean.execute("CREATE USER [customer-api] FROM EXTERNAL PROVIDER")
    user_type, type_desc, sid = _principals(clean)["customer-api"]
    assert (user_type, type_desc) == ("E", "EXTERNAL_USER")
    assert sid == uuid.UUID(CUSTOMER_API.app_id).bytes_le  # SID = client id, little-endian


def test_create_user_with_object_id_may_use_any_name(clean: Any) -> None:
    clean.execute(
        f"CREATE USER [api-by-oid] FROM EXTERNAL PROVIDER "
        f"WITH OBJECT_ID = '{CUSTOMER_API.sp_object_id}'"
    )
    assert _principals(clean)["api-by-oid"][2] == uuid.UUID(CUSTOMER_API.app_id).bytes_le


def test_create_user_with_sid_skips_the_directory(clean: Any) -> None:
    sid = "0x" + uuid.UUID(ADMIN.app_id).bytes_le.hex().upper()
    clean.execute(f"CREATE USER [sandbox-admin] WITH SID = {sid}, TYPE = E")
    assert _principals(clean)["sandbox-admin"][0] == "E"


def test_role_membership_grants_and_revokes_access(sqlbox: SqlBox, clean: Any) -> None:
    sid = "0x" + uuid.UUID(ADMIN.app_id).bytes_le.hex()
    clean.execute(f"CREATE USER [sandbox-admin] WITH SID = {sid}, TYPE = E")
    clean.execute("ALTER ROLE db_datareader ADD MEMBER [sandbox-admin]")
    clean.execute("ALTER ROLE db_datareader ADD MEMBER [sandbox-admin]")  # idempotent
    assert _roles_of(clean, "sandbox-admin") == {"db_datareader"}
    conn = sqlbox.connect(sqlbox.token(ADMIN))
    try:
        assert conn.execute("SELECT COUNT(*) FROM Customer").fetchone()[0] == 5
        clean.execute("ALTER ROLE db_datareader DROP MEMBER [sandbox-admin]")
        with pytest.raises(pyodbc.Error, match=r"\(229\)"):
            conn.execute("SELECT COUNT(*) FROM Customer")
    finally:
        conn.close()
    clean.execute("DROP USER [sandbox-admin]")
    with pytest.raises(pyodbc.Error, match=r"\(18456\)"):
        sqlbox.connect(sqlbox.token(ADMIN))


@pytest.mark.parametrize(
    ("statement", "number", "text"),
    [
        (
            "CREATE USER [nobody-here] FROM EXTERNAL PROVIDER",
            33130,
            "Principal 'nobody-here' could not be found or this principal type is not supported.",
        ),
        (
            "CREATE USER [SP-AZURESQL-USER] FROM EXTERNAL PROVIDER",
            15023,
            "User, group, or role 'SP-AZURESQL-USER' already exists in the current database.",
        ),
        (
            "DROP USER [nobody-here]",
            15151,
            "Cannot drop the user 'nobody-here', because it does not exist or you do not have "
            "permission.",
        ),
        (
            "ALTER ROLE db_nope ADD MEMBER [SP-AZURESQL-USER]",
            15151,
            "Cannot alter the role 'db_nope', because it does not exist or you do not have "
            "permission.",
        ),
        (
            "ALTER ROLE db_datareader ADD MEMBER [nobody-here]",
            15151,
            "Cannot add the principal 'nobody-here', because it does not exist or you do not have "
            "permission.",
        ),
        (
            "CREATE USER [x] WITH PASSWORD = 'p'",
            40517,
            "Keyword or statement option 'WITH PASSWORD' is not supported",
        ),
        ("CREATE USER [x] FROM EXTERNAL", 102, "Incorrect syntax near 'EXTERNAL'."),
    ],
)
def test_admin_errors(clean: Any, statement: str, number: int, text: str) -> None:
    with pytest.raises(pyodbc.Error) as caught:
        clean.execute(statement)
    message = str(caught.value)
    assert text in message
    assert f"({number})" in message


def test_drop_user_if_exists_is_quiet(clean: Any) -> None:
    clean.execute("DROP USER IF EXISTS [nobody-here]")


def test_names_are_quoted_by_doubling_brackets(clean: Any) -> None:
    sid = "0x" + uuid.UUID(ADMIN.app_id).bytes_le.hex()
    clean.execute(f"CREATE USER [odd]]name] WITH SID = {sid}, TYPE = E")
    try:
        assert "odd]name" in _principals(clean)
    finally:
        clean.execute("DROP USER [odd]]name]")


@pytest.mark.parametrize(
    ("statement", "number"),
    [
        ("CREATE USER [customer-api] FROM EXTERNAL PROVIDER", 15247),
        ("ALTER ROLE db_datawriter ADD MEMBER [SP-AZURESQL-USER]", 15151),
        ("DROP USER [SP-AZURESQL-USER]", 15151),
    ],
)
def test_others_are_refused(sqlbox: SqlBox, clean: Any, statement: str, number: int) -> None:
    conn = sqlbox.connect(sqlbox.token(DEMO))
    try:
        with pytest.raises(pyodbc.Error) as caught:
            conn.execute(statement)
        assert f"({number})" in str(caught.value)
    finally:
        conn.close()
    assert "SP-AZURESQL-USER" in _principals(clean)
    assert _roles_of(clean, "SP-AZURESQL-USER") == {"db_datareader"}


def test_create_user_rolls_back_with_its_transaction(sqlbox: SqlBox, clean: Any) -> None:
    conn = sqlbox.connect(sqlbox.token(OPERATOR), autocommit=False)
    try:
        conn.execute("CREATE USER [customer-api] FROM EXTERNAL PROVIDER")
        conn.rollback()
    finally:
        conn.close()
    assert "customer-api" not in _principals(clean)


def test_concurrent_admin_sessions_with_autocommit_off(sqlbox: SqlBox) -> None:
    # Several reconcilers at once, as pyodbc opens them (autocommit off): reads hold no snapshot,
    # writes queue on the database's write lock instead of failing.
    token = sqlbox.token(OPERATOR)
    errors: list[str] = []

    def reconcile(index: int) -> None:
        conn = sqlbox.connect(token, autocommit=False)
        try:
            name = f"concurrent-{index}"
            conn.execute("SELECT COUNT(*) FROM sys.database_principals").fetchone()
            conn.execute(f"CREATE USER [{name}] WITH SID = 0x{0xC000 + index:04X}, TYPE = E")
            conn.execute(f"ALTER ROLE db_datareader ADD MEMBER [{name}]")
            conn.commit()
            conn.execute(f"DROP USER [{name}]")
            conn.commit()
        except pyodbc.Error as exc:
            errors.append(str(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=reconcile, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []


def test_concurrent_admin_sessions_in_autocommit_create_users(sqlbox: SqlBox) -> None:
    # The operator's sessions (autocommit on) creating users at the same moment each get their
    # own principal id (bench/onboarding.py once got connections reset here).
    token = sqlbox.token(OPERATOR)
    errors: list[str] = []
    barrier = threading.Barrier(6)

    def create(index: int) -> None:
        conn = sqlbox.connect(token, autocommit=True)
        try:
            barrier.wait(timeout=10)
            name = f"autocommit-{index}"
            conn.execute(f"CREATE USER [{name}] WITH SID = 0x{0xD000 + index:04X}, TYPE = E")
            conn.execute(f"DROP USER [{name}]")
        except (pyodbc.Error, threading.BrokenBarrierError) as exc:
            errors.append(str(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []


def test_the_seeds_step_2_as_one_batch(clean: Any) -> None:
    # shared/seed Step 2, for the second app: users, roles, then the check, in one batch.
    step2 = """CREATE USER [customer-api] FROM EXTERNAL PROVIDER;

ALTER ROLE db_datareader ADD MEMBER [customer-api];
ALTER ROLE db_datawriter ADD MEMBER [customer-api];
ALTER ROLE db_ddladmin ADD MEMBER [customer-api];

SELECT * FROM sys.database_principals WHERE type_desc = 'EXTERNAL_USER'"""
    names = [row[0] for row in clean.execute(step2).fetchall()]
    assert "customer-api" in names
    assert _roles_of(clean, "customer-api") == {"db_datareader", "db_datawriter", "db_ddladmin"}


def test_statements_on_separate_lines_need_no_semicolons(clean: Any) -> None:
    clean.execute(
        "CREATE USER [customer-api] FROM EXTERNAL PROVIDER\n"
        f"    WITH OBJECT_ID = '{CUSTOMER_API.sp_object_id}'\n"
        "ALTER ROLE db_datareader ADD MEMBER [customer-api]\n"
        "GO\n"
        "ALTER ROLE db_datareader\n"
        "    DROP MEMBER [customer-api]\n"
        "ALTER ROLE db_datawriter ADD MEMBER [customer-api]"
    )
    assert _roles_of(clean, "customer-api") == {"db_datawriter"}
