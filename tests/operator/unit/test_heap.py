"""Giving the C heap's free pages back (``heap.py``): after a cycle, and every 10 s so that a
burst's freed memory is not kept until the next drift cycle; and Python's objects on that heap."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from swi_operator import heap


def test_free_pages_are_given_back_on_glibc() -> None:
    assert heap.release_free_memory() is True  # the operator image's C library (Debian) is glibc


async def test_trimming_repeats_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def release() -> bool:
        nonlocal calls
        calls += 1
        return True

    async def three() -> None:
        while calls < 3:
            await asyncio.sleep(0.01)

    monkeypatch.setattr(heap, "release_free_memory", release)
    task = asyncio.create_task(heap.trim_periodically(0.01))
    await asyncio.wait_for(three(), 10)  # it repeats (no timing asserted)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_trimming_stops_where_the_c_library_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "release_free_memory", lambda: False)
    await asyncio.wait_for(heap.trim_periodically(0.01), 1)  # returns at once, no busy loop


def test_the_operator_runs_on_jemalloc_unless_told_otherwise() -> None:
    env = heap.allocator_env({"PATH": "/bin", "MALLOC_CONF": "narenas:1"})
    # A jemalloc setting of the caller's is kept; everything else it set is passed on.
    assert env == {
        "PATH": "/bin",
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": "libjemalloc.so.2",
        "MALLOC_CONF": "narenas:1",
    }
    # An allocator chosen by whoever started it means no restart.
    assert heap.allocator_env({"PYTHONMALLOC": "pymalloc"}) is None
    assert heap.allocator_env({"LD_PRELOAD": "libtcmalloc.so"}) is None


def test_a_started_operator_process_has_restarted_itself_on_jemalloc(tmp_path: Path) -> None:
    """The whole path: ``python -m swi_operator --version`` started plainly execs itself again
    on jemalloc, keeping its command line and pid (a real process, no patching; jemalloc is
    installed by ``make system-deps``)."""
    probe = tmp_path / "sitecustomize.py"
    probe.write_text(
        "import os, sys\n"
        "maps = open('/proc/self/maps').read()\n"
        "print('probe', os.getpid(), os.environ.get('PYTHONMALLOC'),"
        " 'libjemalloc' in maps, sys.orig_argv[-1], file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in heap.ALLOCATOR_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "swi_operator", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    probes = [line.split() for line in done.stderr.splitlines() if line.startswith("probe")]
    assert len(probes) == 2, done.stderr  # started, then started again
    assert probes[0][2:] == ["None", "False", "--version"]
    assert probes[1] == [probes[0][0], probes[0][1], "malloc", "True", "--version"]  # same pid
    assert done.stdout.startswith("swi-operator ")


def test_the_image_sets_the_same_allocator() -> None:
    """The image sets ``ALLOCATOR_ENV`` itself (no restart there) and installs jemalloc."""
    text = (Path(__file__).parents[3] / "operator" / "Dockerfile").read_text()
    env = dict(
        re.findall(r"^\s*(?:ENV\s+)?(PYTHONMALLOC|LD_PRELOAD|MALLOC_CONF)=(\S+)", text, re.M)
    )
    assert env == heap.ALLOCATOR_ENV
    assert re.search(r"apt-get install [^\n]*\blibjemalloc2\b", text)


def test_the_collector_leaves_start_up_objects_alone_and_runs_less_often() -> None:
    """In a process of its own: freezing the test runner's objects would change every test."""
    script = (
        "import gc, json\n"
        "import swi_operator.handlers\n"  # what the operator loads before kopf runs
        "from swi_operator import heap\n"
        "before = gc.get_threshold()\n"
        "heap.tune_collector()\n"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), gc.get_count()]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    before, after, frozen, counts = json.loads(done.stdout.splitlines()[-1])
    assert before == [700, 10, 10]
    assert tuple(after) == heap.GC_THRESHOLDS
    assert frozen > 50_000  # kopf, the SDKs and the Kubernetes models (about 90,000)
    assert counts[0] < heap.GC_THRESHOLDS[0]
