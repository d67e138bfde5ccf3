"""Tools built from Go modules: a module the proxy refuses is named in one line, and builds are
cached by the hash of their sources (no Go toolchain needed: the build scripts here are stand-ins
for sandbox/*/build.sh that print what `go` prints)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import gobuild

# What `go build` printed on a machine whose module proxy had stopped serving helm v3.21.4.
REFUSED_LOG = [
    "go: downloading helm.sh/helm/v3 v3.21.4\n",
    "go: helm.sh/helm/v3@v3.21.4: reading https://proxy.golang.org/helm.sh/helm/v3/@v/"
    "v3.21.4.info: 403 Forbidden\n",
    "\tserver response: not approved\n",
]


def _script(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build.sh").write_text(f"set -eu\n{body}\n")
    return folder


def test_a_refused_module_is_found_in_go_output() -> None:
    assert gobuild.refused_module(REFUSED_LOG) == ("helm.sh/helm/v3", "v3.21.4", "403 Forbidden")
    assert gobuild.refused_module(["go: k8s.io/api@v0.36.3: 410 Gone"]) == (
        "k8s.io/api",
        "v0.36.3",
        "410 Gone",
    )
    assert gobuild.refused_module(["main.go:3:2: undefined: foo", "exit status 1"]) is None


def test_a_refused_module_fails_the_build_with_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lines = "".join(f"printf '%s\\n' {line.strip()!r} >&2\n" for line in REFUSED_LOG)
    src = _script(tmp_path / "tool", lines + "exit 1")
    with pytest.raises(gobuild.SandboxError) as err:
        gobuild.cached_build(
            what="helm", src_dir=src, cache_name="helm-x", outputs=("helm",), quiet=True
        )
    message = str(err.value)
    assert "\n" not in message
    assert "helm.sh/helm/v3@v3.21.4" in message and "403 Forbidden" in message
    assert str(src / "go.mod") in message
    assert not (tmp_path / "cache" / "swi-sandbox" / "helm-x").exists()


def test_another_failure_names_its_last_line_and_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = _script(tmp_path / "tool", "echo 'main.go:3:2: undefined: foo' >&2\nexit 1")
    with pytest.raises(gobuild.SandboxError) as err:
        gobuild.cached_build(what="x", src_dir=src, cache_name="x-1", outputs=("x",), quiet=True)
    assert "undefined: foo" in str(err.value)
    assert str(src / "build.sh") in str(err.value)


def test_a_build_is_cached_by_name_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    src = _script(tmp_path / "tool", f'echo run >> {runs}\necho built > "$1/x"')
    build = dict(what="x", src_dir=src, cache_name="x-1", outputs=("x",), quiet=True)
    first = gobuild.cached_build(**build)  # type: ignore[arg-type]
    again = gobuild.cached_build(**build)  # type: ignore[arg-type]
    assert first == again == tmp_path / "cache" / "swi-sandbox" / "x-1"
    assert (first / "x").read_text() == "built\n"
    assert runs.read_text() == "run\n"  # the second call found the cache
    assert not first.with_name("x-1.partial").exists()


def test_the_source_hash_changes_with_any_source(tmp_path):
    a, b = tmp_path / "go.mod", tmp_path / "go.sum"
    a.write_text("module x\n")
    b.write_text("")
    before = gobuild.source_hash([a, b])
    assert gobuild.source_hash([b, a]) == before
    b.write_text("x v1.0.0 h1:abc\n")
    assert gobuild.source_hash([a, b]) != before
