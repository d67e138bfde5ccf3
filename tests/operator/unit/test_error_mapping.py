"""One error module: each cloud failure becomes retry-or-stop with a condition reason."""

from __future__ import annotations

import datetime as dt
import random
from types import SimpleNamespace

import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError
from msgraph.generated.models.o_data_errors.main_error import MainError
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from swi_operator.errors import (
    PermanentError,
    Reason,
    TransientError,
    backoff_delay,
    classify,
    from_http,
    kubernetes_error,
    retry_after_seconds,
)


def graph(status: int, code: str, message: str, headers=None) -> ODataError:
    return ODataError(
        response_status_code=status,
        response_headers=headers or {},
        error=MainError(code=code, message=message),
    )


def arm(status: int, code: str, message: str, headers=None) -> HttpResponseError:
    response = SimpleNamespace(
        status_code=status, reason="", headers=headers or {}, text=lambda: ""
    )
    exc = HttpResponseError(message=message, response=response)
    exc.status_code = status
    exc.error = SimpleNamespace(code=code, message=message)  # type: ignore[assignment]
    return exc


def test_graph_429_honours_retry_after():
    err = classify(graph(429, "TooManyRequests", "slow down", {"Retry-After": "7"}), "write")
    assert isinstance(err, TransientError) and err.reason is Reason.THROTTLED and err.delay == 7


def test_5xx_is_transient_without_fixed_delay():
    err = classify(graph(503, "serviceNotAvailable", "try later"), "write")
    assert (
        isinstance(err, TransientError)
        and err.reason is Reason.CLOUD_UNAVAILABLE
        and err.delay is None
    )


def test_graph_403_is_permission_denied():
    err = classify(
        graph(
            403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
        ),
        "write x",
    )
    assert isinstance(err, PermanentError) and err.reason is Reason.PERMISSION_DENIED
    assert "Insufficient privileges" in err.message and "owner" in err.message


def test_graph_limit_message_is_the_limit():
    err = classify(
        graph(
            400,
            "Request_BadRequest",
            "The maximum number of federated identity credentials (20) for this application "
            "has been reached.",
        ),
        "write",
    )
    assert isinstance(err, PermanentError) and err.reason is Reason.CREDENTIAL_LIMIT_REACHED


def test_graph_duplicate_issuer_subject_is_a_race_to_re_read():
    err = classify(
        graph(
            400,
            "InvalidFederatedIdentityCredentialValue",
            "The combination of issuer and subject must be unique for the application.",
        ),
        "write",
    )
    assert isinstance(err, TransientError) and err.reason is Reason.CONCURRENT_WRITE


def test_graph_404_is_identity_not_found():
    err = classify(graph(404, "Request_ResourceNotFound", "gone"), "look up")
    assert isinstance(err, PermanentError) and err.reason is Reason.IDENTITY_NOT_FOUND


def test_arm_concurrent_write_is_transient():
    err = classify(
        arm(
            409, "ConcurrentFederatedIdentityCredentialsWritesForSingleManagedIdentity", "Too many"
        ),
        "write",
    )
    assert isinstance(err, TransientError) and err.reason is Reason.CONCURRENT_WRITE


def test_arm_limit_and_authorization():
    limit = classify(
        arm(
            400,
            "BadRequest",
            "The number of Federated Identity Credentials for this Managed Identity has "
            "reached the maximum of 20.",
        ),
        "write",
    )
    assert limit.reason is Reason.CREDENTIAL_LIMIT_REACHED
    denied = classify(arm(403, "AuthorizationFailed", "does not have authorization"), "write")
    assert denied.reason is Reason.PERMISSION_DENIED and not denied.transient
    throttled = classify(arm(429, "TooManyRequests", "", {"Retry-After": "2"}), "write")
    assert isinstance(throttled, TransientError)
    assert throttled.reason is Reason.THROTTLED and throttled.delay == 2


def test_operator_credential_failures():
    secret = classify(
        ClientAuthenticationError("AADSTS7000215: Invalid client secret provided."), "list"
    )
    assert secret.reason is Reason.OPERATOR_AUTHENTICATION_FAILED and not secret.transient
    flaky = classify(ClientAuthenticationError("connection reset"), "list")
    assert flaky.transient


def test_network_errors_are_transient_and_bugs_are_not_swallowed():
    assert classify(ServiceRequestError("refused"), "list").transient
    assert classify(ConnectionResetError("reset"), "list").transient
    with pytest.raises(KeyError):
        classify(KeyError("bug"), "list")


def test_other_400_is_permanent_with_the_service_text():
    err = from_http(
        400, "Request_BadRequest", "name is invalid", None, "write x", "Microsoft Graph"
    )
    assert isinstance(err, PermanentError) and err.reason is Reason.CREDENTIAL_REJECTED
    assert "name is invalid" in err.message and "write x" in err.message


def test_kubernetes_errors():
    assert kubernetes_error(403, "forbidden", "patch").reason is Reason.PERMISSION_DENIED
    assert kubernetes_error(422, "immutable", "patch").reason is Reason.KUBERNETES_REJECTED
    conflict = kubernetes_error(409, "conflict", "patch")
    assert isinstance(conflict, TransientError) and conflict.delay == 1.0
    assert kubernetes_error(None, "refused", "patch").transient


def test_retry_after_forms():
    assert retry_after_seconds({"Retry-After": "3"}) == 3
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert retry_after_seconds({"Retry-After": "Thu, 01 Jan 2026 00:00:10 GMT"}, now) == 10
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds(None) is None


def test_backoff_grows_and_is_capped():
    rng = random.Random(1)
    delays = [backoff_delay(n, cap=30, rng=rng) for n in range(10)]
    assert all(0 < d <= 30 for d in delays)
    assert delays[0] <= 2 and delays[-1] >= 15
