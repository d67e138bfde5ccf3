"""``make demo``: the seed's story told on the local sandbox, one printed step at a time.

Each step prints the command a person would type and then its output, so the demo doubles as a
walkthrough. The sandbox is started in its own state directory and stopped at the end unless
``--keep`` is given (then ``eval "$(python -m sandbox env)"`` lets you keep exploring).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sandbox import launcher

# The seed database's table (world.yaml): the workload assumes no table, the demo names this one.
SEED_QUERY = "SELECT TOP (1000) * FROM [dbo].[Customer]"

EXAMPLES = launcher.REPO_ROOT / "deploy" / "examples"
DEMO_NAMESPACE = "workload-demo"
DEMO_SERVICE_ACCOUNT = "workload-demo-service-account"
AUDIENCE = "api://AzureADTokenExchange"
# How the examples name the SQL server on Azure; the demo substitutes the sandbox's $AZ_SERVER.
AZURE_SQL_SERVER = "tcp:sandbox-sql.database.windows.net,1433"


class Demo:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env: dict[str, str] = {}
        self.step_no = 0

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

    def example_text(self, name: str) -> str:
        """An example from deploy/examples/, with the sandbox's SQL endpoint in place of Azure's."""
        text = (EXAMPLES / name).read_text()
        return text.replace(AZURE_SQL_SERVER, self.env.get("AZ_SERVER", AZURE_SQL_SERVER))

    def apply_example(self, name: str) -> str:
        """`kubectl apply` of an example; printed as the sed pipeline a person would type."""
        path = EXAMPLES / name
        text = self.example_text(name)
        shown = f"kubectl apply -f deploy/examples/{name}"
        if text != path.read_text():
            shown = (
                f'sed "s|{AZURE_SQL_SERVER}|$AZ_SERVER|" deploy/examples/{name}'
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
        if proc.returncode != 0:
            raise SystemExit(f"error: applying deploy/examples/{name} failed")
        return proc.stdout


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload))
    return claims


def run_demo(demo: Demo) -> None:
    demo.step("Start the sandbox: Kubernetes control plane, Entra ID and Azure SQL emulators")
    print("$ python -m sandbox up --operator", flush=True)
    for running in launcher.up(
        demo.state_dir, [*launcher.available_components(), launcher.OPERATOR]
    ):
        print(f"{running.component.name}: ready (pid {running.pid})", flush=True)
    demo.env = launcher.environment(demo.state_dir)
    # The demo's workload authenticates by federation only: no client secret in its environment.
    for name in ("AZ_CLIENT_SECRET", "AZURE_CLIENT_SECRET"):
        demo.env.pop(name, None)
    print('$ eval "$(python -m sandbox env)"', flush=True)

    demo.step("The cluster's service-account issuer, as Entra ID fetches it (no credentials)")
    demo.kubectl("get", "--raw", "/.well-known/openid-configuration")

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

    demo.step("The workload, as a pod of that service account: token file -> Entra -> Azure SQL")
    token = demo.kubectl(
        "create",
        "token",
        DEMO_SERVICE_ACCOUNT,
        "-n",
        DEMO_NAMESPACE,
        "--audience",
        AUDIENCE,
        "--duration",
        "1h",
        show=False,
    ).strip()
    token_file = demo.state_dir / "demo-token" / "azure-identity-token"
    token_file.parent.mkdir(exist_ok=True)
    token_file.write_text(token)
    token_file.chmod(0o600)
    claims = _claims(token)
    print(f"projected token (as the kubelet writes it): sub={claims['sub']} aud={claims['aud']}")
    demo.env.update(
        {
            "AZURE_CLIENT_ID": annotations["azure.workload.identity/client-id"],
            "AZURE_TENANT_ID": annotations["azure.workload.identity/tenant-id"],
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        }
    )
    print(
        "AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE as the webhook injects them"
    )
    demo.run(sys.executable, "-m", "swi_workload", "--query", SEED_QUERY)

    demo.step(
        "Deliberate mistakes: an identity no policy grants here, an app the operator doesn't own"
    )
    demo.apply_example("finance-not-authorized.yaml")
    demo.apply_example("payroll-not-owned.yaml")
    for name, reason in (("finance-reports", "NotAuthorized"), ("payroll", "PermissionDenied")):
        demo.run(
            "kubectl",
            "wait",
            f"--for=jsonpath={{.status.conditions[?(@.type=='Ready')].reason}}={reason}",
            f"swi/{name}",
            "-n",
            DEMO_NAMESPACE,
            "--timeout=60s",
        )
    demo.kubectl("get", "swi", "-n", DEMO_NAMESPACE)
    for name in ("finance-reports", "payroll"):
        message = demo.kubectl(
            "get",
            "swi",
            name,
            "-n",
            DEMO_NAMESPACE,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].message}",
            show=False,
        )
        print(f"why {name}: {message}", flush=True)

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
    if args.keep:
        print(
            '\nThe sandbox is still running. Explore it with: eval "$(python -m sandbox env)"\n'
            "Stop it with: python -m sandbox down",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
