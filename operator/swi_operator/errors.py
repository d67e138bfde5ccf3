"""Every failure the operator meets, mapped to retry-or-stop and to a condition reason.

Steps raise ``TransientError`` (try again later: throttling, outages, races) or
``PermanentError`` (retrying cannot help until someone changes something: permissions, limits,
conflicts, invalid input). Both carry a CamelCase ``reason`` from ``Reason`` for the condition,
and a message that says what is wrong and what to do. ``classify`` turns the exceptions of the
SDKs (msgraph's ``ODataError``, azure-core's ``HttpResponseError``, the Kubernetes client's
``ApiException``, network errors) into one of the two, so no step string-matches an SDK error.

Who owns retries (one loop per failure, never stacked):

* Graph: kiota's RetryHandler is switched off (``max_retries=0``, see ``cloud.graph``): a 429 or
  503 reaches ``classify`` at once, with its ``Retry-After``.
* 429, Graph and ARM: ``cloud.CallGate`` owns the short ones. It holds every caller of the service
  until ``Retry-After`` has passed and repeats the throttled call (``THROTTLE_ATTEMPTS`` in all);
  a ``Retry-After`` over ``THROTTLE_WAIT_MAX_S``, or a call still throttled, goes to kopf as a
  ``TransientError``. Writes are paced to the quotas, so a 429 is the exception.
* ARM: azure-core's RetryPolicy is switched off (``retry_total=0``, see ``cloud.arm``), for the same
  reason. The one exception is the 409 "concurrent federated credential writes" answer: it means
  "someone else is writing this identity right now", so ``cloud.arm`` waits briefly and repeats
  the write itself, a bounded number of times, while holding the identity's lock.
* Azure SQL: ``swi_workload.SqlClient`` runs with one attempt (``sql``), so a 40613 or a broken
  connection reaches ``sql_error`` at once and becomes a ``TransientError``.
* Token acquisition (azure-identity) keeps its own default retries: tokens are cached and shared by
  every reconcile, so one acquisition is not a per-resource loop.
* The operator's loop is kopf's: a handler that raises ``TransientError`` is re-run after
  ``delay`` (Retry-After when the service sent one, else ``backoff_delay`` of the attempt number,
  capped). The fleet-wide drift check re-examines everything on its own interval, which is also
  what eventually clears permanent conditions once their cause is fixed.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import enum
import random
from collections.abc import Mapping
from typing import Protocol


class Reason(enum.StrEnum):
    """Condition reasons for failures. Success reasons live with the step that sets them.

    Each reason is transient or permanent (``transient``, from ``TRANSIENT_REASONS``): a
    ``TransientError`` carries a transient one, a ``PermanentError`` a permanent one (a unit test
    checks every raise in the package). The status's ``Reconciling`` and ``Stalled`` conditions
    (``conditions.progress``) are derived from the same split, which is what kstatus and Argo CD
    read.
    """

    # Transient: the operator gets further on its own (it retries, or the drift check repairs).
    THROTTLED = "Throttled"
    CLOUD_UNAVAILABLE = "CloudUnavailable"
    CONCURRENT_WRITE = "ConcurrentWrite"
    KUBERNETES_UNAVAILABLE = "KubernetesUnavailable"
    ISSUER_UNAVAILABLE = "IssuerUnavailable"
    DATABASE_UNAVAILABLE = "DatabaseUnavailable"
    DATABASE_BUSY = "DatabaseBusy"  # a lock or the statement timeout (sql.py)
    PROPAGATING = "Propagating"  # Verified: Entra does not accept the new credential yet
    # WorkloadsReady: pods without the token within the rollout grace; checked again after it.
    PODS_ROLLING = "PodsRolling"
    # Verified: the database user or its read role went away since DatabaseAccessReady checked;
    # the next reconcile (at the latest the drift check) puts them back.
    DATABASE_USER_MISSING = "DatabaseUserMissing"
    DATABASE_READ_DENIED = "DatabaseReadDenied"
    # Permanent: someone has to change something; the message says what.
    INVALID_SPEC = "InvalidSpec"
    OPERATOR_NOT_DATABASE_ADMIN = "OperatorNotDatabaseAdmin"
    DATABASE_USER_CONFLICT = "DatabaseUserConflict"
    DATABASE_ROLE_NOT_FOUND = "DatabaseRoleNotFound"
    DATABASE_REJECTED = "DatabaseRejected"
    DATABASE_HAS_DDL_TRIGGERS = "DatabaseHasDdlTriggers"
    SQL_SERVER_NOT_ALLOWED = "SqlServerNotAllowed"
    PERMISSION_DENIED = "PermissionDenied"
    IDENTITY_NOT_FOUND = "IdentityNotFound"
    TENANT_NOT_MANAGED = "TenantNotManaged"
    CREDENTIAL_LIMIT_REACHED = "CredentialLimitReached"
    POOL_NOT_FOUND = "PoolNotFound"  # spec.identity.poolName names no (valid) SqlIdentityPool
    POOL_EXHAUSTED = "PoolExhausted"  # every member of the pool has its credentials spent
    CREDENTIAL_CONFLICT = "CredentialConflict"
    CREDENTIAL_REJECTED = "CredentialRejected"
    OPERATOR_AUTHENTICATION_FAILED = "OperatorAuthenticationFailed"
    SERVICE_ACCOUNT_CONFLICT = "ServiceAccountConflict"
    KUBERNETES_REJECTED = "KubernetesRejected"
    NOT_AUTHORIZED = "NotAuthorized"
    INVALID_POLICY = "InvalidPolicy"  # a SqlIdentityPolicy the operator cannot apply
    # Verified: the probe's token exchange or login was refused for a reason a person must fix.
    NO_MATCHING_FEDERATED_CREDENTIAL = "NoMatchingFederatedCredential"
    TOKEN_AUDIENCE_REJECTED = "TokenAudienceRejected"  # noqa: S105 (a reason, not a secret)
    ISSUER_UNREACHABLE = "IssuerUnreachable"
    LOGIN_FAILED = "LoginFailed"
    # WorkloadsReady: pods past the rollout grace without the token, or a selector that leaves
    # out every workload of the service account (docs/troubleshooting.md says what to change).
    PODS_WITHOUT_TOKEN = "PodsWithoutToken"  # noqa: S105 (a reason, not a secret)
    SELECTOR_MATCHES_NOTHING = "SelectorMatchesNothing"

    @property
    def transient(self) -> bool:
        return self in TRANSIENT_REASONS


TRANSIENT_REASONS = frozenset(
    {
        Reason.THROTTLED,
        Reason.CLOUD_UNAVAILABLE,
        Reason.CONCURRENT_WRITE,
        Reason.KUBERNETES_UNAVAILABLE,
        Reason.ISSUER_UNAVAILABLE,
        Reason.DATABASE_UNAVAILABLE,
        Reason.DATABASE_BUSY,
        Reason.PROPAGATING,
        Reason.DATABASE_USER_MISSING,
        Reason.DATABASE_READ_DENIED,
        Reason.PODS_ROLLING,
    }
)


def is_transient(reason: str) -> bool:
    """Whether a condition that is not True for ``reason`` clears without a person: one of the
    transient ``Reason``s. Any other reason of a False condition (a permanent ``Reason``, or a
    step's own, such as WorkloadsReady's) waits for someone to change something."""
    return reason in TRANSIENT_REASONS


class ReconcileError(Exception):
    """A failure with a condition reason and a message for people."""

    transient: bool = False
    status: int | None = None  # the HTTP status of the API server's answer, where one was

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TransientError(ReconcileError):
    """Try again later: after ``delay`` seconds if the service said so, else with backoff."""

    transient = True

    def __init__(self, reason: Reason, message: str, delay: float | None = None) -> None:
        super().__init__(reason, message)
        self.delay = delay


class PermanentError(ReconcileError):
    """Retrying cannot help until the spec, a permission or the cloud state changes."""


class NotAuthorizedError(PermanentError):
    """No SqlIdentityPolicy allows the resource. Besides stopping, the pipeline takes back what the
    later steps had granted (a policy that stops allowing a resource revokes its access)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.NOT_AUTHORIZED, message)


# Entra's 20-credential limit: Graph and ARM word it differently (and the exact wording is not
# documented), so match the stable parts of both.
_LIMIT_MARKERS = ("limit", "maximum", "exceed", "at most 20")
_DUPLICATE_MARKERS = ("must be unique", "already exists")
GRAPH = "Microsoft Graph"
ARM = "Azure Resource Manager"
_CONCURRENT_CODE = "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity"


def backoff_delay(
    attempt: int, cap: float, base: float = 2.0, rng: random.Random | None = None
) -> float:
    """Exponential backoff for the ``attempt``-th retry (0-based), jittered, at most ``cap``."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return (rng or random).uniform(ceiling / 2, ceiling)


def retry_after_seconds(
    headers: Mapping[str, str] | None, now: dt.datetime | None = None
) -> float | None:
    """The wait a response asks for: ``retry-after-ms``/``x-ms-retry-after-ms`` or ``Retry-After``
    (seconds or an HTTP date). None if absent or unreadable."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        if name in lowered:
            try:
                return max(0.0, float(lowered[name]) / 1000)
            except ValueError:
                pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def from_http(
    status: int | None,
    code: str,
    text: str,
    headers: Mapping[str, str] | None,
    doing: str,
    service: str,
) -> ReconcileError:
    """Map one HTTP failure of Graph or ARM. ``doing`` completes "failed to ..."."""
    what = f"{service} answered {status} {code}: {text}".strip().rstrip(":")
    lowered = text.lower()
    if status == 429:
        wait = retry_after_seconds(headers)
        return TransientError(
            Reason.THROTTLED, f"{service} is throttling requests while trying to {doing}", wait
        )
    if status is None or status >= 500 or status == 408:
        return TransientError(
            Reason.CLOUD_UNAVAILABLE,
            f"{service} is unavailable while trying to {doing} ({what})",
            retry_after_seconds(headers),
        )
    if status == 409 and code == _CONCURRENT_CODE:
        return TransientError(
            Reason.CONCURRENT_WRITE, f"another writer is changing the identity ({what})", 2.0
        )
    if status in (401, 403):
        fix = (
            "make the operator's app an owner of the app registration "
            "(it has Application.ReadWrite.OwnedBy)"
            if service == GRAPH
            else "grant the operator's identity Managed Identity Contributor on the identity"
        )
        return PermanentError(
            Reason.PERMISSION_DENIED, f"the operator is not allowed to {doing} ({what}); {fix}"
        )
    if status == 404:
        return PermanentError(
            Reason.IDENTITY_NOT_FOUND, f"not found while trying to {doing} ({what})"
        )
    if any(marker in lowered for marker in _DUPLICATE_MARKERS):
        # Someone created the same issuer+subject between our read and our write: re-read soon
        # and adopt it.
        return TransientError(
            Reason.CONCURRENT_WRITE, f"a matching credential appeared ({what})", 1.0
        )
    if status in (400, 409) and any(marker in lowered for marker in _LIMIT_MARKERS):
        return PermanentError(
            Reason.CREDENTIAL_LIMIT_REACHED,
            f"the identity has reached Entra's limit of 20 federated credentials ({what}); "
            "remove unused credentials from it",
        )
    return PermanentError(Reason.CREDENTIAL_REJECTED, f"failed to {doing}: {what}")


def classify(exc: BaseException, doing: str) -> ReconcileError:
    """Turn an exception from a Graph or ARM call into a ``ReconcileError``; re-raise others
    (a bug is not a condition). Kubernetes failures are mapped by ``kube`` itself."""
    if isinstance(exc, ReconcileError):
        return exc
    # Imported here: the SDKs are heavy, and errors.py is imported by the pure-logic tests.
    import aiohttp
    import httpx
    from azure.core import exceptions as azure_exc
    from msgraph.generated.models.o_data_errors.o_data_error import ODataError

    if isinstance(exc, ODataError):
        err = exc.error
        return from_http(
            exc.response_status_code,
            (err.code if err else None) or "",
            (err.message if err else None) or exc.message or "",
            exc.response_headers,
            doing,
            GRAPH,
        )
    if isinstance(exc, azure_exc.ClientAuthenticationError) and exc.status_code in (None, 400, 401):
        # From the operator's own credential (token endpoint), not from ARM's authorisation.
        return operator_authentication_error(exc, doing)
    if isinstance(exc, azure_exc.HttpResponseError):
        headers = dict(getattr(exc.response, "headers", None) or {})
        code = (exc.error.code if exc.error else None) or ""
        text = (exc.error.message if exc.error else None) or exc.reason or ""
        return from_http(exc.status_code, code, text, headers, doing, ARM)
    if isinstance(exc, (azure_exc.ServiceRequestError, azure_exc.ServiceResponseError)):
        return TransientError(Reason.CLOUD_UNAVAILABLE, f"cannot reach Azure to {doing}: {exc}")
    # aiohttp's own errors: under httpx (httpx-aiohttp) those it does not map to httpx's.
    if isinstance(exc, httpx.TransportError | aiohttp.ClientError | OSError | TimeoutError):
        return TransientError(
            Reason.CLOUD_UNAVAILABLE, f"network error while trying to {doing}: {exc}"
        )
    raise exc


def operator_authentication_error(exc: Exception, doing: str) -> ReconcileError:
    """The operator's own credential failed. AADSTS errors are configuration; others transient."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "AADSTS" in str(exc):
        return PermanentError(
            Reason.OPERATOR_AUTHENTICATION_FAILED,
            f"the operator could not authenticate to Entra to {doing}: {text}; check its client "
            "id, secret or federated credential",
        )
    return TransientError(
        Reason.CLOUD_UNAVAILABLE, f"token request failed while trying to {doing}: {text}"
    )


def kubernetes_error(status: int | None, text: str, doing: str) -> ReconcileError:
    failed = _kubernetes_error(status, text, doing)
    failed.status = status
    return failed


def _kubernetes_error(status: int | None, text: str, doing: str) -> ReconcileError:
    if status == 403:
        return PermanentError(
            Reason.PERMISSION_DENIED,
            f"the API server refused to {doing} (403: {text}); if RBAC denied it, compare the "
            "operator's ClusterRole in deploy/",
        )
    if status in (400, 422):
        return PermanentError(
            Reason.KUBERNETES_REJECTED, f"the API server refused to {doing}: {text}"
        )
    # 409 (a concurrent update), 429, 5xx: retry soon.
    delay = 1.0 if status == 409 else None
    return TransientError(
        Reason.KUBERNETES_UNAVAILABLE, f"the API server failed to {doing} ({status} {text})", delay
    )


class SqlFailureInfo(Protocol):
    """What decides the fate of an ODBC error (``swi_workload.errors.SqlFailure`` has it)."""

    @property
    def number(self) -> int | None: ...

    @property
    def message(self) -> str: ...

    @property
    def transient(self) -> bool: ...

    @property
    def unreachable(self) -> bool: ...

    @property
    def sqlstate(self) -> str: ...


def sql_error(failure: SqlFailureInfo, where: str, doing: str, operator: str) -> ReconcileError:
    """Map a failure of the operator's own SQL session (``where``: "database 'd' on server s",
    ``operator``: how to name the operator's identity in the fix).

    Azure SQL's transient numbers and broken connections are retried (kopf's backoff); a login
    refused for the operator's token (18456) or a statement refused for lack of rights (15247,
    15151 on an existing principal, 229, 262) mean the operator is not the server's Entra admin:
    permanent, with the fix in the message.
    """
    what = f"{failure.message} ({failure.number})" if failure.number else failure.message
    if failure.number == LOCK_TIMEOUT_ERROR or failure.sqlstate in QUERY_TIMEOUT_SQLSTATES:
        return TransientError(
            Reason.DATABASE_BUSY,
            f"{where} did not let the operator {doing} in time ({what}): another session holds "
            "a lock it needs (an open transaction in that database), or the statement ran past "
            "the operator's timeout (--sql-lock-timeout, --sql-statement-timeout); retrying",
        )
    if failure.transient or failure.unreachable:
        return TransientError(
            Reason.DATABASE_UNAVAILABLE,
            f"{where} is unavailable while trying to {doing}: {what}",
        )
    if failure.number == 18456 and "Token is expired" in failure.message:
        return TransientError(
            Reason.DATABASE_UNAVAILABLE, f"{where} refused an expired token: {what}", 1.0
        )
    if failure.number == 18456 and "not currently configured to accept" in failure.message:
        return PermanentError(
            Reason.OPERATOR_AUTHENTICATION_FAILED,
            f"{where} does not accept the operator's token ({what}): the server's Entra admin "
            f"must be in the operator's tenant; check that {operator} and the server belong to "
            "the same tenant",
        )
    if failure.number in _SQL_DENIED:
        return PermanentError(
            Reason.OPERATOR_NOT_DATABASE_ADMIN,
            f"the operator may not {doing} in {where} ({what}); add {operator} to the group "
            "that is the server's Microsoft Entra admin (az ad group member add --group <group> "
            "--member-id <its service principal object id>), or, on a server without an Entra "
            "admin, make a group with it in the admin (az sql server ad-admin create "
            "--display-name <group> --object-id <group object id>; a server has one admin, and "
            "this replaces it), or give it a user in the database with db_owner (or "
            "db_accessadmin and db_securityadmin)",
        )
    return PermanentError(Reason.DATABASE_REJECTED, f"failed to {doing} in {where}: {what}")


LOCK_TIMEOUT_ERROR = 1222  # "Lock request time out period exceeded." (SET LOCK_TIMEOUT)
QUERY_TIMEOUT_SQLSTATES = frozenset({"HYT00"})  # the driver's query timeout expired

# Login failed (no user for the operator's token), CREATE USER refused, "does not exist or you do
# not have permission" (asked only about principals just seen to exist), SELECT/CREATE denied.
_SQL_DENIED = frozenset({18456, 15247, 15151, 229, 262})
