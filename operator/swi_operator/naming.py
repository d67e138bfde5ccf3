"""Names the operator derives: federated credential names, subjects and ownership descriptions.

A federated credential is identified by (identity, issuer, subject). The subject comes only from
``metadata.namespace`` and ``spec.serviceAccountName``, never from user free text, so a resource
cannot claim another namespace's service account. The credential name is a pure function of
(issuer, namespace, service account): a restarted operator derives the same name and finds the
credential it may have created just before it died. The issuer's short hash keeps the names of
several clusters federating the same identity apart (azwi's naming habit), and the description
says which operator, cluster issuer and resource own the credential, for people and for the
ownership check.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

CREDENTIAL_NAME_MAX = 120
_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{2,119}$")
_PREFIX = "swi-"
_HASH_LEN = 8
_DESCRIPTION_MAX = 600

OPERATOR_NAME = "sql-workload-identity-operator"


def subject_for(namespace: str, service_account: str) -> str:
    """The ``sub`` claim of the service account's tokens, as the API server mints them."""
    return f"system:serviceaccount:{namespace}:{service_account}"


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def credential_name(issuer: str, namespace: str, service_account: str) -> str:
    """Deterministic, valid and unique per (issuer, namespace, service account).

    ``swi-<namespace>_<service account>-<issuer hash>``. A namespace (DNS label) has no ``_`` or
    ``.``, so the first ``_`` separates it from the service account, whose dots become ``_``:
    distinct pairs give distinct names. Names over 120 characters keep a readable prefix and gain a
    hash of the full subject, so truncation does not merge two subjects.
    """
    body = f"{namespace}_{service_account.replace('.', '_')}"
    suffix = f"-{short_hash(issuer)}"
    name = f"{_PREFIX}{body}{suffix}"
    if len(name) <= CREDENTIAL_NAME_MAX:
        return name
    subject_hash = f"-{short_hash(subject_for(namespace, service_account))}"
    room = CREDENTIAL_NAME_MAX - len(_PREFIX) - len(subject_hash) - len(suffix)
    return f"{_PREFIX}{body[:room].rstrip('_-')}{subject_hash}{suffix}"


def is_valid_credential_name(name: str) -> bool:
    return bool(_CREDENTIAL_NAME.fullmatch(name))


@dataclass(frozen=True)
class Owner:
    """The resource a credential belongs to, as its description names it."""

    namespace: str
    name: str


def credential_description(issuer: str, owner: Owner) -> str:
    text = (
        f"Managed by {OPERATOR_NAME} for SqlWorkloadIdentity {owner.namespace}/{owner.name} "
        f"on the cluster with issuer {issuer}. Edits are reverted; delete the resource instead."
    )
    return text[:_DESCRIPTION_MAX]
