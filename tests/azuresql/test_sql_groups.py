"""Database access through an Entra group, through the real ODBC Driver 18.

A contained user for a security group (``CREATE USER [g] FROM EXTERNAL PROVIDER``, type X, SID =
the group's object id) lets in every service principal the directory says is a member of the
group, directly or through nested groups, with the group user's roles. The server asks the
directory at each login (the token carries no ``groups`` claim for service principals), so adding
or removing a member in Graph changes who gets in without touching the database.

The groups are made through the Entra emulator's Graph by the sandbox-admin app (the Graph side is
tested with msgraph-sdk in tests/entra/test_graph_pools.py); the member that logs in is the
sandbox-admin app itself, which has no contained user of its own here (``no_user``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pyodbc
import pytest
from sqlbox import ADMIN, SqlBox

GRAPH = "https://graph.microsoft.com/v1.0"
MakeGroup = Callable[[], tuple[str, str]]


@pytest.fixture
def make_group(sqlbox: SqlBox, admin_db: Any, no_user: None) -> Iterator[MakeGroup]:
    """``make_group()`` -> (object id, name) of a new security group; dropped afterwards, with
    its database user."""
    made: list[tuple[str, str]] = []

    def make() -> tuple[str, str]:
        name = f"sql-readers-{uuid.uuid4().hex[:8]}"
        response = sqlbox.graph(
            "POST",
            "groups",
            app=ADMIN,
            json={
                "displayName": name,
                "mailNickname": name,
                "mailEnabled": False,
                "securityEnabled": True,
            },
        )
        assert response.status_code == 201, response.text
        made.append((str(response.json()["id"]), name))
        return made[-1]

    yield make
    for object_id, name in made:
        admin_db.execute(f"DROP USER IF EXISTS [{name}]")
        assert sqlbox.graph("DELETE", f"groups/{object_id}", app=ADMIN).status_code == 204


def _add_member(sqlbox: SqlBox, group_id: str, member_id: str) -> None:
    response = sqlbox.graph(
        "POST",
        f"groups/{group_id}/members/$ref",
        app=ADMIN,
        json={"@odata.id": f"{GRAPH}/directoryObjects/{member_id}"},
    )
    assert response.status_code == 204, response.text


def _remove_member(sqlbox: SqlBox, group_id: str, member_id: str) -> None:
    response = sqlbox.graph("DELETE", f"groups/{group_id}/members/{member_id}/$ref", app=ADMIN)
    assert response.status_code == 204, response.text


def _refused(sqlbox: SqlBox) -> None:
    with pytest.raises(pyodbc.Error, match=r"Login failed for user '<token-identified principal>'"):
        sqlbox.connect(sqlbox.token(ADMIN))


def test_a_member_of_a_group_gets_the_group_users_roles(
    sqlbox: SqlBox, admin_db: Any, make_group: MakeGroup
) -> None:
    group_id, name = make_group()
    admin_db.execute(f"CREATE USER [{name}] FROM EXTERNAL PROVIDER")
    admin_db.execute(f"ALTER ROLE db_datareader ADD MEMBER [{name}]")
    row = admin_db.execute(
        "SELECT type, type_desc, sid FROM sys.database_principals WHERE name = ?", name
    ).fetchone()
    assert (row[0], row[1], bytes(row[2])) == (
        "X",
        "EXTERNAL_GROUP",
        uuid.UUID(group_id).bytes_le,  # a group's SID is its object id
    )

    _refused(sqlbox)  # not a member yet, and no user of its own
    _add_member(sqlbox, group_id, ADMIN.sp_object_id)
    conn = sqlbox.connect(sqlbox.token(ADMIN))
    try:
        assert conn.execute("SELECT COUNT(*) FROM Customer").fetchone()[0] == 5
        assert conn.execute("SELECT USER_NAME()").fetchone()[0] == name
        with pytest.raises(pyodbc.Error, match=r"\(229\)"):  # db_datareader only
            conn.execute("DELETE FROM Customer WHERE 1 = 0")
    finally:
        conn.close()

    _remove_member(sqlbox, group_id, ADMIN.sp_object_id)
    _refused(sqlbox)  # asked again at the next login


def test_nested_groups_count_and_a_sid_user_works_too(
    sqlbox: SqlBox, admin_db: Any, make_group: MakeGroup
) -> None:
    outer_id, outer = make_group()
    inner_id, _ = make_group()
    sid = "0x" + uuid.UUID(outer_id).bytes_le.hex()
    admin_db.execute(f"CREATE USER [{outer}] WITH SID = {sid}, TYPE = X")
    admin_db.execute(f"ALTER ROLE db_datareader ADD MEMBER [{outer}]")
    _add_member(sqlbox, inner_id, ADMIN.sp_object_id)
    _refused(sqlbox)  # the inner group has no user and is not nested yet
    _add_member(sqlbox, outer_id, inner_id)
    conn = sqlbox.connect(sqlbox.token(ADMIN))
    try:
        assert conn.execute("SELECT COUNT(*) FROM Customer").fetchone()[0] == 5
    finally:
        conn.close()


def test_own_user_and_group_roles_add_up(
    sqlbox: SqlBox, admin_db: Any, make_group: MakeGroup
) -> None:
    group_id, name = make_group()
    admin_db.execute(f"CREATE USER [{name}] FROM EXTERNAL PROVIDER")
    admin_db.execute(f"ALTER ROLE db_datawriter ADD MEMBER [{name}]")
    sid = "0x" + uuid.UUID(ADMIN.app_id).bytes_le.hex()
    admin_db.execute(f"CREATE USER [sandbox-admin] WITH SID = {sid}, TYPE = E")
    admin_db.execute("ALTER ROLE db_datareader ADD MEMBER [sandbox-admin]")
    _add_member(sqlbox, group_id, ADMIN.sp_object_id)
    conn = sqlbox.connect(sqlbox.token(ADMIN))
    try:
        assert conn.execute("SELECT USER_NAME()").fetchone()[0] == "sandbox-admin"
        assert conn.execute("SELECT COUNT(*) FROM Customer").fetchone()[0] == 5  # its own role
        conn.execute("UPDATE Customer SET active = active WHERE 1 = 0")  # the group's role
    finally:
        conn.close()
    _remove_member(sqlbox, group_id, ADMIN.sp_object_id)
    conn = sqlbox.connect(sqlbox.token(ADMIN))
    try:
        with pytest.raises(pyodbc.Error, match=r"\(229\)"):
            conn.execute("UPDATE Customer SET active = active WHERE 1 = 0")
    finally:
        conn.close()


def test_a_group_name_resolves_like_a_service_principals(
    admin_db: Any, make_group: MakeGroup
) -> None:
    group_id, name = make_group()
    admin_db.execute(
        f"CREATE USER [by-oid-{name}] FROM EXTERNAL PROVIDER WITH OBJECT_ID = '{group_id}'"
    )
    try:
        row = admin_db.execute(
            "SELECT type FROM sys.database_principals WHERE name = ?", f"by-oid-{name}"
        ).fetchone()
        assert row[0] == "X"
    finally:
        admin_db.execute(f"DROP USER [by-oid-{name}]")
