"""The image build's inputs without building: names, context, cache key, unreachable mirror.

Pure logic over the repository's files; no buildah, no network except a refused loopback port.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from sandbox import images
from sandbox.launcher import REPO_ROOT, SandboxError

CHART = REPO_ROOT / "charts" / "sql-workload-identity-operator"


def test_operator_ref_is_what_chart_and_overlays_pull() -> None:
    refs = images.image_refs()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    # No default repository (none is published: the user names theirs); the chart's test values
    # name the image as deploy/ does, with the chart's default tag.
    assert values["image"]["repository"] == ""
    tag = values["image"]["tag"] or chart["appVersion"]
    for ci in ("aks-values.yaml", "generic-values.yaml"):
        named = yaml.safe_load((CHART / "ci" / ci).read_text())["image"]["repository"]
        assert f"{named}:{tag}" in refs, ci
    for overlay in ("aks", "generic"):
        kustomization = yaml.safe_load(
            (REPO_ROOT / "deploy" / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        (entry,) = kustomization["images"]
        assert f"{entry['newName']}:{entry['newTag']}" in refs, overlay


def test_workload_ref_is_what_readme_builds() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    ref = images.WORKLOAD.ref(images.project_version())
    assert ref == "sql-workload-identity-workload:0.1.0"
    assert ref in images.image_refs()
    assert f"-t {ref} -f workload/Dockerfile ." in readme


def test_context_is_only_what_the_dockerfiles_copy() -> None:
    files = images.context_files()
    for wanted in (
        "pyproject.toml",
        "README.md",
        "operator/Dockerfile",
        "workload/Dockerfile",
        "deploy/images/write-odbcinst.sh",
        "workload/swi_workload/__main__.py",
        "operator/swi_operator/__main__.py",
    ):
        assert wanted in files
    for top in (".venv/", ".sandbox/", "tests/", "docs/", "bench/", "charts/", ".git/"):
        assert not any(f.startswith(top) for f in files), top
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


def _copy_context(dest: Path) -> Path:
    for rel in [*images.context_files(), ".dockerignore"]:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, target)
    return dest


def test_cache_key_follows_exactly_the_inputs(tmp_path: Path) -> None:
    root = _copy_context(tmp_path / "repo")
    key = images.cache_key(root, base="b1")
    assert images.cache_key(root, base="b1") == key

    # Files outside the context do not rebuild the images.
    (root / "docs").mkdir()
    (root / "docs" / "notes.md").write_text("x")
    cache = root / "workload" / "swi_workload" / "__pycache__"
    cache.mkdir()
    (cache / "client.cpython-311.pyc").write_bytes(b"x")
    assert images.cache_key(root, base="b1") == key
    # Nor does the README's text (it is in the context only as the long description).
    (root / "README.md").write_text("another README\n")
    assert images.cache_key(root, base="b1") == key

    # A Dockerfile, a package file, an executable bit, the base recipe: each does.
    changed = set()
    dockerfile = root / "workload" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\n# changed\n")
    changed.add(images.cache_key(root, base="b1"))
    (root / "operator" / "swi_operator" / "new.py").write_text("X = 1\n")
    changed.add(images.cache_key(root, base="b1"))
    (root / "operator" / "swi_operator" / "new.py").chmod(0o755)
    changed.add(images.cache_key(root, base="b1"))
    changed.add(images.cache_key(root, base="b2"))
    assert key not in changed
    assert len(changed) == 4


def test_base_key_follows_the_mirror() -> None:
    assert images.base_key("http://a/debian", "http://a/sec") != images.base_key(
        "http://b/debian", "http://a/sec"
    )


def test_missing_dockerignore_is_a_clear_error(tmp_path: Path) -> None:
    root = _copy_context(tmp_path / "repo")
    (root / ".dockerignore").unlink()
    with pytest.raises(SandboxError, match=r"\.dockerignore is missing"):
        images.context_files(root)


def test_unreachable_mirror_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    monkeypatch.setenv(images.MIRROR_ENV, "http://127.0.0.1:9/debian")
    mirror, _ = images.debian_mirrors()
    assert mirror == "http://127.0.0.1:9/debian"
    with pytest.raises(SandboxError) as caught:
        images.check_debian_mirror(mirror)
    message = str(caught.value)
    assert "\n" not in message
    probed = "http://127.0.0.1:9/debian/dists/bookworm/InRelease"
    assert f"cannot reach the Debian mirror at {probed}" in message
    assert images.MIRROR_ENV in message
