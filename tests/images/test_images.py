"""Both images, built from their Dockerfiles by sandbox/images.py, start and have what they need.

Each image's archive (what a node imports) is opened with ``buildah from docker-archive:...`` and
commands run in it with ``buildah run`` (chroot isolation) as the image's own user and entrypoint
settings: the CLI's ``--help``, the ODBC driver registered and loadable, non-root, nothing of the
build machine inside. The first run builds the images (several minutes; `make test` builds them
before pytest through `make images`); later runs reuse the cached archives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import images

pytestmark = pytest.mark.timeout(3600)

DRIVER = "ODBC Driver 18 for SQL Server"
EXPECTED = {
    "sql-workload-identity-operator:0.1.0": {
        "cli": "swi-operator",
        "user": "65532:65532",
        "scripts": "swi-operator swi-workload",
    },
    "sql-workload-identity-workload:0.1.0": {
        "cli": "swi-workload",
        "user": "10001:10001",
        "scripts": "swi-workload",
    },
}


@pytest.fixture(scope="session")
def archives() -> dict[str, Path]:
    if os.geteuid() != 0 or shutil.which("buildah") is None:
        pytest.fail(
            "the image tests need root and buildah: run `make system-deps images` as root",
            pytrace=False,
        )
    return images.ensure_images(quiet=True)


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def image(request: pytest.FixtureRequest, archives: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """(ref, buildah working container opened from the ref's archive)."""
    ref: str = request.param
    proc = subprocess.run(
        ["buildah", "from", "--quiet", f"docker-archive:{archives[ref]}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    container = proc.stdout.strip()
    yield ref, container
    subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def run(container: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["buildah", "run", "--isolation", "chroot", container, "--", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def config(container: str) -> dict[str, object]:
    proc = subprocess.run(
        ["buildah", "inspect", "--type", "container", container],
        capture_output=True,
        text=True,
        check=True,
    )
    docker_config: dict[str, object] = json.loads(proc.stdout)["OCIv1"]["config"]
    return docker_config


def test_archives_carry_the_refs_the_manifests_pull(archives: dict[str, Path]) -> None:
    assert set(archives) == set(EXPECTED)
    for ref, path in archives.items():
        with tarfile.open(path) as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None
            manifest = json.load(member)
        tags = [tag for entry in manifest for tag in entry["RepoTags"]]
        # What a node's containerd resolves the manifests' short ref to (never localhost/...).
        assert tags == [f"docker.io/library/{ref}"], tags


def test_entrypoint_and_non_root_user(image: tuple[str, str]) -> None:
    ref, container = image
    cfg = config(container)
    assert cfg["Entrypoint"] == [EXPECTED[ref]["cli"]]
    assert cfg["User"] == EXPECTED[ref]["user"]
    uid = run(container, "python", "-c", "import os; print(os.getuid(), os.getgid())")
    assert uid.returncode == 0, uid.stderr
    assert uid.stdout.split() == EXPECTED[ref]["user"].split(":")


def test_cli_help_runs(image: tuple[str, str]) -> None:
    ref, container = image
    cli = EXPECTED[ref]["cli"]
    proc = run(container, cli, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_cli_version_is_the_package_version(image: tuple[str, str]) -> None:
    ref, container = image
    proc = run(container, EXPECTED[ref]["cli"], "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == images.project_version(), proc.stdout


def test_only_the_operator_image_runs_python_on_jemalloc(image: tuple[str, str]) -> None:
    """The operator's allocator (operator/swi_operator/heap.py) is loaded by its image itself,
    preloaded without a word from the loader, Python's objects on it; the workload image (a
    short-lived client) keeps Python's own."""
    ref, container = image
    probe = (
        "import os; print('libjemalloc' in open('/proc/self/maps').read(),"
        " os.environ.get('PYTHONMALLOC'))"
    )
    proc = run(container, "python", "-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert "jemalloc" not in proc.stderr, proc.stderr  # e.g. ld.so: cannot be preloaded
    operator = ref.startswith("sql-workload-identity-operator")
    expected = ["True", "malloc"] if operator else ["False", "None"]
    assert proc.stdout.split() == expected, proc.stdout


def test_every_console_script_runs(image: tuple[str, str]) -> None:
    ref, container = image
    listed = run(container, "sh", "-c", "ls /opt/swi/bin | grep '^swi-'")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == EXPECTED[ref]["scripts"].split()
    for script in listed.stdout.split():
        proc = run(container, script, "--help")
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_odbc_driver_registered_and_loadable(image: tuple[str, str]) -> None:
    _, container = image
    # Listed by unixODBC under its usual name, and the library really loads: a login to a closed
    # loopback port fails inside the driver (its own error prefix), not with "Can't open lib".
    script = (
        "import pyodbc, sys\n"
        f"assert {DRIVER!r} in pyodbc.drivers(), pyodbc.drivers()\n"
        "try:\n"
        f"    pyodbc.connect('DRIVER={{{DRIVER}}};SERVER=tcp:127.0.0.1,9;Encrypt=no', timeout=3)\n"
        "except pyodbc.Error as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    sys.exit('connected to a closed port?')\n"
    )
    proc = run(container, "python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert f"[Microsoft][{DRIVER}]" in proc.stdout, proc.stdout
    assert "Can't open lib" not in proc.stdout


def test_nothing_of_the_build_machine_or_toolchain_inside(image: tuple[str, str]) -> None:
    _, container = image
    script = (
        "import os, shutil\n"
        "paths = ['/etc/pip.conf', '/root/.config', '/run/swi-build', '/opt/swi/bin/pip', '/src',\n"
        "         '/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease']\n"
        "print([p for p in paths if os.path.exists(p)])\n"
        "print([t for t in ('gcc', 'cc', 'make', 'pip', 'pip3') if shutil.which(t)])\n"
    )
    proc = run(container, "python", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "[]"], proc.stdout
    host_bundle = images.host_ca_bundle()
    if host_bundle is not None:
        inside = run(container, "cat", "/etc/ssl/certs/ca-certificates.crt")
        assert inside.returncode == 0, inside.stderr
        assert inside.stdout != host_bundle.read_text(), "the host's CA bundle was committed"


def test_cached_archives_are_reused(archives: dict[str, Path]) -> None:
    before = {ref: path.stat().st_mtime_ns for ref, path in archives.items()}
    again = images.ensure_images(quiet=True)
    assert again == archives
    assert {ref: path.stat().st_mtime_ns for ref, path in again.items()} == before
