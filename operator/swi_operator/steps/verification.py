"""Verified: the whole chain works, proven the way a pod of the service account would use it.

The probe, after every other step has done its part:

1. a TokenRequest for the service account with ``spec.audience`` (the token the kubelet projects);
2. the token exchange at Entra for the identity (what azure-identity does in the pod), for Azure
   SQL's scope;
3. with ``spec.sql``: a login to the database as the identity and ``SELECT USER_NAME()``; when
   the roles include db_datareader, also a SELECT permission check on a dbo table
   (``SELECT TOP (0) *``: column metadata, no rows).

Each failure has a reason a person can act on, its message carrying Entra's AADSTS text or SQL's:
``Propagating`` (AADSTS70021 for a credential written less than ``--propagation-timeout`` ago:
not an error, retried with backoff), ``NoMatchingFederatedCredential``, ``TokenAudienceRejected``,
``IssuerUnreachable``, ``DatabaseUserMissing``, ``DatabaseReadDenied``, ``LoginFailed``. Outages
(Entra 5xx, SQL 40613) are ``TransientError``: they say nothing about the chain, so a condition
that was True stays True while kopf retries. Other failures are not retried by kopf: the drift
check probes again, and repairs first what it can.

When the probe runs: when Verified is not True, when the spec changed (a new generation), right
after an earlier step changed something in the same pass, and otherwise once per
``--verify-interval`` (slower than the drift checks: a probe costs a token and a login).
``status.verification`` keeps when the last probe ran, and since when Entra has been answering
AADSTS70021.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from swi_workload.settings import SQL_SCOPE
from swi_workload.tokens import unverified_claims

from swi_operator import conditions, metrics
from swi_operator.cloud.exchange import ExchangeRejected, TokenExchange
from swi_operator.errors import Reason, ReconcileError, TransientError
from swi_operator.sql import Database, SqlFailed, SqlTarget
from swi_operator.steps import Context, StepResult

PROBE_TOKEN_SECONDS = 600  # the shortest token a TokenRequest may ask for
VERIFIED = "Verified"
# Its failure reasons are errors.Reason members, so that they are classified transient or
# permanent with the others (conditions.progress reads that).
PROPAGATING = Reason.PROPAGATING
NO_MATCHING_FEDERATED_CREDENTIAL = Reason.NO_MATCHING_FEDERATED_CREDENTIAL
TOKEN_AUDIENCE_REJECTED = Reason.TOKEN_AUDIENCE_REJECTED
ISSUER_UNREACHABLE = Reason.ISSUER_UNREACHABLE
DATABASE_USER_MISSING = Reason.DATABASE_USER_MISSING
DATABASE_READ_DENIED = Reason.DATABASE_READ_DENIED
LOGIN_FAILED = Reason.LOGIN_FAILED

# AADSTS codes (shared/docs/entra.md).
_NOT_PROPAGATED = 70021  # no credential matches: also what a credential not yet propagated gives
_ISSUER_MISMATCH = 700211
_SUBJECT_MISMATCH = frozenset({700213, 7002138})
_AUDIENCE_MISMATCH = 700212
_ISSUER_UNREACHABLE = frozenset({90061, 50166})
# Events of earlier steps in the same pass that change what the probe would see.
_CREDENTIAL_WRITTEN = frozenset({"CredentialCreated", "CredentialUpdated"})


class TokenRequester(Protocol):
    async def request_token(
        self, namespace: str, service_account: str, audience: str, expiration_seconds: int
    ) -> str: ...


def _rfc3339(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _fields(ctx: Context, record: Mapping[str, Any]) -> dict[str, Any]:
    """``status.verification``: a key dropped since the last write is written as None (a merge
    patch keeps keys it does not mention)."""
    before = ctx.status.get("verification") or {}
    gone = {key: None for key in before if key not in record}
    return {"verification": {**record, **gone}} if gone else {"verification": dict(record)}


def _audience(claims: Mapping[str, Any]) -> str:
    aud = claims.get("aud")
    return ", ".join(map(str, aud)) if isinstance(aud, list) else str(aud)


class VerificationStep:
    condition = VERIFIED

    def __init__(
        self,
        tokens: TokenRequester,
        exchange: TokenExchange,
        database: Database,
        *,
        interval: float,
        propagation_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = tokens
        self._exchange = exchange
        self._db = database
        self._interval = interval
        self._propagation_timeout = propagation_timeout
        self._clock = clock

    def _previous(self, ctx: Context) -> Mapping[str, Any] | None:
        found = [c for c in ctx.status.get("conditions") or [] if c.get("type") == self.condition]
        return found[0] if found else None

    def _due(self, ctx: Context, previous: Mapping[str, Any] | None, now: float) -> bool:
        if previous is None or conditions.parse(previous).status != "True":
            return True
        if previous.get("observedGeneration") != ctx.resource.generation:
            return True
        if any(event.type == "Normal" for event in ctx.events):
            return True  # an earlier step changed something just now
        last = _parse_time((ctx.status.get("verification") or {}).get("lastProbeTime"))
        return last is None or now - last >= self._interval

    async def reconcile(self, ctx: Context) -> StepResult:
        now = self._clock()
        previous = self._previous(ctx)
        record: dict[str, Any] = dict(ctx.status.get("verification") or {})
        if not self._due(ctx, previous, now):
            assert previous is not None
            kept = conditions.parse(previous)
            return StepResult(kept.status, kept.reason, kept.message, _fields(ctx, record))
        try:
            result = await self._probe(ctx, record, now, first=previous is None)
        except ReconcileError as err:  # the probe could not finish (an outage): no verdict
            metrics.VERIFIED_PROBES.labels("Unknown", str(err.reason)).inc()
            raise
        metrics.VERIFIED_PROBES.labels(result.status, result.reason).inc()
        return result

    async def _probe(
        self, ctx: Context, record: dict[str, Any], now: float, first: bool
    ) -> StepResult:
        record["lastProbeTime"] = _rfc3339(now)
        identity = ctx.require_identity()
        sa, namespace = ctx.spec.service_account_name, ctx.resource.namespace
        assertion = await self._tokens.request_token(
            namespace, sa, ctx.spec.audience, PROBE_TOKEN_SECONDS
        )
        try:
            access_token = await self._exchange.exchange(
                identity.tenant_id, identity.client_id, assertion, SQL_SCOPE
            )
        except ExchangeRejected as err:
            return self._rejected(ctx, err, unverified_claims(assertion), record, now)
        record.pop("propagatingSince", None)
        exchanged = (
            f"a token of service account {sa} was exchanged at Entra for {identity.ref.display} "
            f"({identity.name})"
        )
        sql = ctx.spec.sql
        if sql is None:
            return StepResult("True", VERIFIED, exchanged, _fields(ctx, record))
        target = SqlTarget(sql.server, sql.database)
        read_table = any(role.lower() == "db_datareader" for role in sql.roles)
        try:
            # A resource's first probe (a fleet onboarding: many resources of one identity at
            # once) may query on a session of the identity another probe logged in to moments
            # ago; every later probe, which looks for what changed, logs in itself.
            probed = await self._db.probe(target, access_token, read_table, share=first)
        except SqlFailed as err:
            reason, message = self._sql_failure(err, target, unverified_claims(access_token))
            return StepResult("False", reason, message, _fields(ctx, record))
        read = " and read a table's columns" if read_table else ""
        if probed.login_age is None:
            done = f"which logged in to {target.display} as {probed.user}, ran a query{read}"
        else:
            done = (
                f"and a session of that identity in {target.display}, logged in "
                f"{probed.login_age:.0f}s ago by another of its resources' probes, ran a query"
                f"{read} as {probed.user}"
            )
        return StepResult("True", VERIFIED, f"{exchanged}, {done}", _fields(ctx, record))

    def _rejected(
        self,
        ctx: Context,
        err: ExchangeRejected,
        claims: Mapping[str, Any],
        record: dict[str, Any],
        now: float,
    ) -> StepResult:
        identity = ctx.require_identity()
        presented = (
            f"the token has issuer {claims.get('iss')!r}, subject {claims.get('sub')!r} and "
            f"audience {_audience(claims)!r}"
        )
        entra = f"Entra: {err.summary}"
        code = err.code
        if code != _NOT_PROPAGATED:
            record.pop("propagatingSince", None)
        if code == _NOT_PROPAGATED:
            since = _parse_time(record.get("propagatingSince"))
            if since is None or any(e.reason in _CREDENTIAL_WRITTEN for e in ctx.events):
                since = now
            record["propagatingSince"] = _rfc3339(since)
            waited = now - since
            if waited < self._propagation_timeout:
                message = (
                    f"Entra does not accept the federated credential on {identity.ref.display} "
                    f"yet (written or changed {waited:.0f}s ago; it can take minutes): retrying. "
                    f"{entra}"
                )
                retry = TransientError(Reason.PROPAGATING, message)
                return StepResult("False", PROPAGATING, message, _fields(ctx, record), retry)
            reason = NO_MATCHING_FEDERATED_CREDENTIAL
            message = (
                f"Entra still finds no federated credential on {identity.ref.display} matching "
                f"the service account's token {waited:.0f}s after it was written ({presented}); "
                "check the credential's issuer, subject and audience, or raise "
                f"--propagation-timeout if the tenant is slow. {entra}"
            )
        elif code == _ISSUER_MISMATCH:
            reason = NO_MATCHING_FEDERATED_CREDENTIAL
            fix = (
                f"the operator federated issuer {ctx.issuer!r}, but the cluster's tokens carry "
                f"{claims.get('iss')!r}: fix the operator's --issuer (or leave it unset to "
                "discover it)"
                if claims.get("iss") != ctx.issuer
                else "another credential with this issuer is needed"
            )
            message = f"no federated credential has this token's issuer: {fix}. {entra}"
        elif code in _SUBJECT_MISMATCH:
            reason = NO_MATCHING_FEDERATED_CREDENTIAL
            message = (
                f"no federated credential on {identity.ref.display} has this token's subject "
                f"({presented}); the subject must match exactly, case included. {entra}"
            )
        elif code == _AUDIENCE_MISMATCH:
            reason = TOKEN_AUDIENCE_REJECTED
            message = (
                f"the federated credential on {identity.ref.display} for this issuer and subject "
                f"expects another audience ({presented}); spec.audience and the credential's "
                f"audience must be the same (the drift check restores the credential). {entra}"
            )
        elif code in _ISSUER_UNREACHABLE:
            reason = ISSUER_UNREACHABLE
            message = (
                f"Entra could not fetch the OpenID configuration or keys of the issuer "
                f"{claims.get('iss')!r}: its /.well-known/openid-configuration and JWKS must be "
                "reachable anonymously from the internet (AKS: enable the OIDC issuer; other "
                f"clusters: publish discovery and allow anonymous reads of it). {entra}"
            )
        else:
            reason = LOGIN_FAILED
            message = (
                f"Entra refused to exchange the service account's token for "
                f"{identity.ref.display} ({err.status} {err.error}). {entra}"
            )
        return StepResult("False", reason, message, _fields(ctx, record))

    @staticmethod
    def _sql_failure(
        err: SqlFailed, target: SqlTarget, claims: Mapping[str, Any]
    ) -> tuple[str, str]:
        failure = err.failure
        sql = f"SQL: {failure.message} ({failure.number})" if failure.number else failure.message
        who = f"application {claims.get('appid')} (service principal {claims.get('oid')})"
        if err.during == "query":
            if failure.number == 229:
                return DATABASE_READ_DENIED, (
                    f"{who} logged in to {target.display} but may not read a table: "
                    f"spec.sql.roles has db_datareader, so it was removed since the last check "
                    f"(the drift check adds it back). {sql}"
                )
            return LOGIN_FAILED, f"{who} logged in to {target.display}, then: {sql}"
        if failure.number == 18456 and "not currently configured to accept" in failure.message:
            return TOKEN_AUDIENCE_REJECTED, (
                f"{target.display} refused the access token Entra issued for {who} (audience "
                f"{_audience(claims)!r}, tenant {claims.get('tid')!r}): the server must be in "
                f"the identity's tenant and accept {SQL_SCOPE.removesuffix('.default')}. {sql}"
            )
        if failure.number == 18456 and "Token is expired" not in failure.message:
            return DATABASE_USER_MISSING, (
                f"{target.display} has no user for {who}: DatabaseAccessReady creates it, so it "
                f"was dropped since (the drift check creates it again). {sql}"
            )
        return LOGIN_FAILED, f"{who} could not log in to {target.display}. {sql}"

    async def finalize(self, ctx: Context) -> None:
        """A probe leaves nothing behind."""
