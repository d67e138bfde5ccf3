"""The operator under Graph's read-after-write lag (the Entra emulator's ``graphReadLagSeconds``).

For several drift cycles after each write, Graph's reads do not show it: the credential the
operator just created is missing from the list, and after a delete it is still listed. The
operator must neither make a second credential nor let its condition flap, and it must not claim
to have created a credential that was already there.
"""

from __future__ import annotations

import time

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    DRIFT_INTERVAL_S,
    Cluster,
    Entra,
    World,
    eventually,
)

pytestmark = pytest.mark.controlplane

LAG_S = DRIFT_INTERVAL_S * 3  # every read of three drift cycles misses the last write


def _writes(entra: Entra, route: str) -> int:
    return int(entra.admin.requests()["counts"].get(route, 0))


def test_graph_lag_neither_duplicates_nor_flaps(
    operator, cluster: Cluster, entra: Entra, world: World
):
    entra.admin.controls(graphReadLagSeconds=LAG_S)
    spec = {
        "serviceAccountName": "lag-reader",
        "identity": {"applicationClientId": world.demo_app.client_id},
    }
    cluster.create("lag", spec)
    ready = cluster.wait_condition("lag")

    # Drift cycles run while the reads still miss the new credential, and after they catch up.
    time.sleep(LAG_S + DRIFT_INTERVAL_S * 3)
    credentials = entra.credentials(world.demo_app)
    assert len(credentials) == 1, credentials
    now = cluster.condition("lag")
    assert now is not None and now["status"] == "True"
    assert now["lastTransitionTime"] == ready["lastTransitionTime"], "Ready flapped"
    events = cluster.events("lag")
    reasons = cluster.reasons("lag")
    assert reasons.count("CredentialCreated") == 1, reasons
    assert not [e for e in events if e.type == "Warning"], [(e.reason, e.message) for e in events]

    # Settled: once the reads have caught up, a drift cycle writes nothing.
    before = _writes(entra, "graph.fic.update")
    time.sleep(DRIFT_INTERVAL_S * 2.5)
    assert _writes(entra, "graph.fic.update") == before

    # Deleting while a lagging read still lists the credential removes it exactly once.
    cluster.delete("lag")
    cluster.wait_gone("lag", timeout=LAG_S + 30)
    eventually(lambda: entra.credentials(world.demo_app) == [], LAG_S + 10, "credential deleted")
