"""Fixtures for the Azure SQL emulator suite: see sqlbox.py (Entra + proxy + SQL, no cluster)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlbox import ADMIN, OPERATOR, SqlBox, sqlbox, sqlbox_session

__all__ = ["sqlbox", "sqlbox_session"]


@pytest.fixture
def admin_db(sqlbox: SqlBox) -> Iterator[object]:
    """A connection as the server's Entra admin (the operator app), autocommit on."""
    conn = sqlbox.connect(sqlbox.token(OPERATOR))
    yield conn
    conn.close()


@pytest.fixture
def no_user(admin_db: object) -> Iterator[None]:
    """Make sure the sandbox-admin app has no user in mydb, before and after the test."""
    admin_db.execute("DROP USER IF EXISTS [sandbox-admin]")  # type: ignore[attr-defined]
    yield
    admin_db.execute("DROP USER IF EXISTS [sandbox-admin]")  # type: ignore[attr-defined]


@pytest.fixture
def user_without_roles(admin_db: object) -> Iterator[str]:
    """The sandbox-admin app as a contained user with no role at all."""
    import uuid

    sid = "0x" + uuid.UUID(ADMIN.app_id).bytes_le.hex()
    admin_db.execute("DROP USER IF EXISTS [sandbox-admin]")  # type: ignore[attr-defined]
    admin_db.execute(f"CREATE USER [sandbox-admin] WITH SID = {sid}, TYPE = E")  # type: ignore[attr-defined]
    yield "sandbox-admin"
    admin_db.execute("DROP USER IF EXISTS [sandbox-admin]")  # type: ignore[attr-defined]
