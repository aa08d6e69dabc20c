"""No helper process is a fork of a threaded process (issue 23, finding 10: CPython gh-112275).

The hang seen on this machine (a 2-rank stage 4 stopped for good at a validation pass): rank 0 forked a
DataLoader worker while another thread held CPython's runtime head lock (``_PyRuntime.interpreters.mutex``,
taken whenever a thread state is created or deleted: any C++ thread entering Python through
``PyGILState_Ensure``). The child inherits the lock locked and, on CPython 3.11.0-3.11.7, takes it again in
``PyOS_AfterFork_Child -> _PyEval_ReInitThreads -> _PyThreadState_DeleteExcept`` before reinitialising it:
it waits forever, and its parent waits for its first batch.

Left to chance the window is narrow (with two threads starting native threads in a loop, fork-context
DataLoader starts hung after 1 to 220 starts, and once not in 300). The reproduction here makes it certain:
an ``os.register_at_fork`` hook holds the head lock across every ``os.fork`` of the process, which is
exactly the state such a fork sees. A plain ``os.fork`` then hangs every time on this Python (the control),
and the package's loader must still deliver its batches: its workers come from a fork server
(``maven_dist/data/workers.py``), so this process never forks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HANG_S = 8.0
"""A forked child that runs at all exits in well under a second; one stuck for this long is stuck for good."""
LOADER_S = 120.0
"""The loader scenario's limit: the fork server imports torch once (seconds on this loaded machine)."""


# ------------------------------------------------------------------ the injected hazard (subprocess side)


def _head_lock() -> int | None:
    """Address of ``_PyRuntime.interpreters.mutex`` (CPython 3.11's layout, checked: the two words after it
    are ``interpreters.head`` and ``interpreters.main``, both the main interpreter), or None elsewhere."""
    if sys.version_info[:2] != (3, 11):
        return None
    api = ctypes.pythonapi
    api.PyInterpreterState_Main.restype = ctypes.c_void_p
    main = api.PyInterpreterState_Main()
    try:
        runtime = ctypes.addressof(ctypes.c_void_p.in_dll(api, "_PyRuntime"))
    except ValueError:
        return None
    words = (ctypes.c_void_p * 8).from_address(runtime)
    return words[4] if words[5] == main and words[6] == main and words[4] else None


def hold_head_lock_across_forks() -> None:
    """Every os.fork of this process happens with the runtime head lock held, then the parent lets it go."""
    lock = ctypes.c_void_p(_head_lock())
    api = ctypes.pythonapi
    api.PyThread_acquire_lock.argtypes = [ctypes.c_void_p, ctypes.c_int]
    api.PyThread_release_lock.argtypes = [ctypes.c_void_p]
    os.register_at_fork(
        before=lambda: api.PyThread_acquire_lock(lock, 1),
        after_in_parent=lambda: api.PyThread_release_lock(lock),
    )


def scenario_plain_fork() -> None:
    """The control: a forked child that exits at once."""
    hold_head_lock_across_forks()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("forked child exited")


def scenario_loader() -> None:
    """The package's worker loader, 3 passes of 2 workers (a validation pass or an epoch starts each)."""
    import torch

    from maven_dist.data.loader import worker_loader

    hold_head_lock_across_forks()
    items = list(range(6))
    for _ in range(3):
        got = list(worker_loader(items, num_workers=2, seed=0))
        assert sorted(got) == items, got
    assert torch.utils.data.get_worker_info() is None
    print("loader passes done")


# ------------------------------------------------------------------ the tests (pytest side)


def run_scenario(name: str, timeout: float) -> subprocess.CompletedProcess | None:
    """Run `name` in a fresh interpreter (its own process group); None if it was still running at `timeout`
    (then the group, stuck children included, is killed)."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, __file__, name],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


needs_head_lock = pytest.mark.skipif(
    _head_lock() is None, reason="CPython 3.11's runtime layout is needed to hold its head lock"
)


@needs_head_lock
def test_a_fork_with_the_head_lock_held_hangs_on_this_python():
    """The hazard is real here: gh-112275 is fixed in 3.11.8 and 3.12 (where the child would exit)."""
    if sys.version_info >= (3, 11, 8):
        pytest.skip("CPython >= 3.11.8 reinitialises the head lock in the child (gh-112275 fixed)")
    assert run_scenario("plain_fork", HANG_S) is None, (
        "the forked child exited: the hazard was not reproduced"
    )


@needs_head_lock
def test_loader_workers_start_although_every_fork_here_would_hang():
    done = run_scenario("loader", LOADER_S)
    assert done is not None, (
        f"the loader's workers hung (no batch in {LOADER_S:.0f} s): a fork of this process"
    )
    assert done.returncode == 0 and "loader passes done" in done.stdout, done.stderr[-3000:]


if __name__ == "__main__":
    {"plain_fork": scenario_plain_fork, "loader": scenario_loader}[sys.argv[1]]()
