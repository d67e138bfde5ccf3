"""CLI tools the tests need, built from their Go modules and cached like the control plane.

``helm_binary()`` builds ``helm`` from ``sandbox/tools/helm`` (go.mod/go.sum pin the version)
once, into ``~/.cache/swi-sandbox/helm-<hash of go.mod, go.sum and build.sh>/helm``, and returns
its path; later calls find it there. A warm Go module cache makes the build take a minute or two.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from sandbox.launcher import SandboxError, _cache_root

HELM_SRC = Path(__file__).resolve().parent / "helm"


def helm_source_hash() -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "build.sh"):
        digest.update(name.encode())
        digest.update((HELM_SRC / name).read_bytes())
    return digest.hexdigest()[:16]


def helm_binary() -> Path:
    """The cached helm CLI for the pinned version, built first if needed."""
    out = _cache_root() / f"helm-{helm_source_hash()}"
    binary = out / "helm"
    if binary.exists():
        return binary
    if shutil.which("go") is None:
        raise SandboxError("Go toolchain not found: install Go 1.26+ to build helm for the tests")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        ["bash", str(HELM_SRC / "build.sh"), str(tmp)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SandboxError(
            f"building helm failed ({tail}): run `bash {HELM_SRC / 'build.sh'} /tmp/helm`"
        )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return binary
