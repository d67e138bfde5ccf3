"""CLI tools the tests need, built from their Go modules and cached like the control plane.

Each tool is a folder here with its pinned Go module (go.mod, go.sum) and a ``build.sh OUTDIR``
that builds it into OUTDIR. ``go_tool(folder, binary)`` runs that script once, into
``~/.cache/swi-sandbox/<folder>-<hash of the folder's sources>/``, and returns the binary's path;
later calls find it there. A cold build takes a few minutes on 2 cores.

* ``helm_binary()``: helm, for ``helm lint``/``helm template`` of the chart (``helm/``).
* ``gitops_health_binary()``: ``gitops-health`` (``gitops-health/``), which reads a resource's
  health as kstatus (Flux) and an Argo CD Lua health check do; ``kstatus(obj)`` and
  ``argocd_health(obj)`` run it (the latter with the script deploy/argocd/ ships).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sandbox.gobuild import SandboxError, cached_build, source_hash

TOOLS = Path(__file__).resolve().parent
HELM_SRC = TOOLS / "helm"
GITOPS_HEALTH_SRC = TOOLS / "gitops-health"
# The Argo CD health checks we ship (a patch for Argo CD's argocd-cm ConfigMap).
ARGOCD_HEALTH = TOOLS.parents[1] / "deploy" / "argocd" / "argocd-cm-health.yaml"


def tool_source_hash(src: Path) -> str:
    return source_hash(p for p in src.iterdir() if p.is_file())


def go_tool(src: Path, binary: str) -> Path:
    """The cached ``binary`` built by ``src/build.sh`` from the pinned sources, built first if
    needed. A failed build raises ``SandboxError`` in one line (naming the module for one the
    proxy refused)."""
    out = cached_build(
        what=f"{binary} (for the tests)",
        src_dir=src,
        cache_name=f"{src.name}-{tool_source_hash(src)}",
        outputs=(binary,),
        quiet=True,
    )
    return out / binary


def helm_source_hash() -> str:
    return tool_source_hash(HELM_SRC)


def helm_binary() -> Path:
    """The cached helm CLI for the pinned version, built first if needed."""
    return go_tool(HELM_SRC, "helm")


def gitops_health_binary() -> Path:
    """The cached gitops-health helper (kstatus and Argo CD's Lua), built first if needed."""
    return go_tool(GITOPS_HEALTH_SRC, "gitops-health")


def _gitops_health(args: list[str], obj: Mapping[str, Any]) -> tuple[str, str]:
    proc = subprocess.run(
        [str(gitops_health_binary()), *args],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SandboxError(f"gitops-health {args[0]} failed: {proc.stderr.strip()}")
    verdict = json.loads(proc.stdout)
    return str(verdict["status"]), str(verdict["message"])


def kstatus(obj: Mapping[str, Any]) -> tuple[str, str]:
    """kstatus's status (Current, InProgress, Failed, ...) and message for the object ``obj``."""
    return _gitops_health(["kstatus"], obj)


def argocd_health(obj: Mapping[str, Any], config: Path = ARGOCD_HEALTH) -> tuple[str, str]:
    """The health status (Healthy, Progressing, Degraded, ...) and message Argo CD gives ``obj``
    with the argocd-cm patch ``config``: the script under the key Argo CD looks up for the
    object's kind (``resource.customizations.health.<group>_<Kind>``)."""
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    key = f"resource.customizations.health.{group}_{obj.get('kind')}"
    script = (yaml.safe_load(config.read_text()).get("data") or {}).get(key)
    if not isinstance(script, str):
        raise SandboxError(f"{config} has no {key}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "health.lua"
        path.write_text(script)
        return _gitops_health(["argocd", str(path)], obj)
