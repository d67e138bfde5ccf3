"""Kubernetes Events for what the pipeline did and what went wrong.

kopf's own event poster only works inside its per-object handler tasks, and the drift loop runs
outside them, so the operator posts core/v1 Events itself, the same way from both places. Posting
is best effort: a failure to post is logged, never a reconcile failure. ``--posting-level`` drops
Normal events (WARNING) or everything (ERROR).

One Event per pass for what went right: the Normal events of one reconcile (a credential created,
the service account created, a workload labelled, Ready) are posted as one, its reason ``Ready``
when the resource became Ready in that pass (else ``Reconciled``, or ``CleanedUp`` from a
deletion), its message each change as ``Reason: message`` joined by ``; ``. Onboarding a resource
posted five Events, each an etcd write as costly as the status patch that says the same
(docs/benchmarks.md); now one. Warnings stay one Event each: they are what people filter for.
``reasons`` reads the folded reasons back.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from swi_operator.errors import ReconcileError
from swi_operator.kube import KubeClient
from swi_operator.naming import OPERATOR_NAME
from swi_operator.steps import Event

MESSAGE_MAX = 1024  # the API server refuses longer event messages
READY = "Ready"
RECONCILED = "Reconciled"
CLEANED_UP = "CleanedUp"
_FOLDED = re.compile(r"(?:^|; )([A-Z][A-Za-z]+): ")

log = logging.getLogger(__name__)


def fold(events: Sequence[Event], reason: str = RECONCILED) -> list[Event]:
    """The Events to post for one pass: Warnings as they are, the Normal ones as one (if more
    than one), ``Ready`` if one of them is."""
    normal = [e for e in events if e.type != "Warning"]
    if len(normal) < 2:
        return list(events)
    folded_reason = READY if any(e.reason == READY for e in normal) else reason
    message = "; ".join(f"{e.reason}: {e.message}" for e in normal)
    return [Event("Normal", folded_reason, message), *(e for e in events if e.type == "Warning")]


def reasons(reason: str, message: str) -> list[str]:
    """What an Event says happened: its reason, or for a folded Event each change's reason."""
    if reason in (READY, RECONCILED, CLEANED_UP):
        found = _FOLDED.findall(message)
        if found and message.startswith(f"{found[0]}: "):
            return list(found)
    return [reason]


class EventRecorder:
    def __init__(self, kube: KubeClient, level: int = logging.INFO) -> None:
        self._kube = kube
        self._level = level
        self._instance = socket.gethostname()

    def _wanted(self, event: Event) -> bool:
        return self._level <= (logging.WARNING if event.type == "Warning" else logging.INFO)

    async def post(
        self, body: Mapping[str, Any], events: Sequence[Event], folded: str = RECONCILED
    ) -> None:
        """Post one pass's Events (``fold``: its Normal ones as one, ``folded`` its reason)."""
        meta = body.get("metadata") or {}
        involved = {
            "apiVersion": str(body.get("apiVersion", "")),
            "kind": str(body.get("kind", "")),
            "namespace": str(meta.get("namespace", "")),
            "name": str(meta.get("name", "")),
            "uid": str(meta.get("uid", "")),
        }
        for event in fold([e for e in events if self._wanted(e)], folded):
            try:
                await self._kube.post_event(
                    involved,
                    event.type,
                    event.reason,
                    event.message[:MESSAGE_MAX],
                    OPERATOR_NAME,
                    self._instance,
                )
            except ReconcileError as err:
                log.warning(
                    "could not post event %s for %s: %s",
                    event.reason,
                    involved["name"],
                    err.message,
                )
