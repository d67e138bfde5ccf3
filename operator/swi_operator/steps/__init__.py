"""The reconcile steps: one per condition, run in order by ``swi_operator.pipeline``.

A step reads what exists before it writes, writes only what differs, and reports one condition.
It raises ``errors.ReconcileError`` when it cannot finish; the pipeline then stops, records the
condition and leaves the later steps' conditions as they were. ``finalize`` undoes what the step
made, tolerating what is already gone. Steps share a ``Context``: the first step resolves the
identity and the issuer that later ones use. New capabilities are new steps (database access and
verification append theirs; the authorisation gate, ``steps.authorization``, goes first).

A step that grants access in the cloud (a federated credential, a database user) is also
``Revocable``: when the gate refuses a resource that already had access, the pipeline asks those
steps to take it back, whatever ``deletionPolicy`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from swi_operator.cloud import ResolvedIdentity
from swi_operator.conditions import Condition, Status
from swi_operator.errors import TransientError
from swi_operator.kube import ServiceAccount
from swi_operator.spec import Spec

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class ResourceRef:
    """The SqlWorkloadIdentity being reconciled."""

    namespace: str
    name: str
    uid: str
    generation: int = 0

    @property
    def display(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class Context:
    resource: ResourceRef
    spec: Spec
    status: Mapping[str, Any]  # the status as last written, to find what changed since
    operator_tenant: str
    issuer: str = ""
    identity: ResolvedIdentity | None = None
    events: list[Event] = field(default_factory=list)
    # Set by the policy gate: the policies allow database work where DDL triggers exist.
    allow_ddl_triggers: bool = False
    # The service account as the federated credential step read it in this pass (None: it does
    # not exist), so that the service account step does not read it again; unset: not read yet.
    service_account: ServiceAccount | None = None
    service_account_read: bool = False

    def record(self, reason: str, message: str, type_: EventType = "Normal") -> None:
        self.events.append(Event(type_, reason, message))

    def require_identity(self) -> ResolvedIdentity:
        if self.identity is None:
            raise RuntimeError("the identity is resolved by the federated credential step first")
        return self.identity


@dataclass(frozen=True)
class StepResult:
    status: Status
    reason: str
    message: str
    fields: Mapping[str, Any] = field(default_factory=dict)  # status fields the step owns
    # Run the pipeline again later, the condition standing meanwhile: for a state that resolves
    # itself, such as a new federated credential Entra does not accept yet.
    retry: TransientError | None = None

    def condition(self, type_: str) -> Condition:
        return Condition(type_, self.status, self.reason, self.message)


class Step(Protocol):
    condition: str

    async def reconcile(self, ctx: Context) -> StepResult: ...

    async def finalize(self, ctx: Context) -> None: ...


@runtime_checkable
class Revocable(Protocol):
    def holds_grant(self, status: Mapping[str, Any]) -> bool:
        """Whether the status records access this step granted (no call: a pure check)."""
        ...

    async def revoke(self, ctx: Context) -> StepResult:
        """Take the access back; the result's message says what was removed, its fields clear
        the status fields that recorded it."""
        ...
