"""Unit tests of the TDS codec and the T-SQL engine, without sockets or the driver."""

from __future__ import annotations

import datetime as dt
import decimal
import struct
import threading
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.azuresql import tds
from sandbox.azuresql.engine import Database, DbUser, SeedUser, quote_name
from sandbox.azuresql.results import SqlError, StatementDone
from sandbox.azuresql.statements import split_batch


def _roundtrip(sql_type: tds.SqlType, value: object) -> object:
    data = sql_type.type_info() + tds.encode_value(sql_type, value)
    reader = tds.Reader(data)
    decoded_type = tds.decode_type_info(reader)
    result = tds.decode_value(reader, decoded_type)
    assert reader.remaining() == 0
    return result


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_bigint_roundtrip(value: int) -> None:
    assert _roundtrip(tds.BIGINT, value) == value


@given(st.text(max_size=3000))
def test_nvarchar_roundtrip(value: str) -> None:
    assert _roundtrip(tds.nvarchar(4000), value) == value
    assert _roundtrip(tds.NVARCHAR_MAX, value) == value  # PLP


@pytest.mark.parametrize(
    ("sql_type", "value"),
    [
        (tds.BIT, True),
        (tds.FLOAT, 1.25),
        (tds.SqlType(tds.Kind.DECIMAL, None, 10, 2), decimal.Decimal("-12.50")),
        (
            tds.SqlType(tds.Kind.DATETIME2, None, scale=7),
            dt.datetime(2024, 5, 1, 10, 30, 0, 123456),
        ),
        (tds.SqlType(tds.Kind.DATE, 3), dt.date(1999, 12, 31)),
        (tds.SqlType(tds.Kind.GUID, 16), "5E0C1D9A-7B3F-4C2E-9A1D-000000000002"),
        (tds.SqlType(tds.Kind.VARBINARY, 85), b"\x01\x02"),
        (tds.SqlType(tds.Kind.VARCHAR, 50), "Doe"),
        (tds.INT, None),
        (tds.NVARCHAR_MAX, None),
    ],
)
def test_value_roundtrip(sql_type: tds.SqlType, value: object) -> None:
    assert _roundtrip(sql_type, value) == value


def test_packets_split_and_mark_the_last_one() -> None:
    data = tds.packetize(tds.PacketType.RESPONSE, b"x" * 10000, 4096)
    first = tds.parse_header(data[:8])
    assert first == (tds.PacketType.RESPONSE, 0, 4088)
    last_offset = 2 * 4096
    assert tds.parse_header(data[last_offset : last_offset + 8]) == (
        tds.PacketType.RESPONSE,
        tds.STATUS_EOM,
        10000 - 2 * 4088,
    )


def test_prelogin_roundtrip() -> None:
    payload = tds.build_prelogin(
        [
            (tds.PreloginOption.VERSION, b"\x0c\x00\x07\xd0\x00\x00"),
            (tds.PreloginOption.ENCRYPTION, b"\x01"),
            (tds.PreloginOption.FEDAUTHREQUIRED, b"\x01"),
        ]
    )
    options = tds.parse_prelogin(payload)
    assert options[tds.PreloginOption.ENCRYPTION] == b"\x01"
    assert options[tds.PreloginOption.FEDAUTHREQUIRED] == b"\x01"


def _login7(token: str, database: str) -> bytes:
    strings = {36: "host", 48: "app", 52: "server", 68: database}
    fixed = bytearray(94)
    struct.pack_into("<I", fixed, 4, tds.TDS_VERSION_74)
    struct.pack_into("<I", fixed, 8, 8192)
    fixed[27] = tds.OPTION_FLAGS3_EXTENSION
    data = bytearray()
    for offset, text in strings.items():
        struct.pack_into("<HH", fixed, offset, 94 + len(data), len(text))
        data += text.encode("utf-16-le")
    ext_at = 94 + len(data)
    struct.pack_into("<HH", fixed, 56, ext_at, 4)
    feature_at = ext_at + 4
    raw = token.encode("utf-16-le")
    fedauth = bytes([(tds.FEDAUTH_LIBRARY_SECURITY_TOKEN << 1) | 1]) + struct.pack("<I", len(raw))
    feature = bytes([tds.FEATURE_FEDAUTH]) + struct.pack("<I", len(fedauth) + len(raw)) + fedauth
    payload = fixed + data + struct.pack("<I", feature_at) + feature + raw + b"\xff"
    struct.pack_into("<I", payload, 0, len(payload))
    return bytes(payload)


def test_login7_carries_the_access_token() -> None:
    login = tds.parse_login7(_login7("eyJ.token.sig", "mydb"))
    assert (login.database, login.packet_size, login.access_token) == (
        "mydb",
        8192,
        "eyJ.token.sig",
    )
    assert login.fedauth_echo and login.fedauth_library == tds.FEDAUTH_LIBRARY_SECURITY_TOKEN


def test_fedauthinfo_has_azure_sqls_layout() -> None:
    # The first bytes of a real Azure SQL FEDAUTHINFO (hugr-lab/mssql-extension#164): SPN first
    # (58 bytes at offset 22), then the STS URL of a tenant id (124 bytes at offset 80), offsets
    # counted from CountOfInfoIDs, TokenLength 204 not counting itself.
    tenant = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
    token = tds.fedauth_info(f"https://login.windows.net/{tenant}", "https://database.windows.net/")
    assert token[:27].hex(" ") == (
        "ee cc 00 00 00 02 00 00 00 02 3a 00 00 00 16 00 00 00 01 7c 00 00 00 50 00 00 00"
    )
    assert token[27:85].decode("utf-16-le") == "https://database.windows.net/"
    assert token[85:].decode("utf-16-le") == f"https://login.windows.net/{tenant}"


def test_login7_asking_for_the_adal_workflow_carries_no_token() -> None:
    payload = bytearray(_login7("", "mydb"))
    at = payload.index(bytes([tds.FEATURE_FEDAUTH]), 94)
    # FEDAUTH data for the ADAL library: options byte + workflow byte, no token.
    feature = bytes([tds.FEATURE_FEDAUTH]) + struct.pack("<I", 2)
    feature += bytes([(tds.FEDAUTH_LIBRARY_ADAL << 1) | 1, 0x01, 0xFF])
    payload[at:] = feature
    struct.pack_into("<I", payload, 0, len(payload))
    login = tds.parse_login7(bytes(payload))
    assert login.fedauth_library == tds.FEDAUTH_LIBRARY_ADAL
    assert (login.fedauth_workflow, login.access_token, login.fedauth_echo) == (1, None, True)


def test_fedauth_token_message_is_read_with_or_without_a_nonce() -> None:
    raw = "eyJ.token.sig".encode("utf-16-le")
    body = struct.pack("<I", len(raw)) + raw
    assert tds.parse_fedauth_token(struct.pack("<I", len(body)) + body) == "eyJ.token.sig"
    nonce = bytes(32)
    framed = struct.pack("<I", len(body) + 32) + body + nonce
    assert tds.parse_fedauth_token(framed) == "eyJ.token.sig"
    # ODBC Driver 18 sends the token NUL-terminated.
    terminated = "eyJ.token.sig\x00".encode("utf-16-le")
    body = struct.pack("<I", len(terminated)) + terminated
    assert tds.parse_fedauth_token(struct.pack("<I", len(body)) + body) == "eyJ.token.sig"
    with pytest.raises(tds.ProtocolError):
        tds.parse_fedauth_token(struct.pack("<II", 100, 90) + raw)


def test_split_batch_in_threads_at_once() -> None:
    # Sessions split their batches in threads at the same time (found by bench/onboarding.py:
    # one shared tokenizer mixed two batches, "Unclosed quotation mark").
    errors: list[str] = []

    def split(index: int) -> None:
        for _ in range(200):
            batch = f"SELECT name FROM sys.database_principals WHERE name = 'user-{index}'"
            statements = split_batch(batch)
            if [s.text for s in statements] != [batch]:
                errors.append(repr(statements))

    threads = [threading.Thread(target=split, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_split_batch_respects_strings_and_parentheses() -> None:
    statements = split_batch("SELECT ';' AS a; INSERT INTO t (a) VALUES ('x;y');\n\n ;SELECT 2")
    assert [s.text for s in statements] == [
        "SELECT ';' AS a",
        "INSERT INTO t (a) VALUES ('x;y')",
        "SELECT 2",
    ]


def test_quote_name_doubles_closing_brackets() -> None:
    assert quote_name("a]b") == "[a]]b]"


def test_engine_seed_and_permissions(tmp_path: Path) -> None:
    database = Database("s", "db", tmp_path / "db.sqlite", tenant="t")
    reader_sid = uuid.UUID(int=1).bytes_le
    database.create(
        "CREATE TABLE T (id INT PRIMARY KEY IDENTITY, name NVARCHAR(20));"
        "INSERT INTO T (name) VALUES (N'a');",
        [SeedUser("reader", reader_sid, ["db_datareader"])],
    )
    admin = database.open(DbUser(1, "dbo", True))
    [done] = admin.execute("SELECT TOP 1 * FROM dbo.T")
    assert isinstance(done, StatementDone) and done.result is not None
    assert [c.sql_type.sql_name() for c in done.result.columns] == ["int", "nvarchar(20)"]
    reader = database.open(DbUser(5, "reader", False))
    with pytest.raises(SqlError) as caught:
        reader.execute("DELETE FROM T")
    assert caught.value.number == 229
    with pytest.raises(SqlError) as caught:
        reader.execute("ALTER ROLE db_owner ADD MEMBER [reader]")
    assert caught.value.number == 15151
    admin.close()
    reader.close()


def test_result_types_follow_the_table_when_it_is_recreated(tmp_path: Path) -> None:
    """Result column types are remembered by statement text and the columns read: the same
    SELECT over a table dropped and created again with other types gets the new ones."""
    database = Database("s", "db", tmp_path / "db.sqlite", tenant="t")
    database.create("CREATE TABLE T (a BIT, b INT);", [])
    admin = database.open(DbUser(1, "dbo", True))

    def types() -> list[str]:
        [done] = admin.execute("SELECT a, b FROM dbo.T")
        assert isinstance(done, StatementDone) and done.result is not None
        return [c.sql_type.sql_name() for c in done.result.columns]

    assert types() == ["bit", "int"]
    assert types() == ["bit", "int"]  # remembered
    admin.execute("DROP TABLE T")
    admin.execute("CREATE TABLE T (a NVARCHAR(7), b BIGINT)")
    assert types() == ["nvarchar(7)", "bigint"]
    admin.close()


def test_drop_table(tmp_path: Path) -> None:
    database = Database("s", "db", tmp_path / "db.sqlite", tenant="t")
    database.create("CREATE TABLE A (id INT); CREATE TABLE B (id INT);", [])
    admin = database.open(DbUser(1, "dbo", True))
    admin.execute("DROP TABLE dbo.A, B")
    for name in ("A", "B"):
        with pytest.raises(SqlError) as caught:
            admin.execute(f"SELECT * FROM {name}")
        assert caught.value.number == 208
    with pytest.raises(SqlError) as caught:
        admin.execute("DROP TABLE A")
    assert caught.value.number == 3701
    admin.execute("DROP TABLE IF EXISTS A")
    admin.close()


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        (
            "CREATE USER [a] FROM EXTERNAL PROVIDER\nALTER ROLE r ADD MEMBER [a]",
            ["CREATE USER [a] FROM EXTERNAL PROVIDER", "ALTER ROLE r ADD MEMBER [a]"],
        ),
        (
            "ALTER ROLE r\nDROP MEMBER [x]\nDROP USER [x]",
            ["ALTER ROLE r\nDROP MEMBER [x]", "DROP USER [x]"],
        ),
        (
            "INSERT INTO t (a)\nSELECT a FROM s\nUNION\nSELECT b FROM s\nUPDATE t\nSET a = 1",
            ["INSERT INTO t (a)\nSELECT a FROM s\nUNION\nSELECT b FROM s", "UPDATE t\nSET a = 1"],
        ),
        (
            "WITH x AS (SELECT 1 AS a)\nSELECT * FROM x",
            ["WITH x AS (SELECT 1 AS a)\nSELECT * FROM x"],
        ),
        (
            "CREATE TABLE t (\n  id INT\n)\nGO\nINSERT INTO t VALUES (1)",
            ["CREATE TABLE t (\n  id INT\n)", "INSERT INTO t VALUES (1)"],
        ),
    ],
)
def test_split_batch_without_semicolons(batch: str, expected: list[str]) -> None:
    assert [s.text for s in split_batch(batch)] == expected
