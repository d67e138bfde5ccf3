"""deploy/ and the chart against the sandbox: rendering, installing, and acting as the operator.

Shared by tests/deploy and tests/injection (whose conftest puts this folder on ``sys.path``).
``install_generic`` applies deploy/overlays/generic for real (idempotent: ``kubectl apply``), so
the RBAC and the MutatingWebhookConfiguration the tests use are the shipped ones.
``operator_kubeconfig`` writes a kubeconfig holding a TokenRequest token of the deployed
ServiceAccount: whatever runs with it runs as the operator would in its pod.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from sandbox.tools import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "sql-workload-identity-operator"
NAMESPACE = "sql-workload-identity-system"
OPERATOR = "sql-workload-identity-operator"
OPERATOR_PODS = "app.kubernetes.io/name=sql-workload-identity-operator"
CONFIGURATION = "sql-workload-identity-operator-injection"
POLICY_CONFIGURATION = "sql-workload-identity-operator-policy"
WORKLOAD_CONFIGURATION = "sql-workload-identity-operator-workloads"
KUBE_VERSION = "1.36.3"


def run(argv: list[str], *, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def kubectl(
    sandbox: Any, *args: str, kubeconfig: str | Path | None = None, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return run(
        [str(sandbox.kubectl), f"--kubeconfig={kubeconfig or sandbox.kubeconfig}", *args],
        check=check,
        **kw,
    )


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def render_kustomize(sandbox: Any, path: Path) -> list[dict[str, Any]]:
    return documents(kubectl(sandbox, "kustomize", str(path)).stdout)


def render_helm(*values_files: str, set_values: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    argv = [
        str(helm_binary()),
        "template",
        "swi",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        "--include-crds",
    ]
    for values in values_files:
        argv += ["-f", str(CHART / "ci" / values)]
    for item in set_values:
        argv += ["--set", item]
    return documents(run(argv).stdout)


def ensure_namespace(sandbox: Any, name: str = NAMESPACE) -> None:
    if kubectl(sandbox, "get", "namespace", name, check=False).returncode != 0:
        kubectl(sandbox, "create", "namespace", name)


def install_generic(sandbox: Any, policy_webhook: bool = False) -> None:
    """deploy/overlays/generic, applied for real, its Deployment scaled to zero: the tests run the
    operator as a process of their own under the deployed ServiceAccount, and a pod of the image on
    the sandbox's node would be a second operator (writing the webhook certificate, reconciling).

    Its ValidatingWebhookConfiguration (the SqlIdentityPolicy check, failurePolicy Fail) would
    refuse every SqlWorkloadIdentity while nothing serves it, so it is removed again unless
    ``policy_webhook`` (a test that runs the operator with its webhook)."""
    ensure_namespace(sandbox)
    # A webhook run by an earlier test pointed the configuration at a loopback URL (a sandbox-only
    # mode); the manifest's service reference cannot be merged into that, so start it afresh.
    kubectl(sandbox, "delete", "mutatingwebhookconfiguration", CONFIGURATION, "--ignore-not-found")
    remove_workload_webhook_configuration(sandbox)
    kubectl(
        sandbox,
        "delete",
        "validatingwebhookconfiguration",
        POLICY_CONFIGURATION,
        "--ignore-not-found",
    )
    # The CRDs first: the base holds a ClusterKopfPeering, which needs its CRD established.
    kubectl(sandbox, "apply", "--server-side", "--force-conflicts", "-k", str(REPO / "crds"))
    kubectl(
        sandbox,
        "wait",
        "--for=condition=Established",
        "crd/sqlworkloadidentities.sqlidentity.io",
        "crd/clusterkopfpeerings.kopf.dev",
        "crd/sqlidentitypolicies.sqlidentity.io",
        "crd/sqlidentitypools.sqlidentity.io",
        "--timeout=60s",
    )
    kubectl(
        sandbox,
        "apply",
        "--server-side",
        "--force-conflicts",
        "-k",
        str(REPO / "deploy/overlays/generic"),
    )
    kubectl(sandbox, "scale", "deployment", OPERATOR, "-n", NAMESPACE, "--replicas=0")
    deadline = time.monotonic() + 120
    while kubectl(
        sandbox, "get", "pods", "-n", NAMESPACE, "-o", "name", f"--selector={OPERATOR_PODS}"
    ).stdout.strip():
        assert time.monotonic() < deadline, "the deployed operator's pods did not go away"
        time.sleep(0.5)
    if not policy_webhook:
        remove_policy_webhook_configuration(sandbox)


def remove_webhook_configuration(sandbox: Any) -> None:
    """Leave no webhook configuration behind: with failurePolicy Fail and nothing serving it,
    every later test's labelled pod (or SqlWorkloadIdentity) would be refused."""
    kubectl(sandbox, "delete", "mutatingwebhookconfiguration", CONFIGURATION, "--ignore-not-found")
    remove_workload_webhook_configuration(sandbox)
    remove_policy_webhook_configuration(sandbox)


def remove_workload_webhook_configuration(sandbox: Any) -> None:
    """The workload labelling webhook's (failurePolicy Ignore: left behind it would only make
    every later workload create wait for a connection that is refused)."""
    kubectl(
        sandbox,
        "delete",
        "mutatingwebhookconfiguration",
        WORKLOAD_CONFIGURATION,
        "--ignore-not-found",
    )


def remove_policy_webhook_configuration(sandbox: Any) -> None:
    kubectl(
        sandbox,
        "delete",
        "validatingwebhookconfiguration",
        POLICY_CONFIGURATION,
        "--ignore-not-found",
    )


def service_account_token(kube: Any, namespace: str, name: str, audience: str | None = None) -> str:
    from kubernetes import client

    spec = client.V1TokenRequestSpec(
        audiences=[audience] if audience else [], expiration_seconds=3600
    )
    core: Any = client.CoreV1Api(kube)
    response = core.create_namespaced_service_account_token(
        name, namespace, client.AuthenticationV1TokenRequest(spec=spec)
    )
    token: str = response.status.token
    return token


def operator_kubeconfig(sandbox: Any, kube: Any, path: Path) -> Path:
    """A kubeconfig that authenticates as the deployed operator ServiceAccount."""
    admin = yaml.safe_load(Path(sandbox.kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    token = service_account_token(kube, NAMESPACE, OPERATOR)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox", "cluster": cluster}],
        "users": [{"name": OPERATOR, "user": {"token": token}}],
        "contexts": [
            {
                "name": OPERATOR,
                "context": {"cluster": "sandbox", "user": OPERATOR, "namespace": NAMESPACE},
            }
        ],
        "current-context": OPERATOR,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def wait_for(what: str, check: Any, timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
