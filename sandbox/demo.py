"""``make demo``: the seed's story told on the local sandbox, one printed step at a time.

Each step prints the command a person would type and then its output, so the demo doubles as a
walkthrough. The sandbox is started in its own state directory and stopped at the end unless
``--keep`` is given (then ``eval "$(python -m sandbox env)"`` lets you keep exploring).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sandbox import images, install, launcher

# The seed database's table (world.yaml): the workload assumes no table, the demo names this one.
SEED_QUERY = "SELECT TOP (1000) * FROM [dbo].[Customer]"

EXAMPLES = launcher.REPO_ROOT / "deploy" / "examples"
DEMO_NAMESPACE = "workload-demo"
DEMO_SERVICE_ACCOUNT = "workload-demo-service-account"
# How the examples name the SQL server on Azure; the demo substitutes its name for pods,
# $SANDBOX_POD_AZ_SERVER (the emulator's port: the operator and the workload both run as pods).
AZURE_SQL_SERVER = "tcp:sandbox-sql.database.windows.net,1433"


class Demo:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env: dict[str, str] = {}
        self.step_no = 0
        # The SQL server's address in the examples once the sandbox is up.
        self.sql_server = AZURE_SQL_SERVER

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n=== {self.step_no}. {title}", flush=True)

    def run(self, *argv: str, show: bool = True, check: bool = True) -> str:
        print(f"$ {' '.join(argv)}", flush=True)
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, env={**os.environ, **self.env}, check=False
        )
        if show and proc.stdout:
            print(proc.stdout.rstrip(), flush=True)
        if proc.returncode != 0:
            print(proc.stderr.rstrip(), file=sys.stderr, flush=True)
            if check:
                raise SystemExit(f"error: `{' '.join(argv)}` failed (exit {proc.returncode})")
        return proc.stdout

    def kubectl(self, *args: str, show: bool = True) -> str:
        return self.run("kubectl", *args, show=show)

    def kubectl_apply(self, manifest: dict[str, Any], show: bool = True) -> None:
        proc = subprocess.run(
            ["kubectl", "apply", "-f", "-"],
            input=json.dumps(manifest),
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            check=False,
        )
        if show or proc.returncode != 0:
            print((proc.stdout or proc.stderr).rstrip(), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: applying {manifest['kind']} failed")

    def wait_for_log(self, target: str, text: str, timeout: float = 180) -> None:
        """Until ``kubectl logs TARGET`` shows TEXT (the pod prints once it has run its query)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = subprocess.run(
                ["kubectl", "-n", DEMO_NAMESPACE, "logs", target],
                capture_output=True,
                text=True,
                env={**os.environ, **self.env},
                check=False,
            )
            if text in proc.stdout:
                return
            time.sleep(2)
        raise SystemExit(f"error: `kubectl logs {target}` showed no {text!r} in {timeout:.0f}s")

    def example_text(self, name: str) -> str:
        """An example from deploy/examples/, with the sandbox's SQL endpoint in place of Azure's."""
        text = (EXAMPLES / name).read_text()
        return text.replace(AZURE_SQL_SERVER, self.sql_server)

    def apply_example(self, name: str, refused: bool = False) -> str:
        """`kubectl apply` of an example; printed as the sed pipeline a person would type.
        ``refused``: the API server must refuse it (an admission webhook's answer)."""
        path = EXAMPLES / name
        text = self.example_text(name)
        shown = f"kubectl apply -f deploy/examples/{name}"
        if text != path.read_text():
            shown = (
                f'sed "s|{AZURE_SQL_SERVER}|$SANDBOX_POD_AZ_SERVER|" deploy/examples/{name}'
                " | kubectl apply -f -"
            )
        print(f"$ {shown}", flush=True)
        proc = subprocess.run(
            ["kubectl", "apply", "-f", "-"],
            input=text,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            check=False,
        )
        print((proc.stdout or proc.stderr).rstrip(), flush=True)
        if refused and proc.returncode == 0:
            raise SystemExit(f"error: deploy/examples/{name} was admitted; it should be refused")
        if proc.returncode != 0 and not refused:
            raise SystemExit(f"error: applying deploy/examples/{name} failed")
        return proc.stdout


def workload_deployment(env: dict[str, str]) -> dict[str, Any]:
    """The README's step 9 Deployment (the seed's workload as a pod of the service account), with
    what only the sandbox needs added by :func:`sandbox.install.pod_additions`."""
    extra = install.pod_additions(env)
    ref = next(r for r in images.image_refs() if r.startswith("sql-workload-identity-workload:"))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "customer-api", "namespace": DEMO_NAMESPACE},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "customer-api"}},
            "template": {
                "metadata": {"labels": {"app": "customer-api"}},
                "spec": {
                    "serviceAccountName": DEMO_SERVICE_ACCOUNT,
                    "containers": [
                        {
                            "name": "customer-api",
                            "image": ref,
                            "imagePullPolicy": "Never",  # sandbox: the node has it, no registry
                            "args": ["serve", "--every", "60"],
                            "env": [
                                {"name": "AZ_SERVER", "value": env["SANDBOX_POD_AZ_SERVER"]},
                                {"name": "AZ_DATABASE", "value": "mydb"},
                                {"name": "AZ_QUERY", "value": SEED_QUERY},
                                *extra["env"],
                            ],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                            "readinessProbe": {
                                "httpGet": {"path": "/readyz", "port": "http"},
                                "periodSeconds": 10,
                            },
                            "volumeMounts": extra["volumeMounts"],
                        }
                    ],
                    "volumes": extra["volumes"],
                    "hostAliases": extra["hostAliases"],
                },
            },
        },
    }


def run_demo(demo: Demo) -> None:
    demo.step("Start the sandbox: Kubernetes (a control plane and a node), Entra ID, Azure SQL")
    print("$ python -m sandbox up", flush=True)
    for running in launcher.up(demo.state_dir):
        print(f"{running.component.name}: ready (pid {running.pid})", flush=True)
    demo.env = launcher.environment(demo.state_dir)
    print('$ eval "$(python -m sandbox env)"', flush=True)
    # The SQL server as pods name it (sandbox-sql.database.windows.net, on the emulator's port).
    demo.sql_server = demo.env["SANDBOX_POD_AZ_SERVER"]

    demo.step("The cluster's service-account issuer, as Entra ID fetches it (no credentials)")
    demo.kubectl("get", "--raw", "/.well-known/openid-configuration")

    demo.step("Install the operator with its Helm chart, from the image of operator/Dockerfile")
    print("$ python -m sandbox install   # README steps 2 and 5 on the sandbox:", flush=True)
    install.install(demo.state_dir, say=lambda line: print(line, flush=True))
    demo.kubectl("-n", install.NAMESPACE, "get", "deploy,pods")
    print("The operator signs in to Entra with the token the kubelet projected (no secret):")
    demo.kubectl(
        "-n", install.NAMESPACE, "get", "deploy", install.RELEASE, "-o",
        "jsonpath={range .spec.template.spec.containers[0].env[*]}{.name}={.value}{'\\n'}{end}",
    )  # fmt: skip

    demo.step("The platform team's guardrails: which namespaces may bind which identities")
    demo.apply_example("policies.yaml")
    demo.kubectl("get", "sqlidentitypolicies")

    demo.step("One resource instead of the seed's ten steps (and no manual database step)")
    print(demo.example_text("customer-reader.yaml").split("---", 1)[1].strip(), flush=True)
    demo.apply_example("customer-reader.yaml")
    demo.kubectl(
        "wait",
        "--for=condition=Ready",
        "swi/customer-reader",
        "-n",
        DEMO_NAMESPACE,
        "--timeout=180s",
    )
    demo.kubectl("get", "swi", "-A")

    demo.step("What the operator did: service account, federated credential, database user, proof")
    annotations = json.loads(
        demo.kubectl(
            "get",
            "serviceaccount",
            DEMO_SERVICE_ACCOUNT,
            "-n",
            DEMO_NAMESPACE,
            "-o",
            "jsonpath={.metadata.annotations}",
            show=False,
        )
    )
    for key in sorted(annotations):
        if key.startswith("azure.workload.identity/"):
            print(f"{key}: {annotations[key]}", flush=True)
    status = json.loads(
        demo.kubectl(
            "get",
            "swi",
            "customer-reader",
            "-n",
            DEMO_NAMESPACE,
            "-o",
            "jsonpath={.status}",
            show=False,
        )
    )
    print(f"issuer:  {status.get('issuer')}\nsubject: {status.get('subject')}", flush=True)
    print(f"federated credential: {status.get('federatedCredential', {}).get('name')}", flush=True)
    print(f"database user: {json.dumps(status.get('databaseUser'))}", flush=True)
    for condition in status.get("conditions", []):
        print(f"  {condition['type']:<26} {condition['status']:<6} {condition.get('reason', '')}")

    demo.step("The workload: a Deployment of the workload image, as the service account")
    deployment = workload_deployment(demo.env)
    print(
        "# README step 9's Deployment; on the sandbox its pod also gets HTTPS_PROXY, the sandbox"
        " CA\n# and a hostAlias for the SQL server's name (sandbox/install.py: pod_additions).",
        flush=True,
    )
    print(yaml.safe_dump(deployment, sort_keys=False).rstrip(), flush=True)
    print(
        f"$ kubectl -n {DEMO_NAMESPACE} create configmap sandbox-ca --from-file=ca.crt  # sandbox"
    )
    demo.kubectl_apply(install.ca_configmap(demo.state_dir, DEMO_NAMESPACE), show=False)
    print("$ kubectl apply -f customer-api.yaml", flush=True)
    demo.kubectl_apply(deployment)
    demo.kubectl("-n", DEMO_NAMESPACE, "rollout", "status", "deploy/customer-api", "--timeout=180s")
    print("The operator's webhooks labelled the pod template and injected the token:")
    demo.kubectl(
        "-n", DEMO_NAMESPACE, "get", "pods", "-l", "app=customer-api", "-o",
        "jsonpath={range .items[0].spec.containers[0].env[*]}{.name}={.value}{'\\n'}{end}",
    )  # fmt: skip
    demo.step("The seed's ending: the pod prints the customers")
    demo.wait_for_log("deploy/customer-api", "rows)")
    demo.kubectl("-n", DEMO_NAMESPACE, "logs", "deploy/customer-api")

    demo.step(
        "Deliberate mistakes: an identity no policy grants here, an app the operator doesn't own"
    )
    # The policy webhook refuses the first at `kubectl apply`: nothing is created.
    demo.apply_example("finance-not-authorized.yaml", refused=True)
    # The second is allowed here, but the operator does not own the app: its status says why.
    demo.apply_example("payroll-not-owned.yaml")
    demo.run(
        "kubectl",
        "wait",
        "--for=jsonpath={.status.conditions[?(@.type=='Ready')].reason}=PermissionDenied",
        "swi/payroll",
        "-n",
        DEMO_NAMESPACE,
        "--timeout=60s",
    )
    demo.kubectl("get", "swi", "-n", DEMO_NAMESPACE)
    message = demo.kubectl(
        "get",
        "swi",
        "payroll",
        "-n",
        DEMO_NAMESPACE,
        "-o",
        "jsonpath={.status.conditions[?(@.type=='Ready')].message}",
        show=False,
    )
    print(f"why payroll: {message}", flush=True)

    demo.step("Delete: the finalizer removes the credential, the annotations and the database user")
    demo.kubectl("delete", "swi", "--all", "-n", DEMO_NAMESPACE, "--wait=true", "--timeout=90s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the sandbox running at the end")
    args = parser.parse_args(argv)
    state_dir = (
        Path(tempfile.mkdtemp(prefix="swi-demo-"))
        if not args.keep
        else (launcher.default_state_dir())
    )
    demo = Demo(state_dir)
    try:
        run_demo(demo)
    except launcher.SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            demo.step("Clean up")
            print("$ python -m sandbox down", flush=True)
            print("stopped: " + ", ".join(launcher.down(state_dir)), flush=True)
            shutil.rmtree(state_dir, ignore_errors=True)
    if args.keep:
        print(
            '\nThe sandbox is still running. Explore it with: eval "$(python -m sandbox env)"\n'
            "Stop it with: python -m sandbox down",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
