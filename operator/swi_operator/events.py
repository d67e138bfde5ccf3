"""Kubernetes Events for what the pipeline did and what went wrong.

kopf's own event poster only works inside its per-object handler tasks, and the drift loop runs
outside them, so the operator posts core/v1 Events itself, the same way from both places. Posting
is best effort: a failure to post is logged, never a reconcile failure. ``--posting-level`` drops
Normal events (WARNING) or everything (ERROR).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from swi_operator.errors import ReconcileError
from swi_operator.kube import KubeClient
from swi_operator.naming import OPERATOR_NAME
from swi_operator.steps import Event

MESSAGE_MAX = 1024  # the API server refuses longer event messages

log = logging.getLogger(__name__)


class EventRecorder:
    def __init__(self, kube: KubeClient, level: int = logging.INFO) -> None:
        self._kube = kube
        self._level = level
        self._instance = socket.gethostname()

    def _wanted(self, event: Event) -> bool:
        return self._level <= (logging.WARNING if event.type == "Warning" else logging.INFO)

    async def post(self, body: Mapping[str, Any], events: Sequence[Event]) -> None:
        meta = body.get("metadata") or {}
        involved = {
            "apiVersion": str(body.get("apiVersion", "")),
            "kind": str(body.get("kind", "")),
            "namespace": str(meta.get("namespace", "")),
            "name": str(meta.get("name", "")),
            "uid": str(meta.get("uid", "")),
        }
        for event in events:
            if not self._wanted(event):
                continue
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
