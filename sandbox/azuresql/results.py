"""What the engine hands back to a TDS session: statement events, and T-SQL errors.

A batch produces a list of events (a finished statement with its optional result set, or a
transaction begun/committed/rolled back, which the session turns into ENVCHANGE tokens). A failing
statement raises :class:`SqlError` carrying the events produced before it, so the session can send
those and then the ERROR token, as SQL Server does. ATTENTION surfaces as :class:`Cancelled`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sandbox.azuresql import tds


class SqlError(Exception):
    """A T-SQL error as the client will see it (ERROR token)."""

    def __init__(self, number: int, message: str, *, severity: int = 16, state: int = 1) -> None:
        super().__init__(f"Msg {number}, Level {severity}, State {state}: {message}")
        self.number = number
        self.message = message
        self.severity = severity
        self.state = state
        self.events: list[Event] = []  # what the batch produced before the error


class Cancelled(Exception):
    """The client sent ATTENTION while the statement ran."""


def syntax_error(near: str) -> SqlError:
    return SqlError(102, f"Incorrect syntax near '{near}'.", severity=15)


def invalid_object(name: str) -> SqlError:
    return SqlError(208, f"Invalid object name '{name}'.")


@dataclass
class ResultSet:
    columns: list[tds.Column]
    rows: list[tuple[Any, ...]]


@dataclass
class StatementDone:
    curcmd: int
    rowcount: int | None
    result: ResultSet | None = None


@dataclass
class TransactionEvent:
    kind: int  # tds.EnvChange.BEGIN_TRAN / COMMIT_TRAN / ROLLBACK_TRAN
    descriptor: bytes


Event = StatementDone | TransactionEvent
