"""Build the operator and workload images from our own Dockerfiles, with no daemon and no registry.

``ensure_images()`` returns ``{image ref: docker-archive path}`` for the two images the chart,
the overlays and the README name (``sql-workload-identity-operator:<version>`` and
``sql-workload-identity-workload:<version>``), building them first unless a build of the same
inputs is cached. The flow:

1. **Cache key.** A hash of every input: the files of the build context that ``.dockerignore``
   lets through (the Dockerfiles among them; matched with docker-py's own ``.dockerignore``
   implementation, so the key covers exactly what a ``docker build`` would send), the base image
   recipe below and ``BUILD_RECIPE``. Archives live in ``~/.cache/swi-sandbox/images-<key>/``; a
   change to any input builds into a new folder, an unchanged checkout reuses it.
2. **Base image.** No container registry is reachable here, so the ``FROM`` the Dockerfiles name
   (``python:3.11-slim-bookworm``) is made locally: ``mmdebstrap`` turns Debian bookworm's own
   packages (Python 3.11, venv, CA certificates, tzdata) from the machine's configured Debian
   mirror into a root file system, with the dpkg excludes and apt clean-up of Debian's slim
   images, and ``buildah`` commits it under exactly that name. The root file system tarball is
   cached (``images-base-<hash>/``) so that a wiped buildah storage does not re-download it.
3. **Images.** ``buildah bud --isolation chroot --pull-never`` builds each Dockerfile unchanged
   with the repository root as its context, as users build them. When this machine verifies TLS
   with its own CA bundle (PyPI is only trusted through it here), the build gets that bundle and
   a ``pip.conf`` naming it as read-only build-time mounts: mounts are not committed, so nothing
   of this machine ends up in an image, and no Dockerfile carries the workaround.
4. **Archives.** ``buildah push`` writes each image as a docker archive whose tag is the image
   ref, ready for ``ctr images import`` on a node.

Every failure is a ``SandboxError`` with one line that says what was missing (root, buildah,
the Debian mirror, PyPI) or which build step failed and where its full log is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from docker.utils.build import exclude_paths  # type: ignore[import-untyped]

from sandbox.gobuild import SandboxError, cache_root
from sandbox.launcher import REPO_ROOT

# The FROM of both Dockerfiles, as buildah normalises it.
BASE_REF = "docker.io/library/python:3.11-slim-bookworm"
# On the local base image: the recipe it was made from (a changed recipe makes it again).
BASE_ANNOTATION = "io.swi-sandbox.base-recipe"
# Bumped when the way images are built (not their inputs) changes, to invalidate the cache.
BUILD_RECIPE = "buildah bud --isolation chroot --pull-never --layers=false; CA under /root; v2"
PYPI_PROBE_URL = "https://pypi.org/simple/pip/"
MIRROR_ENV = "SWI_DEBIAN_MIRROR"
SECURITY_MIRROR_ENV = "SWI_DEBIAN_SECURITY_MIRROR"
BUILD_TIMEOUT_S = 3600.0
PROBE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ImageSpec:
    """One image: its ref (what manifests name) and its Dockerfile, relative to the repo root."""

    name: str
    dockerfile: str

    def ref(self, version: str) -> str:
        return f"{self.name}:{version}"

    def archive_name(self, version: str) -> str:
        return f"{self.name}_{version}.tar"


OPERATOR = ImageSpec("sql-workload-identity-operator", "operator/Dockerfile")
WORKLOAD = ImageSpec("sql-workload-identity-workload", "workload/Dockerfile")
IMAGES = (OPERATOR, WORKLOAD)


@dataclass(frozen=True)
class BaseRecipe:
    """What the local stand-in for ``python:3.11-slim-bookworm`` is made of.

    The subset of the official image our Dockerfiles use: Debian bookworm's Python 3.11 with
    ``venv`` (``python`` on PATH), CA certificates, netbase, tzdata, UTF-8 locale; Debian slim's
    dpkg path excludes (no man pages, docs or translations) and apt's post-install clean-up.
    """

    suite: str = "bookworm"
    packages: tuple[str, ...] = (
        "python3",
        "python3-venv",
        "python-is-python3",
        "ca-certificates",
        "netbase",
        "tzdata",
    )
    dpkg_excludes: tuple[str, ...] = (
        "path-exclude=/usr/share/man/*",
        "path-exclude=/usr/share/info/*",
        "path-exclude=/usr/share/locale/*",
        "path-exclude=/usr/share/doc/*",
        "path-include=/usr/share/doc/*/copyright",
    )
    env: tuple[str, ...] = ("LANG=C.UTF-8",)

    def sources(self, mirror: str, security_mirror: str) -> list[str]:
        return [
            f"deb {mirror} {self.suite} main",
            f"deb {mirror} {self.suite}-updates main",
            f"deb {security_mirror} {self.suite}-security main",
        ]

    def describe(self, mirror: str, security_mirror: str) -> str:
        """Everything the base is made from, as text to hash."""
        return json.dumps(
            {
                "ref": BASE_REF,
                "suite": self.suite,
                "packages": self.packages,
                "dpkg": self.dpkg_excludes,
                "env": self.env,
                "sources": self.sources(mirror, security_mirror),
            },
            sort_keys=True,
        )


BASE = BaseRecipe()
# apt's clean-up after each install, as in Debian's container images (no .deb left in layers).
_APT_CLEAN = (
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
    'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n'
)


# --- inputs and the cache key ---------------------------------------------------------------


def project_version(root: Path = REPO_ROOT) -> str:
    """The tag of both images: the project's version (the chart's appVersion and overlays' tag)."""
    with (root / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def qualified(ref: str) -> str:
    """The full name a node's containerd (and Docker) resolve a short ref like ours to."""
    return f"docker.io/library/{ref}"


def image_refs(root: Path = REPO_ROOT) -> dict[str, ImageSpec]:
    version = project_version(root)
    return {spec.ref(version): spec for spec in IMAGES}


def context_files(root: Path = REPO_ROOT) -> list[str]:
    """The files of the build context (repo root) that ``.dockerignore`` sends, sorted."""
    ignore = root / ".dockerignore"
    if not ignore.is_file():
        raise SandboxError(f"{ignore} is missing: the image build context would be the whole tree")
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    kept: set[str] = set()
    for spec in IMAGES:
        kept |= set(exclude_paths(str(root), list(patterns), dockerfile=spec.dockerfile))
    return sorted(p for p in kept if (root / p).is_file())


def debian_mirrors() -> tuple[str, str]:
    """The Debian mirror and security mirror: the environment's, else the machine's apt config."""
    found: dict[str, str] = {}
    for uri, suites in _apt_sources():
        for suite in suites:
            found.setdefault(suite, uri.rstrip("/"))
    mirror = os.environ.get(MIRROR_ENV) or found.get(BASE.suite) or "http://deb.debian.org/debian"
    security = (
        os.environ.get(SECURITY_MIRROR_ENV)
        or found.get(f"{BASE.suite}-security")
        or "http://deb.debian.org/debian-security"
    )
    return mirror, security


def _apt_sources() -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of the machine's apt sources, one-line and deb822 formats."""
    apt = Path("/etc/apt")
    one_line = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in one_line:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and "uris" in fields:
                for uri in fields["uris"].split():
                    yield uri, fields.get("suites", "").split()


def base_key(mirror: str, security_mirror: str) -> str:
    text = BASE.describe(mirror, security_mirror)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# In the context only because pyproject.toml names it as the package's long description: its text
# changes nothing that runs, and hashing it would rebuild both images at every edit of the README.
_NOT_HASHED = frozenset({"README.md"})


def cache_key(root: Path = REPO_ROOT, *, base: str | None = None) -> str:
    """Hash of every input of both images: context files (modes too; the README's name, not its
    text), base recipe, build recipe."""
    digest = hashlib.sha256()
    digest.update(BUILD_RECIPE.encode())
    digest.update((base or base_key(*debian_mirrors())).encode())
    for ref, spec in sorted(image_refs(root).items()):
        digest.update(f"\0image {ref} {spec.dockerfile}".encode())
    for rel in context_files(root):
        path = root / rel
        executable = os.access(path, os.X_OK)
        digest.update(f"\0file {rel} {int(executable)}\0".encode())
        if str(rel) not in _NOT_HASHED:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def images_dir(root: Path = REPO_ROOT) -> Path:
    """Where the archives for the current inputs are (or will be) cached."""
    return cache_root() / f"images-{cache_key(root)}"


# --- preconditions --------------------------------------------------------------------------


def _buildah() -> list[str]:
    """buildah with a storage of the sandbox's own under its cache (``$XDG_CACHE_HOME`` moves it):
    a build never sees, or retags, images of the machine's own containers storage, and a run from
    empty caches (CI) starts from an empty store too."""
    store = cache_root() / "buildah"
    return ["buildah", "--root", str(store / "root"), "--runroot", str(store / "run")]


def _require_tools() -> None:
    if os.geteuid() != 0:
        raise SandboxError(
            "building the images needs root (buildah with chroot isolation, mmdebstrap): "
            "run `sudo make images`"
        )
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        raise SandboxError(
            f"{' and '.join(missing)} not found: run `make system-deps` as root "
            "(Debian packages buildah mmdebstrap)"
        )


def host_ca_bundle() -> Path | None:
    """The CA bundle this machine tells pip and Python to use, if it sets one."""
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    pip_conf = Path("/etc/pip.conf")
    if pip_conf.is_file():
        for line in pip_conf.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cert" and Path(value.strip()).is_file():
                return Path(value.strip())
    return None


def _probe(url: str, what: str, fix: str) -> None:
    """One GET; a failure becomes a one-line error naming what could not be reached."""
    if not url.startswith(("http://", "https://")):
        raise SandboxError(f"{what} must be an http:// or https:// URL, not {url}: {fix}")
    bundle = host_ca_bundle()
    context = ssl.create_default_context(cafile=str(bundle) if bundle else None)
    try:
        # Scheme checked above: only http(s), never file: or custom schemes.
        with urllib.request.urlopen(  # noqa: S310
            url, timeout=PROBE_TIMEOUT_S, context=context
        ) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SandboxError(f"cannot reach {what} at {url} ({reason}): {fix}") from exc


def check_debian_mirror(mirror: str) -> None:
    _probe(
        f"{mirror}/dists/{BASE.suite}/InRelease",
        "the Debian mirror",
        f"the images' base is made from its packages; set {MIRROR_ENV} to a reachable "
        f"bookworm mirror",
    )


def check_pypi() -> None:
    _probe(
        PYPI_PROBE_URL,
        "PyPI",
        "pip inside the image builds installs the project's dependencies from it",
    )


# --- building -------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One image build at a time on this machine (buildah's storage and the cache are shared)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with (root / "images.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: Sequence[str], log: Path, step: str, *, stream: bool = False) -> str:
    """Run one build command, its output appended to ``log``; fail with its telling line.

    Returns its stdout, unless ``stream`` sends that to the log as it comes (long builds).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run(
            list(argv),
            stdout=out if stream else subprocess.PIPE,
            stderr=out,
            text=True,
            check=False,
            timeout=BUILD_TIMEOUT_S,
        )
        out.write(proc.stdout or "")
    if proc.returncode != 0:
        raise SandboxError(f"{step} failed ({_telling_line(log)}); full log: {log}")
    return (proc.stdout or "").strip()


def _telling_line(log: Path) -> str:
    """The line of a failed build's log that says why: the last error line, else the last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        lowered = line.lower()
        if "error" in lowered or "could not" in lowered or "failed" in lowered:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _image_annotation(ref: str, key: str) -> str | None:
    proc = subprocess.run(
        [
            *_buildah(),
            "inspect",
            "--type",
            "image",
            "--format",
            "{{index .ImageAnnotations " + json.dumps(key) + "}}",
            ref,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_base(*, quiet: bool = False) -> str:
    """Make ``BASE_REF`` in buildah's storage from Debian packages unless the same recipe is there.

    Returns the base recipe's key.
    """
    mirror, security = debian_mirrors()
    key = base_key(mirror, security)
    if _image_annotation(BASE_REF, BASE_ANNOTATION) == key:
        return key
    cache = cache_root() / f"images-base-{key}"
    rootfs = cache / "rootfs.tar"
    log = cache.with_name(cache.name + ".log")
    if not rootfs.is_file():
        check_debian_mirror(mirror)
        _say(quiet, f"making {BASE_REF} from Debian {BASE.suite} packages ({mirror})")
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        clean_hook = (
            "printf '%s' " + shlex.quote(_APT_CLEAN) + ' > "$1/etc/apt/apt.conf.d/docker-clean"'
        )
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=" + ",".join(BASE.packages),
                *(f"--dpkgopt={opt}" for opt in BASE.dpkg_excludes),
                f"--customize-hook={clean_hook}",
                '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
                BASE.suite,
                str(partial / "rootfs.tar"),
                *BASE.sources(mirror, security),
            ],
            log,
            f"mmdebstrap ({BASE.suite} from {mirror})",
            stream=True,
        )
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
    container = _run([*_buildah(), "from", "--quiet", "scratch"], log, "buildah from scratch")
    try:
        _run([*_buildah(), "add", "--quiet", container, str(rootfs), "/"], log, "buildah add")
        config = [*_buildah(), "config", "--annotation", f"{BASE_ANNOTATION}={key}"]
        for env in (
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            *BASE.env,
        ):
            config += ["--env", env]
        _run([*config, "--cmd", "python3", container], log, "buildah config")
        _run([*_buildah(), "commit", "--quiet", "--rm", container, BASE_REF], log, "buildah commit")
    except SandboxError:
        subprocess.run([*_buildah(), "rm", container], capture_output=True, check=False)
        raise
    return key


def _build_mounts(workdir: Path) -> list[str]:
    """The host CA bundle and a pip config naming it, as a read-only build-time volume, if needed.

    The volume is mounted over ``/root``, pip's home in the build stages, which exists in the base
    image: a mount target that does not exist would be created in the image and committed as an
    empty placeholder (``/etc/pip.conf`` would stay behind as an empty file). A mount over an
    existing directory leaves the image's own ``/root`` untouched.
    """
    bundle = host_ca_bundle()
    if bundle is None:
        return []
    pip_dir = workdir / "root" / ".config" / "pip"
    pip_dir.mkdir(parents=True)
    shutil.copyfile(bundle, pip_dir / "ca-certificates.crt")
    (pip_dir / "pip.conf").write_text("[global]\ncert = /root/.config/pip/ca-certificates.crt\n")
    return ["-v", f"{workdir / 'root'}:/root:ro"]


def _archives(root: Path) -> dict[str, Path]:
    version = project_version(root)
    out = images_dir(root)
    return {ref: out / spec.archive_name(version) for ref, spec in image_refs(root).items()}


def cached_images(root: Path = REPO_ROOT) -> dict[str, Path] | None:
    """Image ref -> docker archive of both images if this input set is built, else None
    (nothing is built: the node loads what `make images` made)."""
    wanted = _archives(root)
    return wanted if all(path.is_file() for path in wanted.values()) else None


def ensure_images(*, quiet: bool = False, root: Path = REPO_ROOT) -> dict[str, Path]:
    """Image ref -> docker archive of both images, built unless this input set is cached."""
    refs = image_refs(root)
    version = project_version(root)
    out = images_dir(root)
    wanted = _archives(root)
    if all(path.is_file() for path in wanted.values()):
        return wanted
    _require_tools()
    with _build_lock():
        if all(path.is_file() for path in wanted.values()):  # built while we waited
            return wanted
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        log = partial / "build.log"
        timings: dict[str, float] = {}
        started = time.monotonic()
        ensure_base(quiet=quiet)
        timings["base"] = time.monotonic() - started
        check_pypi()
        sizes: dict[str, int] = {}
        with tempfile.TemporaryDirectory(prefix="swi-image-build-") as tmp:
            mounts = _build_mounts(Path(tmp))
            for ref, spec in refs.items():
                step_start = time.monotonic()
                _say(quiet, f"building {ref} from {spec.dockerfile} (log: {log})")
                archive = partial / spec.archive_name(version)
                _build_one(root, spec, ref, archive, mounts, log)
                # Uncompressed layers: what `docker images` shows and a node stores.
                sizes[ref] = archive.stat().st_size
                timings[ref] = time.monotonic() - step_start
        (partial / "build.json").write_text(
            json.dumps({"sizes": sizes, "seconds": timings}, indent=2, sort_keys=True) + "\n"
        )
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
        _say(
            quiet,
            "built "
            + ", ".join(f"{ref} ({sizes[ref] / 1e6:.0f} MB)" for ref in refs)
            + f" in {time.monotonic() - started:.0f}s",
        )
    return wanted


def _image_id(name: str) -> str | None:
    proc = subprocess.run(
        [*_buildah(), "inspect", "--type", "image", "--format", "{{.FromImageID}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _build_one(
    root: Path, spec: ImageSpec, ref: str, archive: Path, mounts: list[str], log: Path
) -> None:
    """``buildah bud`` one Dockerfile as users build it, then write its docker archive."""
    name = qualified(ref)
    previous = _image_id(name)
    _run(
        [
            *_buildah(),
            "bud",
            "--isolation",
            "chroot",
            "--pull-never",
            "--layers=false",
            *mounts,
            "-f",
            str(root / spec.dockerfile),
            "-t",
            name,
            str(root),
        ],
        log,
        f"building {ref} ({spec.dockerfile})",
        stream=True,
    )
    _run(
        [*_buildah(), "push", "--quiet", name, f"docker-archive:{archive}:{name}"],
        log,
        f"writing {ref} to {archive}",
    )
    if previous and previous != _image_id(name):
        # The build of older inputs, now untagged: its archive is in the cache if still wanted.
        subprocess.run([*_buildah(), "rmi", previous], capture_output=True, check=False)
