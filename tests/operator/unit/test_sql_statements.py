"""The SQL the operator writes (quoting, SIDs, the connection string), how SQL failures map to
retry-or-stop, and the settings and spec fields of database access."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from swi_operator.config import DEFAULT_SQL_SERVERS, ConfigError, load
from swi_operator.errors import PermanentError, Reason, TransientError, sql_error
from swi_operator.spec import SpecError, parse_spec
from swi_operator.sql import (
    OdbcDatabase,
    SqlTarget,
    _settings,
    create_user_sql,
    drop_user_sql,
    quote_name,
    role_member_sql,
    roles_in,
    server_allowed,
    sid_of,
)
from swi_workload.errors import SqlFailure

CLIENT = "5e0c1d9a-7b3f-4c2e-9a1d-000000000003"


def unquote(quoted: str) -> str:
    """Read a bracketed identifier back the way T-SQL's tokenizer does; fail on anything left."""
    assert quoted.startswith("[")
    out, i = [], 1
    while True:
        c = quoted[i]
        if c == "]":
            if quoted[i + 1 : i + 2] == "]":
                out.append("]")
                i += 2
                continue
            assert i == len(quoted) - 1, "the identifier ended early: injection"
            return "".join(out)
        out.append(c)
        i += 1


@given(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, exclude_characters="\x7f"),
        min_size=1,
        max_size=128,
    )
)
def test_quote_name_round_trips_any_sysname(name):
    assert unquote(quote_name(name)) == name


@pytest.mark.parametrize(
    "name",
    ["evil]; DROP TABLE Customer; --", "O'Brien", 'x" OR 1=1', "[db_owner]", "a]]b", "GO"],
)
def test_hostile_names_stay_one_identifier(name):
    sql = role_member_sql("db_datareader", name, member=True)
    assert sql.startswith("ALTER ROLE [db_datareader] ADD MEMBER [")
    assert unquote(sql.removeprefix("ALTER ROLE [db_datareader] ADD MEMBER ")) == name


@pytest.mark.parametrize("name", ["", "x" * 129, "line\nbreak", "nul\x00", "del\x7f"])
def test_names_no_identifier_can_hold_are_refused(name):
    with pytest.raises(ValueError, match="characters"):
        quote_name(name)


def test_create_user_forms():
    sid = sid_of(CLIENT)
    assert sid == uuid.UUID(CLIENT).bytes_le
    assert create_user_sql("customer-api", sid) == (
        "CREATE USER [customer-api] WITH SID = 0x9A1D0C5E3F7B2E4C9A1D000000000003, TYPE = E"
    )
    object_id = "5e0c1d9a-7b3f-4c2e-9a1d-0000000000b3"
    assert create_user_sql("a]b", sid, object_id) == (
        f"CREATE USER [a]]b] FROM EXTERNAL PROVIDER WITH OBJECT_ID = '{object_id}'"
    )
    with pytest.raises(ValueError, match="badly formed"):
        create_user_sql("x", sid, "'; DROP TABLE Customer; --")
    assert drop_user_sql("a]b") == "DROP USER IF EXISTS [a]]b]"


def test_the_database_is_braced_in_the_connection_string():
    conn = _settings(SqlTarget("tcp:localhost,1433", "my;db}x"), None).connection_string()
    assert "SERVER=tcp:localhost,1433;DATABASE={my;db}}x};" in conn
    assert "UID" not in conn and "Authentication" not in conn


def test_roles_compare_like_the_database():
    found, missing = roles_in(["DB_DATAREADER", "nope"], {"db_datareader", "db_owner"})
    assert (found, missing) == (["db_datareader"], ["nope"])


@pytest.mark.parametrize(
    ("number", "message", "expected", "reason"),
    [
        (40613, "Database 'mydb' is not currently available.", TransientError, "Unavailable"),
        (None, "TCP Provider: Error code 0x2749", TransientError, "Unavailable"),
        (18456, "Login failed for user '<token-identified principal>'.", PermanentError, "Admin"),
        (15247, "User does not have permission to perform this action.", PermanentError, "Admin"),
        (18456, "Login failed ... Token is expired.", TransientError, "Unavailable"),
        (
            18456,
            "Login failed ... The server is not currently configured to accept this token.",
            PermanentError,
            "Authentication",
        ),
        (15138, "The database principal owns a schema", PermanentError, "Rejected"),
    ],
)
def test_sql_errors_of_the_operators_own_session(number, message, expected, reason):
    failure = SqlFailure("08001" if number is None else "28000", number, message)
    error = sql_error(failure, "database 'mydb' on s", "create the user 'x'", "the operator (c)")
    assert isinstance(error, expected)
    assert reason in error.reason
    if error.reason == Reason.OPERATOR_NOT_DATABASE_ADMIN:
        assert "Entra admin" in error.message and "az sql server ad-admin create" in error.message
        # Group membership first: ad-admin create replaces the server's one admin.
        assert "az ad group member add" in error.message and "replaces it" in error.message


def test_settings_for_database_access_and_verification():
    env = {
        "AZURE_TENANT_ID": str(uuid.uuid4()),
        "AZURE_CLIENT_ID": CLIENT,
        "AZURE_CLIENT_SECRET": "s",
    }
    config, _ = load([], env)
    assert (config.verify_interval, config.propagation_timeout) == (3600, 900)
    assert (config.sql_user_form, config.sql_concurrency) == ("sid", 4)
    config, _ = load(["--sql-user-form", "object-id", "--verify-interval", "60"], env)
    assert (config.sql_user_form, config.verify_interval) == ("object-id", 60)
    with pytest.raises(ConfigError, match="--sql-user-form / SWI_SQL_USER_FORM"):
        load([], {**env, "SWI_SQL_USER_FORM": "name"})


def test_spec_user_name():
    base = {"serviceAccountName": "sa", "identity": {"applicationClientId": CLIENT}}
    sql = {"server": "tcp:localhost,1433", "database": "mydb"}
    spec = parse_spec({**base, "sql": {**sql, "userName": "O'Brien]"}})
    assert spec.sql is not None and spec.sql.user_name == "O'Brien]"
    assert parse_spec({**base, "sql": sql}).sql.user_name is None  # type: ignore[union-attr]
    with pytest.raises(SpecError, match=r"spec\.sql\.userName"):
        parse_spec({**base, "sql": {**sql, "userName": "a\nb"}})
    with pytest.raises(SpecError, match=r"spec\.sql\.roles\[0\]"):
        parse_spec({**base, "sql": {**sql, "roles": ["db_datareader]; DROP USER x; --"]}})


@pytest.mark.parametrize(
    ("server", "allowed"),
    [
        ("myserver.database.windows.net", True),
        ("tcp:myserver.database.windows.net,1433", True),
        ("MyServer.Database.Windows.Net,1433", True),
        ("tcp:localhost,50123", True),
        ("gov.database.usgovcloudapi.net", True),
        ("database.windows.net.attacker.example", False),
        ("tcp:attacker.example,1433", False),
        ("evildatabase.windows.net", False),
        ("10.0.0.8,1433", False),
    ],
)
def test_allowed_servers(server, allowed):
    assert server_allowed(server, DEFAULT_SQL_SERVERS) is allowed


async def test_no_session_to_a_server_outside_the_allowed_ones():
    database = OdbcDatabase(None, CLIENT, 1, DEFAULT_SQL_SERVERS)  # type: ignore[arg-type]
    target = SqlTarget("tcp:attacker.example,1433", "mydb")
    try:
        with pytest.raises(PermanentError) as refused:
            await database.role_names(target)
        assert refused.value.reason == Reason.SQL_SERVER_NOT_ALLOWED
        assert "--allowed-sql-server" in refused.value.message
        with pytest.raises(PermanentError):
            await database.probe(target, "token", read_table=False)
    finally:
        await database.close()


def test_allowed_servers_setting():
    env = {
        "AZURE_TENANT_ID": str(uuid.uuid4()),
        "AZURE_CLIENT_ID": CLIENT,
        "AZURE_CLIENT_SECRET": "s",
    }
    assert load([], env)[0].allowed_sql_servers == DEFAULT_SQL_SERVERS
    config, _ = load([], {**env, "SWI_ALLOWED_SQL_SERVERS": ".corp.example, Sql1"})
    assert config.allowed_sql_servers == (".corp.example", "sql1")
    with pytest.raises(ConfigError, match="SWI_ALLOWED_SQL_SERVERS"):
        load([], {**env, "SWI_ALLOWED_SQL_SERVERS": "*.example"})
