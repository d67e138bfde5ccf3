"""What counts as "has the injected token" for WorkloadsReady (``kube._pod``)."""

from __future__ import annotations

from typing import Any

import pytest
from swi_operator.kube import _pod

TOKEN = {"name": "AZURE_FEDERATED_TOKEN_FILE", "value": "/var/run/secrets/azure/wi/token/t"}
CLIENT = {"name": "AZURE_CLIENT_ID", "value": "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"}


def pod(*envs: list[dict[str, str]]) -> dict[str, Any]:
    containers = [{"name": f"c{i}", "env": env} for i, env in enumerate(envs)]
    return {"metadata": {"name": "p"}, "spec": {"containers": containers}}


@pytest.mark.parametrize(
    ("envs", "has_token"),
    [
        (([TOKEN, CLIENT],), True),
        (([], [CLIENT, TOKEN]), True),  # one container is enough (skip-containers)
        (([TOKEN],), False),  # injected before the client-id annotation: cannot sign in as it
        (([CLIENT], [TOKEN]), False),  # not in the same container
        (([],), False),
    ],
)
def test_the_token_counts_only_with_its_client_id(envs, has_token) -> None:
    assert _pod(pod(*envs)).has_token is has_token
