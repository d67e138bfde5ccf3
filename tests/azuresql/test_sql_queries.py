"""T-SQL through the real driver: types, parameters, DML, DDL, transactions, errors, ATTENTION."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pyodbc
import pytest
from sqlbox import DEMO, OPERATOR, SqlBox


@pytest.fixture
def reader(sqlbox: SqlBox) -> Iterator[Any]:
    """The seed's SP-AZURESQL-USER (db_datareader only), pyodbc's default autocommit off."""
    conn = sqlbox.connect(sqlbox.token(DEMO), autocommit=False)
    yield conn
    conn.close()


def test_seed_query_returns_typed_columns(reader: Any) -> None:
    cursor = reader.cursor().execute("SELECT TOP (1000) * FROM [dbo].[Customer]")
    assert [d[0] for d in cursor.description] == [
        "customer_id",
        "first_name",
        "last_name",
        "active",
    ]
    assert [d[1] for d in cursor.description] == [int, str, str, bool]
    assert tuple(cursor.fetchone()) == (1, "John", "Doe", True)


def test_parameterised_query_goes_through_sp_prepexec(sqlbox: SqlBox, reader: Any) -> None:
    since = time.time()
    cursor = reader.cursor()
    cursor.execute("SELECT first_name FROM Customer WHERE customer_id = ? AND active = ?", 4, True)
    assert [tuple(r) for r in cursor.fetchall()] == [("Bob",)]
    # The same statement again reuses the prepared handle (sp_execute).
    cursor.execute("SELECT first_name FROM Customer WHERE customer_id = ? AND active = ?", 1, True)
    assert [tuple(r) for r in cursor.fetchall()] == [("John",)]
    rpcs = [e for e in sqlbox.log() if e["ts"] >= since and e["kind"] == "rpc"]
    assert any("@P1" in e["text"] and "@P2" in e["text"] for e in rpcs)


def test_string_comparison_is_case_insensitive_like_the_default_collation(reader: Any) -> None:
    row = reader.cursor().execute("SELECT last_name FROM Customer WHERE first_name = 'EMILY'")
    assert tuple(row.fetchone()) == ("Davis",)


def test_expressions_functions_and_catalog_views(reader: Any) -> None:
    cursor = reader.cursor()
    row = cursor.execute(
        "SELECT USER_NAME(), DB_NAME(), first_name + ' ' + last_name AS full "
        "FROM dbo.Customer WHERE customer_id = 2"
    ).fetchone()
    assert tuple(row) == ("SP-AZURESQL-USER", "mydb", "Jane Smith")
    assert [d[0] for d in cursor.description] == ["", "", "full"]
    users = cursor.execute(
        "SELECT name, type, type_desc FROM sys.database_principals "
        "WHERE type_desc = 'EXTERNAL_USER'"
    ).fetchall()
    assert ("SP-AZURESQL-USER", "E", "EXTERNAL_USER") in [tuple(u) for u in users]


def test_reader_cannot_write_229(reader: Any) -> None:
    with pytest.raises(pyodbc.ProgrammingError) as caught:
        reader.cursor().execute("UPDATE dbo.Customer SET active = 1 WHERE customer_id = 2")
    assert (
        "The UPDATE permission was denied on the object 'Customer', database 'mydb', schema "
        "'dbo'. (229)" in str(caught.value)
    )


def test_user_without_db_datareader_gets_229(sqlbox: SqlBox, user_without_roles: str) -> None:
    from sqlbox import ADMIN

    conn = sqlbox.connect(sqlbox.token(ADMIN))
    try:
        with pytest.raises(pyodbc.ProgrammingError) as caught:
            conn.cursor().execute("SELECT TOP (1000) * FROM [dbo].[Customer]")
        assert (
            "The SELECT permission was denied on the object 'Customer', database 'mydb', "
            "schema 'dbo'. (229)" in str(caught.value)
        )
        # Catalog views stay readable, and say who we are.
        assert conn.cursor().execute("SELECT USER_NAME()").fetchone()[0] == user_without_roles
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM dbo.Nope", "Invalid object name 'dbo.Nope'. (208)"),
        (
            "SELECT * FROM other.dbo.Customer",
            "Reference to database and/or server name in 'other.dbo.Customer' is not supported",
        ),
        ("SELECT * FROM Customer WHERE", "Incorrect syntax near"),
        ("SELECT nope FROM Customer", "Invalid column name 'nope'. (207)"),
        ("SELECT * FROM __swi_principals", "Invalid object name '__swi_principals'. (208)"),
    ],
)
def test_errors_carry_sql_server_numbers(reader: Any, sql: str, expected: str) -> None:
    with pytest.raises(pyodbc.Error) as caught:
        reader.cursor().execute(sql)
    assert expected in str(caught.value)


def test_syntax_error_is_102(reader: Any) -> None:
    with pytest.raises(pyodbc.ProgrammingError) as caught:
        reader.cursor().execute("SELECT * FROM Customer WHERE")
    assert "(102)" in str(caught.value)


def test_dml_ddl_and_transactions_as_the_admin(sqlbox: SqlBox) -> None:
    conn = sqlbox.connect(sqlbox.token(OPERATOR), autocommit=False)
    cursor = conn.cursor()
    try:
        cursor.execute(
            "CREATE TABLE Orders (order_id INT PRIMARY KEY IDENTITY, customer_id INT, "
            "amount DECIMAL(10, 2), note NVARCHAR(MAX), placed DATETIME2)"
        )
        cursor.execute(
            "INSERT INTO Orders (customer_id, amount, note, placed) VALUES "
            "(?, ?, ?, '2024-05-01 10:30:00')",
            1,
            "12.50",
            "first",
        )
        assert cursor.rowcount == 1
        conn.commit()
        cursor.execute("INSERT INTO Orders (customer_id, amount) VALUES (2, 3)")
        conn.rollback()
        rows = cursor.execute("SELECT order_id, amount, note, placed FROM Orders").fetchall()
        assert len(rows) == 1
        order_id, amount, note, placed = rows[0]
        assert (order_id, str(amount), note, placed.isoformat()) == (
            1,
            "12.50",
            "first",
            "2024-05-01T10:30:00",
        )
        cursor.execute("UPDATE Orders SET amount = amount + 1 WHERE order_id = 1")
        assert cursor.rowcount == 1
        cursor.execute("DELETE FROM Orders")
        assert cursor.rowcount == 1
        conn.commit()
    finally:
        cursor.execute("DROP TABLE IF EXISTS Orders")
        conn.commit()
        conn.close()


def test_reader_cannot_create_tables_262(reader: Any) -> None:
    with pytest.raises(pyodbc.Error) as caught:
        reader.cursor().execute("CREATE TABLE Sneaky (id INT)")
    assert "CREATE TABLE permission denied in database 'mydb'. (262)" in str(caught.value)


def test_batch_transaction_statements(sqlbox: SqlBox) -> None:
    conn = sqlbox.connect(sqlbox.token(OPERATOR), autocommit=True)
    try:
        cursor = conn.cursor()
        cursor.execute("BEGIN TRANSACTION; DELETE FROM Customer; ROLLBACK")
        assert cursor.execute("SELECT COUNT(*) FROM Customer").fetchone()[0] == 5
        with pytest.raises(pyodbc.Error) as caught:
            cursor.execute("COMMIT")
        assert "(3902)" in str(caught.value)
    finally:
        conn.close()


def test_attention_cancels_a_running_statement(sqlbox: SqlBox) -> None:
    conn = sqlbox.connect(sqlbox.token(DEMO))
    try:
        conn.timeout = 1
        cursor = conn.cursor()
        started = time.monotonic()
        with pytest.raises(pyodbc.OperationalError) as caught:
            cursor.execute("WAITFOR DELAY '00:00:10'")
        assert "Query timeout expired" in str(caught.value)
        assert time.monotonic() - started < 5
        assert conn.cursor().execute("SELECT 1").fetchone()[0] == 1  # the session survives
    finally:
        conn.close()
