"""The composition root: every long-lived client, built once at start-up and closed at shutdown.

One Azure credential (its token cache serves every call), one Graph client, ARM clients sharing
that credential, one Kubernetes ``ApiClient``; the steps, the pipeline and the drift loop over
them. kopf's start-up handler builds a ``Runtime`` and keeps it in kopf's memo.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from azure.core.credentials_async import AsyncTokenCredential
from azure.identity.aio import ClientSecretCredential, WorkloadIdentityCredential
from kubernetes import config as kube_config
from kubernetes.client import ApiClient

from swi_operator.backing import Backing
from swi_operator.cloud import CallGate, CredentialStore, IdentityRouter, Pacer
from swi_operator.cloud.applications import GraphApplications
from swi_operator.cloud.arm import ArmCredentialStore, arm_client_factory
from swi_operator.cloud.exchange import EntraTokenExchange, TokenExchange
from swi_operator.cloud.graph import GraphCredentialStore, build_graph_client
from swi_operator.cloud.principals import GraphServicePrincipals
from swi_operator.config import Config
from swi_operator.drift import DriftLoop, PeeringGate
from swi_operator.errors import ARM, GRAPH
from swi_operator.events import EventRecorder
from swi_operator.kube import KubeClient, KubernetesClient, WorkloadCaches
from swi_operator.ledger import ConfigMapLedgerStore, Ledger
from swi_operator.locks import KeyedLocks, SharedSlots
from swi_operator.metrics import TrackedSlots
from swi_operator.peers import Drain
from swi_operator.pipeline import Pipeline
from swi_operator.policy_review import NamespaceLabels, PolicyReview, PolicySpecs
from swi_operator.pool import PoolGrowth, PoolSource
from swi_operator.pool_status import PoolStatus
from swi_operator.sql import Database, OdbcDatabase
from swi_operator.steps import Step
from swi_operator.steps.authorization import AuthorizationStep, KubePolicySource
from swi_operator.steps.database import DatabaseAccessStep, OtherClusters, UserForm
from swi_operator.steps.federation import (
    FederatedClusters,
    FederatedCredentialStep,
    IssuerSource,
)
from swi_operator.steps.service_account import ServiceAccountStep
from swi_operator.steps.verification import VerificationStep
from swi_operator.steps.workloads import DEFAULT_POD_TOKEN_GRACE_S, WorkloadsStep
from swi_operator.sweep import CredentialSweep

FINALIZER = "sqlidentity.io/finalizer"


def _azure_transport_options(config: Config) -> dict[str, Any]:
    """azure-core's aiohttp transport reads SSL_CERT_FILE only when aiohttp is first imported,
    so a configured CA bundle is passed explicitly."""
    return {"connection_verify": str(config.ca_bundle)} if config.ca_bundle else {}


def build_credential(config: Config) -> AsyncTokenCredential:
    if config.client_secret:
        return ClientSecretCredential(
            config.tenant_id,
            config.client_id,
            config.client_secret,
            authority=config.authority_host,
            # MSAL validates unknown authorities against login.microsoftonline.com first,
            # which a sovereign or emulated authority cannot answer.
            disable_instance_discovery=not config.authority_is_public,
            **_azure_transport_options(config),
        )
    assert config.federated_token_file is not None
    return WorkloadIdentityCredential(
        tenant_id=config.tenant_id,
        client_id=config.client_id,
        token_file_path=str(config.federated_token_file),
        authority=config.authority_host,
        **_azure_transport_options(config),
    )


def build_kube_api() -> ApiClient:
    """In a pod: its service account; elsewhere: the current kubeconfig (KUBECONFIG)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
        return ApiClient()
    # KUBECONFIG is read now: the client library's own default is fixed when it is imported.
    api: ApiClient = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=os.environ.get("KUBECONFIG")
    )
    return api


def read_crds(directory: Path) -> list[dict[str, Any]]:
    return [
        manifest
        for path in sorted(directory.glob("*.yaml"))
        for manifest in yaml.safe_load_all(path.read_text())
        if manifest and manifest.get("kind") == "CustomResourceDefinition"
    ]


def build_pipeline(
    store: CredentialStore,
    kube: KubeClient,
    tenant_id: str,
    issuer: str | None,
    later: Sequence[Step] = (),
    gate: Step | None = None,
    pod_token_grace: float = DEFAULT_POD_TOKEN_GRACE_S,
    *,
    backing: Backing | None = None,
    identity_locks: KeyedLocks | None = None,
    operator_client_id: str | None = None,
    ledger: Ledger | None = None,
    pools: PoolSource | None = None,
    growth: PoolGrowth | None = None,
) -> Pipeline:
    """The steps in order; ``later`` ones (database access, verification) come last. The policy
    ``gate`` (``steps.authorization``) comes first; only unit tests of the others leave it out.
    ``identity_locks`` serialise credential work per identity (shared with the sweep)."""
    steps: tuple[Step, ...] = (
        *([gate] if gate is not None else []),
        FederatedCredentialStep(
            store,
            IssuerSource(kube, issuer),
            kube,
            identity_locks or KeyedLocks(),
            backing,
            operator_client_id,
            ledger,
            pools,
            growth,
        ),
        ServiceAccountStep(kube),
        WorkloadsStep(kube, pod_token_grace),
        *later,
    )
    return Pipeline(steps, tenant_id)


def build_database_steps(
    config: Config,
    kube: KubernetesClient,
    database: Database,
    exchange: TokenExchange,
    principals: GraphServicePrincipals,
    ledger: Ledger,
    elsewhere: OtherClusters | None = None,
) -> tuple[DatabaseAccessStep, VerificationStep]:
    """DatabaseAccessReady, then Verified (the probe of everything before it)."""
    form: UserForm = "object-id" if config.sql_user_form == "object-id" else "sid"
    return (
        DatabaseAccessStep(database, KeyedLocks(), form, principals, ledger, kube, elsewhere),
        VerificationStep(
            kube,
            exchange,
            database,
            interval=config.verify_interval,
            propagation_timeout=config.propagation_timeout,
        ),
    )


@dataclass
class Runtime:
    config: Config
    pipeline: Pipeline
    drift: DriftLoop
    resource_locks: KeyedLocks
    kube: KubernetesClient
    events: EventRecorder
    policies: KubePolicySource
    policy_review: PolicyReview
    sweep: CredentialSweep
    pools: PoolSource
    pool_status: PoolStatus
    _credential: AsyncTokenCredential
    _graph_http: httpx.AsyncClient
    _arm: ArmCredentialStore
    _kube_api: ApiClient
    _database: OdbcDatabase
    _exchange: EntraTokenExchange
    # kopf starts a handler for every resource at once (a thousand at a restart): past this many,
    # they wait their turn instead of queueing one call each at every service. One namespace
    # holds at most half of them: a tenant with a thousand resources leaves the others the rest.
    reconcile_slots: SharedSlots
    # Every write runs inside drain.work(); a stopping replica drains before it leaves (peers.py).
    drain: Drain
    # Namespace labels as the watch last saw them (handlers.namespace_labels_changed); the gate
    # and the policy review read them from here.
    namespace_labels: NamespaceLabels = dataclasses.field(default_factory=NamespaceLabels)
    # Policy generations as the watch last saw them (handlers.policy_changed).
    policy_specs: PolicySpecs = dataclasses.field(default_factory=PolicySpecs)
    # Pool generations as the watch last saw them (handlers.pool_changed): same rule.
    pool_specs: PolicySpecs = dataclasses.field(default_factory=PolicySpecs)

    @classmethod
    def start(
        cls, config: Config, peer_identity: str | None = None, peer_priority: int = 0
    ) -> Runtime:
        credential = build_credential(config)
        graph_client, graph_http = build_graph_client(
            credential, config.graph_url, config.graph_scope, config.ca_bundle
        )
        graph_writes = Pacer(
            config.graph_write_rate, burst=max(config.graph_write_rate, 1.0), name="graph"
        )
        graph_gate = CallGate(GRAPH, config.cloud_concurrency, writes=graph_writes)
        graph = GraphCredentialStore(graph_client, graph_gate, config.tenant_id)
        arm = ArmCredentialStore(
            arm_client_factory(
                credential, config.arm_url, config.arm_scope, _azure_transport_options(config)
            ),
            CallGate(ARM, config.cloud_concurrency),
            config.subscription_id,
            subscription_write_rate=config.arm_write_rate,
            identity_write_rate=config.arm_identity_write_rate,
        )
        kube_api = build_kube_api()
        # Workloads and pods from watch-fed caches (kube.WorkloadCaches), on a client of their own
        # (six watches hold their connections); only when serving every namespace, which is
        # what cluster-wide list and watch are granted for.
        caches = None if config.namespaces else WorkloadCaches(build_kube_api())
        if caches is not None:
            caches.start()
        kube = KubernetesClient(kube_api, caches=caches)
        database = OdbcDatabase(
            credential,
            config.client_id,
            config.sql_concurrency,
            config.allowed_sql_servers,
            lock_timeout=config.sql_lock_timeout,
            statement_timeout=config.sql_statement_timeout,
        )
        exchange = EntraTokenExchange(config.authority_host, config.ca_bundle)
        ledger = Ledger(ConfigMapLedgerStore(kube, config.ledger_namespace))
        store = IdentityRouter(graph, arm)
        issuer = IssuerSource(kube, config.issuer)
        later = build_database_steps(
            config,
            kube,
            database,
            exchange,
            GraphServicePrincipals(graph_client, graph_gate),
            ledger,
            FederatedClusters(store, issuer),
        )
        namespace_labels = NamespaceLabels()
        policies = KubePolicySource(kube, config.require_policy, watched=namespace_labels)
        pools = PoolSource(kube)
        identity_locks = KeyedLocks()
        pipeline = build_pipeline(
            store,
            kube,
            config.tenant_id,
            config.issuer,
            later,
            gate=AuthorizationStep(policies, config.require_policy),
            pod_token_grace=config.pod_token_grace,
            backing=Backing(kube, policies, config.require_policy, pools),
            identity_locks=identity_locks,
            operator_client_id=config.client_id,
            ledger=ledger,
            pools=pools,
            growth=PoolGrowth(GraphApplications(graph_client, graph_gate), kube, pools, arm),
        )
        resource_locks = KeyedLocks()
        events = EventRecorder(kube, config.posting_level)
        drain = Drain()  # a stopping replica lets its writes finish first (peers.py)
        gate = PeeringGate(kube, config.peering, peer_identity, peer_priority, drain)
        drift = DriftLoop(
            pipeline,
            kube,
            resource_locks,
            events,
            gate,
            namespaces=config.namespaces,
            interval=config.drift_interval,
            finalizer=FINALIZER,
            concurrency=config.cloud_concurrency,
        )
        policy_review = PolicyReview(
            kube,
            drift,
            gate,
            namespaces=config.namespaces,
            require_policy=config.require_policy,
            interval=config.drift_interval,
            labels=policies,
        )
        sweep = CredentialSweep(
            kube,
            store,
            issuer,
            policies,
            identity_locks,
            gate,
            namespaces=config.namespaces,
            require_policy=config.require_policy,
            interval=config.sweep_interval,
            ledger=ledger,
            users=later[0],
            pools=pools,
        )
        pool_status = PoolStatus(
            kube,
            pools,
            store,
            issuer,
            drift,
            gate,
            namespaces=config.namespaces,
            interval=config.drift_interval,
        )
        return cls(
            config,
            pipeline,
            drift,
            resource_locks,
            kube,
            events,
            policies,
            policy_review,
            sweep,
            pools,
            pool_status,
            credential,
            graph_http,
            arm,
            kube_api,
            database,
            exchange,
            SharedSlots(config.max_reconciles, slots=TrackedSlots(config.max_reconciles)),
            drain,
            namespace_labels,
        )

    async def install_crds(self, directory: Path) -> None:
        """Create or replace the CRDs in ``directory`` (development convenience)."""
        for manifest in await asyncio.to_thread(read_crds, directory):
            await self.kube.apply_crd(manifest)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._graph_http.aclose()
        with contextlib.suppress(Exception):
            await self._arm.close()
        with contextlib.suppress(Exception):
            await self._database.close()
        with contextlib.suppress(Exception):
            await self._exchange.close()
        with contextlib.suppress(Exception):
            await self._credential.close()
        with contextlib.suppress(Exception):
            await self.kube.close()
        if self.kube.caches is not None:
            await asyncio.to_thread(self.kube.caches.stop)
        self._kube_api.close()  # type: ignore[no-untyped-call]
