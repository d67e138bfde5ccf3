"""What can go wrong between a pod and its rows, as exceptions a person can act on.

Every failure of the chain (projected token -> Entra token exchange -> TDS login -> query) has its
own exception class and its own process exit code, and its message says what to change, not only
what happened. ``classify_sql_error`` maps the ODBC driver's errors onto them by SQL error number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# SQL error numbers worth a retry with backoff (Azure SQL's documented transient errors).
TRANSIENT_SQL_ERRORS = frozenset({926, 4060, 40197, 40501, 40613, 49918, 49919, 49920, 4221, 615})
# ODBC SQLSTATEs of a connection that could not be made or broke (TCP, TLS, timeouts).
UNREACHABLE_SQLSTATES = frozenset({"08001", "08S01", "HYT00", "HYT01"})


class WorkloadError(Exception):
    """Base class: ``exit_code`` is what ``python -m swi_workload`` exits with."""

    exit_code = 1
    reason = "Error"


class ConfigurationError(WorkloadError):
    exit_code = 2
    reason = "Misconfigured"


class NotFederatedError(WorkloadError):
    """No projected service-account token: the webhook did not (or could not) federate the pod."""

    exit_code = 3
    reason = "NotFederated"


class NoMatchingFederatedCredentialError(WorkloadError):
    """AADSTS70021: Entra has no federated credential for this token's issuer/subject/audience."""

    exit_code = 4
    reason = "NoMatchingFederatedCredential"


class TokenServiceError(WorkloadError):
    """Any other failure to get an access token (5xx and 429 only after the retries)."""

    exit_code = 5
    reason = "TokenServiceError"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DatabaseUserMissingError(WorkloadError):
    """18456 with a valid token: the database has no contained user for this identity."""

    exit_code = 6
    reason = "DatabaseUserMissing"


class TokenRejectedError(WorkloadError):
    """18456 for the token itself: expired, or for another audience or tenant."""

    exit_code = 7
    reason = "TokenRejected"


class PermissionDeniedError(WorkloadError):
    """229: the user exists but lacks a role (db_datareader for reading)."""

    exit_code = 8
    reason = "PermissionDenied"


class ServerUnreachableError(WorkloadError):
    exit_code = 9
    reason = "ServerUnreachable"


class DatabaseUnavailableError(WorkloadError):
    """Transient SQL errors (40613, ...) that outlasted every retry."""

    exit_code = 10
    reason = "DatabaseUnavailable"


class QueryError(WorkloadError):
    """The query itself failed (syntax, missing object, ...)."""

    exit_code = 11
    reason = "QueryFailed"


EXIT_CODES = {
    cls.reason: cls.exit_code
    for cls in (
        WorkloadError,
        ConfigurationError,
        NotFederatedError,
        NoMatchingFederatedCredentialError,
        TokenServiceError,
        DatabaseUserMissingError,
        TokenRejectedError,
        PermissionDeniedError,
        ServerUnreachableError,
        DatabaseUnavailableError,
        QueryError,
    )
}

_NUMBER = re.compile(r"\((\d+)\)\s*(?:\(SQL\w+\))?\s*$")


@dataclass(frozen=True)
class SqlFailure:
    """An ODBC error reduced to what decides what to do with it."""

    sqlstate: str
    number: int | None
    message: str

    @property
    def transient(self) -> bool:
        return self.number in TRANSIENT_SQL_ERRORS

    @property
    def unreachable(self) -> bool:
        # 08S01 is a broken link whatever the native number (a reset mid-login carries the
        # socket's: "TCP Provider: Error code 0x2746 (10054)").
        if self.sqlstate == "08S01":
            return True
        return self.number in (None, 0) and self.sqlstate in UNREACHABLE_SQLSTATES


def parse_odbc_error(exc: Exception) -> SqlFailure:
    """SQLSTATE, native error number and text of a ``pyodbc.Error``.

    pyodbc puts ``(sqlstate, "[state] [Microsoft][ODBC Driver 18 ...][SQL Server]text (number)
    (SQLDriverConnect)")`` in ``args``; several diagnostics are joined with ``; ``.
    """
    args: tuple[Any, ...] = tuple(getattr(exc, "args", ()))
    sqlstate = str(args[0]) if args else ""
    message = str(args[1]) if len(args) > 1 else str(exc)
    first = message.split("; [", 1)[0]
    match = _NUMBER.search(first)
    number = int(match.group(1)) if match else None
    text = re.sub(r"^(\[[^\]]*\]\s*)+", "", first)
    text = _NUMBER.sub("", text).strip()
    return SqlFailure(sqlstate, number, text)
