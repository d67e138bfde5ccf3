"""The operator installed on the sandbox cluster the way the README installs it on a cluster:
the Helm chart (generic profile: the chart projects the operator's token and serves the
injection webhook, as there is no AKS add-on), the image built from operator/Dockerfile, the
operator's own app registration federated with its service account (no secret anywhere).

Everything that differs from Azure is here, in one place:

* Entra is the emulator: the README's ``az ad app federated-credential create`` for the
  operator's app is a Graph call made as the world's ``sandbox-admin`` app;
* pods reach Azure's host names (login.microsoftonline.com, graph.microsoft.com,
  management.azure.com) through the sandbox proxy on the node's link (``HTTPS_PROXY``), trust
  the sandbox CA from a ConfigMap, and resolve the SQL server's Azure-style name to the host's
  end of that link (``hostAliases``): :func:`pod_additions`;
* the image is already in the node's containerd (``make images`` imports it), not in a
  registry: ``image.pullPolicy=Never``.

``python -m sandbox install`` runs :func:`install` against the running sandbox.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests
import yaml

from sandbox import images, launcher, node
from sandbox.gobuild import SandboxError

CHART = launcher.REPO_ROOT / "charts" / "sql-workload-identity-operator"
RELEASE = "sql-workload-identity-operator"
NAMESPACE = "sql-workload-identity-system"
OPERATOR_SUBJECT = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"
AUDIENCE = "api://AzureADTokenExchange"
CA_CONFIGMAP = "sandbox-ca"
CA_DIR = "/etc/sandbox-ca"
CA_FILE = f"{CA_DIR}/ca.crt"
# The operator's federated credential's name at the emulator (one per sandbox cluster).
CREDENTIAL_NAME = "sandbox-cluster"

Runner = Callable[..., str]


def _world_app(name: str) -> dict[str, Any]:
    world = yaml.safe_load(launcher.WORLD_FILE.read_text())
    app: dict[str, Any] = next(a for a in world["entra"]["applications"] if a["name"] == name)
    return app


def pod_env(env: Mapping[str, str]) -> dict[str, str]:
    """What a pod needs to reach the sandbox's Azure (nothing of it is needed on Azure)."""
    missing = [
        name
        for name in ("SANDBOX_POD_HTTPS_PROXY", "SANDBOX_POD_AZ_SERVER", "SANDBOX_SERVICE_CIDR")
        if not env.get(name)
    ]
    if missing:
        raise SandboxError(
            f"the sandbox exports no {', '.join(missing)}: start it with its node "
            "(`python -m sandbox up`, not --no-node)"
        )
    # The API server's ClusterIP (the first address of the Service range) is not Azure: direct.
    api = next(ipaddress.ip_network(env["SANDBOX_SERVICE_CIDR"]).hosts())
    return {
        "HTTPS_PROXY": env["SANDBOX_POD_HTTPS_PROXY"],
        "NO_PROXY": f"{api},kubernetes.default.svc,.svc,.cluster.local,localhost,127.0.0.1",
        # requests (azure-identity, msgraph) and OpenSSL (the ODBC driver) trust the sandbox CA.
        "REQUESTS_CA_BUNDLE": CA_FILE,
        "SSL_CERT_FILE": CA_FILE,
    }


def pod_additions(env: Mapping[str, str]) -> dict[str, Any]:
    """The pod-spec pieces (Kubernetes JSON casing) that let a pod reach the sandbox's Azure:
    ``env``, ``volumes``, ``volumeMounts`` and ``hostAliases``."""
    sql_host = env.get("SANDBOX_POD_SQL_HOST", "")
    node_host = env.get("SANDBOX_NODE_HOST_ADDRESS", "")
    if not sql_host or not node_host:
        raise SandboxError("the sandbox exports no SANDBOX_POD_SQL_HOST: is its node up?")
    return {
        "env": [{"name": k, "value": v} for k, v in pod_env(env).items()],
        "volumes": [{"name": CA_CONFIGMAP, "configMap": {"name": CA_CONFIGMAP}}],
        "volumeMounts": [{"name": CA_CONFIGMAP, "mountPath": CA_DIR, "readOnly": True}],
        "hostAliases": [{"ip": node_host, "hostnames": [sql_host]}],
    }


def chart_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The chart's values for the sandbox: the generic profile of charts/.../ci plus the pod
    additions above."""
    app = _world_app("sql-workload-identity-operator")
    extra = pod_additions(env)
    ref = next(r for r in images.image_refs() if r.startswith(f"{RELEASE}:"))
    repository, tag = ref.rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "identity": {"tenantId": app["tenant"], "clientId": app["appId"], "mode": "projected"},
        "injectionWebhook": {"enabled": True},
        "extraEnv": {
            **{e["name"]: e["value"] for e in extra["env"]},
            "SWI_CA_BUNDLE": CA_FILE,
            "AZURE_SUBSCRIPTION_ID": env.get("SANDBOX_SUBSCRIPTION_ID", ""),
            # The sandbox's demo and tests want drift seen within seconds, not minutes.
            "SWI_DRIFT_INTERVAL": "30",
        },
        "extraVolumes": extra["volumes"],
        "extraVolumeMounts": extra["volumeMounts"],
        "hostAliases": extra["hostAliases"],
    }


def _admin_graph(env: Mapping[str, str], method: str, path: str, body: Any = None) -> Any:
    admin = _world_app("sandbox-admin")
    ca = env.get("REQUESTS_CA_BUNDLE") or True
    token = requests.post(
        f"{env['AZURE_AUTHORITY_HOST'].rstrip('/')}/{admin['tenant']}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": admin["appId"],
            "client_secret": admin["secrets"][0],
            "scope": "https://graph.microsoft.com/.default",
        },
        verify=ca,
        timeout=30,
    )
    token.raise_for_status()
    return requests.request(
        method,
        f"{env['SANDBOX_GRAPH_URL']}{path}",
        json=body,
        headers={"Authorization": f"Bearer {token.json()['access_token']}"},
        verify=ca,
        timeout=30,
    )


def federate_operator(env: Mapping[str, str]) -> dict[str, Any]:
    """README step 2 at the emulator: the operator's app trusts this cluster's tokens for the
    operator's service account. Kept if it is there already (a re-install)."""
    app = _world_app("sql-workload-identity-operator")
    path = f"/applications/{app['objectId']}/federatedIdentityCredentials"
    wanted = {
        "name": CREDENTIAL_NAME,
        "issuer": env["SANDBOX_ISSUER"],
        "subject": OPERATOR_SUBJECT,
        "audiences": [AUDIENCE],
    }
    existing = _admin_graph(env, "GET", f"{path}(name='{CREDENTIAL_NAME}')")
    if existing.status_code == 200:
        found: dict[str, Any] = existing.json()
        if all(found.get(k) == v for k, v in wanted.items()):
            return found
        _admin_graph(env, "DELETE", f"{path}(name='{CREDENTIAL_NAME}')").raise_for_status()
    created = _admin_graph(env, "POST", path, wanted)
    if created.status_code != 201:
        raise SandboxError(f"federating the operator's app failed: {created.text[:500]}")
    result: dict[str, Any] = created.json()
    return result


def ca_configmap(state_dir: Path, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CA_CONFIGMAP, "namespace": namespace},
        "data": {"ca.crt": (state_dir / "ca.crt").read_text()},
    }


def _runner(env: Mapping[str, str]) -> Runner:
    def run(*argv: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            env=dict(env),
            cwd=launcher.REPO_ROOT,
            check=False,
        )
        if proc.returncode != 0:
            raise SandboxError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()[-2000:]}")
        return proc.stdout

    return run


def install(state_dir: Path, *, say: Callable[[str], None] = print) -> dict[str, str]:
    """Install (or upgrade) the operator from the chart on the running sandbox; returns the
    environment the sandbox's clients use. Prints each command as a person would type it."""
    env = {**os.environ, **launcher.environment(state_dir)}
    if images.cached_images() is None:
        raise SandboxError("the images are not built for these sources: run `make images`")
    # A sandbox started before `make images` finished has not imported them yet.
    for ref in node.import_project_images(state_dir):
        say(f"imported {ref} into the node's containerd")
    run = _runner(env)
    helm = str(_helm())

    say("# README step 2, with the emulator as Entra: the operator's app trusts its account")
    credential = federate_operator(env)
    say(f"federated credential {credential['name']}: {credential['subject']}")
    say(f"$ kubectl create namespace {NAMESPACE}")
    run("kubectl", "apply", "-f", "-", stdin=json.dumps(namespace()))
    say(f"$ kubectl -n {NAMESPACE} create configmap {CA_CONFIGMAP} --from-file=ca.crt  # sandbox")
    run("kubectl", "apply", "-f", "-", stdin=json.dumps(ca_configmap(state_dir, NAMESPACE)))
    values = state_dir / "operator-values.yaml"
    values.write_text(
        "# The chart's values on the sandbox (sandbox/install.py writes them).\n"
        + yaml.safe_dump(chart_values(env), sort_keys=False)
    )
    argv = [
        "helm", "upgrade", "--install", RELEASE, str(CHART.relative_to(launcher.REPO_ROOT)),
        "-n", NAMESPACE, "-f", str(values), "--wait", "--timeout", "5m",
    ]  # fmt: skip
    say("$ " + " ".join(argv))
    say(run(helm, *argv[1:]).strip())
    return env


def namespace() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


def _helm() -> Path:
    from sandbox.tools import helm_binary

    return helm_binary()


def with_pod_additions(
    docs: list[dict[str, Any]], env: Mapping[str, str], state_dir: Path
) -> list[dict[str, Any]]:
    """Manifests as written for Azure, made to work on the sandbox: each workload's pod template
    gets :func:`pod_additions` (and its namespace the CA ConfigMap they mount). Nothing else
    changes; used where a manifest is applied as a person would on AKS (the walkthrough e2e)."""
    extra = pod_additions(env)
    out: list[dict[str, Any]] = []
    namespaces: set[str] = set()
    for doc in docs:
        template = doc.get("spec", {}).get("template") if isinstance(doc, dict) else None
        if doc and doc.get("kind") in WORKLOAD_KINDS and isinstance(template, dict):
            spec = template.setdefault("spec", {})
            for container in spec.get("containers", []):
                container["env"] = [*container.get("env", []), *extra["env"]]
                container["volumeMounts"] = [
                    *container.get("volumeMounts", []),
                    *extra["volumeMounts"],
                ]
            spec["volumes"] = [*spec.get("volumes", []), *extra["volumes"]]
            spec["hostAliases"] = [*spec.get("hostAliases", []), *extra["hostAliases"]]
            namespaces.add(doc.get("metadata", {}).get("namespace", "default"))
        out.append(doc)
    return [ca_configmap(state_dir, ns) for ns in sorted(namespaces)] + out


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def main(argv: list[str] | None = None) -> int:
    """``python -m sandbox.install pod-additions --state-dir DIR``: a YAML stream on stdin, the
    same with :func:`with_pod_additions` applied on stdout (``| kubectl apply -f -``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m sandbox.install")
    parser.add_argument("command", choices=["pod-additions"])
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    state_dir = args.state_dir or launcher.default_state_dir()
    env = launcher.environment(state_dir)
    try:
        docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
        sys.stdout.write(yaml.safe_dump_all(with_pod_additions(docs, env, state_dir)))
    except SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
