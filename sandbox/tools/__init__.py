"""CLI tools the tests need, built from their Go modules and cached like the control plane.

``helm_binary()`` builds ``helm`` from ``sandbox/tools/helm`` (go.mod/go.sum pin the version)
once, into ``~/.cache/swi-sandbox/helm-<hash of go.mod, go.sum and build.sh>/helm``, and returns
its path; later calls find it there. A cold build takes a few minutes on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

from sandbox.gobuild import cached_build, source_hash

HELM_SRC = Path(__file__).resolve().parent / "helm"


def helm_source_hash() -> str:
    return source_hash(HELM_SRC / name for name in ("go.mod", "go.sum", "build.sh"))


def helm_binary() -> Path:
    """The cached helm CLI for the pinned version, built first if needed."""
    out = cached_build(
        what="helm (for the chart tests)",
        src_dir=HELM_SRC,
        cache_name=f"helm-{helm_source_hash()}",
        outputs=("helm",),
        quiet=True,
    )
    return out / "helm"
