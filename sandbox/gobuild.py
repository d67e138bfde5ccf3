"""Build a tool from pinned Go modules once, cache it, and explain a refused module in one line.

Everything the sandbox and the tests run that is not Python (the control plane and kubectl, helm)
is built from Go modules pinned by a ``go.mod``/``go.sum`` beside a ``build.sh``. ``cached_build``
runs that script into ``~/.cache/swi-sandbox/<name>-<hash of the sources>/`` (``$XDG_CACHE_HOME``
moves it) unless a build of the same sources is there already, so only the first run is slow.

The Go module proxy may stop serving a version (it did for helm v3.21.4): ``go`` then prints a line
such as ``go: helm.sh/helm/v3@v3.21.4: reading https://…/@v/v3.21.4.info: 403 Forbidden`` somewhere
in a long log. ``cached_build`` finds that line and raises one ``SandboxError`` naming the module,
the version and the go.mod to change, instead of the last line of the log.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

# `go: MODULE@VERSION: ...: 403 Forbidden` (also 404 Not Found, 410 Gone) from the module proxy.
_REFUSED = re.compile(
    r"(?P<module>[A-Za-z0-9][\w.\-~/]*)@(?P<version>v[\w.\-+]+):.*?"
    r"(?P<status>(?:403|404|410) [A-Za-z ]+?)\s*$"
)
_TAIL_LINES = 200


class SandboxError(Exception):
    """A problem the user can act on; ``str()`` is the one-line message the CLI prints."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swi-sandbox"


def source_hash(files: Iterable[Path]) -> str:
    """A short hash of the named files' names and contents, in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def refused_module(log_lines: Iterable[str]) -> tuple[str, str, str] | None:
    """The first (module, version, HTTP status) the module proxy refused, if the log says so."""
    for line in log_lines:
        match = _REFUSED.search(line.strip())
        if match:
            return match["module"], match["version"], match["status"]
    return None


def cached_build(
    *,
    what: str,
    src_dir: Path,
    cache_name: str,
    outputs: Iterable[str],
    quiet: bool = False,
    cold_estimate: str = "a few minutes",
) -> Path:
    """The cache folder holding ``outputs``, built by ``src_dir/build.sh`` first if needed.

    ``cache_name`` already carries the hash of the sources. With ``quiet`` the build's output is
    kept back (and only its verdict reported); otherwise it streams to stderr as it runs.
    """
    out = cache_root() / cache_name
    if all((out / name).exists() for name in outputs):
        return out
    script = src_dir / "build.sh"
    if shutil.which("go") is None:
        raise SandboxError(
            f"Go toolchain not found: install Go 1.26+ (https://go.dev/doc/install), put `go` on "
            f"PATH, then run `bash {script} /tmp/out` to build {what}"
        )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.monotonic()
    if not quiet:
        print(f"building {what} into {out} (cold: {cold_estimate} on 2 cores)", file=sys.stderr)
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    with subprocess.Popen(
        ["bash", str(script), str(tmp)],
        cwd=src_dir,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            if not quiet:
                sys.stderr.write(line)
    if proc.returncode != 0:
        raise SandboxError(_failure(what, script, src_dir, tail))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if not quiet:
        print(f"built {what} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return out


def _failure(what: str, script: Path, src_dir: Path, tail: Iterable[str]) -> str:
    lines = [line.rstrip() for line in tail if line.strip()]
    refused = refused_module(lines)
    if refused:
        module, version, status = refused
        return (
            f"building {what} failed: the Go module proxy refused {module}@{version} ({status}); "
            f"pin a version it serves in {src_dir / 'go.mod'} (`go list -m -versions {module}`)"
        )
    last = lines[-1] if lines else "no output"
    return f"building {what} failed ({last}): run `bash {script} /tmp/out` to see the Go error"
