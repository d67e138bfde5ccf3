"""swi_workload: query Azure SQL from a federated Kubernetes pod, with no secret anywhere.

The library the companion image runs and applications can import::

    from swi_workload import Settings, SqlClient

    with SqlClient(Settings.from_env()) as db:
        for row in db.query("SELECT first_name FROM dbo.Customer WHERE active = ?", 1).rows:
            print(row)

``Settings.from_env`` reads the identity webhook's ``AZURE_*`` variables (or the seed's ``AZ_*``);
``SqlClient`` opens one connection per token, recycles it before the token expires and retries
transient failures; every failure raises a ``WorkloadError`` subclass that says what to fix.
"""

from swi_workload.client import QueryResult, SqlClient, token_struct
from swi_workload.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    DatabaseUserMissingError,
    NoMatchingFederatedCredentialError,
    NotFederatedError,
    PermissionDeniedError,
    QueryError,
    ServerUnreachableError,
    TokenRejectedError,
    TokenServiceError,
    WorkloadError,
)
from swi_workload.settings import Backoff, Settings
from swi_workload.tokens import TokenSource

__all__ = [
    "Backoff",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "DatabaseUserMissingError",
    "NoMatchingFederatedCredentialError",
    "NotFederatedError",
    "PermissionDeniedError",
    "QueryError",
    "QueryResult",
    "ServerUnreachableError",
    "Settings",
    "SqlClient",
    "TokenRejectedError",
    "TokenServiceError",
    "TokenSource",
    "WorkloadError",
    "token_struct",
]
