"""Issue 18, finding 4, without a server: every statement of the operator carries SET LOCK_TIMEOUT
and a query timeout, 1222 and the driver's timeout are retried as DatabaseBusy, and one database
never takes every session. (Against the SQL emulator: tests/operator/test_sql_stall.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from swi_operator.config import Config
from swi_operator.errors import Reason, TransientError, sql_error
from swi_operator.sql import OdbcDatabase, SqlTarget, with_lock_timeout


@dataclass(frozen=True)
class Failure:
    number: int | None
    message: str
    sqlstate: str = "42000"
    transient: bool = False
    unreachable: bool = False


def test_every_statement_is_prefixed_with_the_lock_timeout() -> None:
    sql = with_lock_timeout("DROP USER IF EXISTS [x]", 5000)
    assert sql.startswith("SET LOCK_TIMEOUT 5000;")
    assert sql.endswith("DROP USER IF EXISTS [x]")


def test_lock_and_query_timeouts_are_retried_as_database_busy() -> None:
    for failure in (
        Failure(1222, "Lock request time out period exceeded."),
        Failure(None, "Query timeout expired", sqlstate="HYT00", unreachable=True),
    ):
        err = sql_error(failure, "database 'mydb' on s", "drop the user 'x'", "the operator")
        assert isinstance(err, TransientError) and err.reason is Reason.DATABASE_BUSY
        assert "another session holds a lock" in err.message


class _Credential:
    async def get_token(self, *scopes: str, **kwargs: object) -> object:
        raise AssertionError("no token is needed")

    async def close(self) -> None:
        return None


async def test_one_stuck_database_holds_at_most_half_the_sessions() -> None:
    database = OdbcDatabase(_Credential(), "client", 4, (".database.windows.net",))  # type: ignore[arg-type]
    stuck = SqlTarget("a.database.windows.net", "stuck")
    other = SqlTarget("a.database.windows.net", "other")
    release = asyncio.Event()

    async def hold(target: SqlTarget) -> None:
        async with database._slot(target):
            await release.wait()

    holders = [asyncio.create_task(hold(stuck)) for _ in range(4)]
    await asyncio.sleep(0)
    # Only two of the four wait inside; the other database still gets a session at once.
    assert database._slots.in_use() == 2
    async with asyncio.timeout(5):
        async with database._slot(other):
            pass
    # Spelled differently, the same database shares the same slots.
    same = SqlTarget("tcp:A.database.windows.net,1433", "STUCK")
    assert database._slot_key(same) == database._slot_key(stuck)
    release.set()
    await asyncio.gather(*holders)
    await database.close()


def test_config_repr_never_shows_the_client_secret() -> None:
    config = Config(tenant_id="t", client_id="c", client_secret="s3cr3t-value")
    assert "s3cr3t-value" not in repr(config) and "s3cr3t-value" not in str(config)
