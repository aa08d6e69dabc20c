"""The preemption flag: real signals to a real process, the exit code, chaining to a launcher's handler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from maven_dist.contract import preemption
from maven_dist.contract.preemption import (
    REQUEUE_EXIT_CODE,
    ignore_preemption_signals,
    install_preemption_handler,
    preemption_requested,
    preemption_signal,
    received_signals,
    reset_preemption,
)


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    reset_preemption()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    preemption._previous.clear()
    reset_preemption()


def test_requeue_exit_code_is_ex_tempfail_and_clear_of_other_meanings() -> None:
    assert REQUEUE_EXIT_CODE == 75
    assert REQUEUE_EXIT_CODE not in (0, 1, 2, 124, 137, 143, 144)  # 144: submitit's local requeue code


def test_signals_set_the_flag_in_order(restore_handlers: None) -> None:
    install_preemption_handler()
    assert not preemption_requested() and preemption_signal() is None
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption_requested()
    assert preemption_signal() == signal.SIGTERM
    assert received_signals() == (signal.SIGTERM, signal.SIGUSR2)
    reset_preemption()
    assert not preemption_requested() and received_signals() == ()


def test_previous_handlers_are_returned_for_chaining(restore_handlers: None) -> None:
    seen: list[int] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    previous = install_preemption_handler([signal.SIGUSR2])
    assert callable(previous[signal.SIGUSR2])
    assert preemption.previous_handler(signal.SIGUSR2) is previous[signal.SIGUSR2]
    assert install_preemption_handler([signal.SIGUSR2]) == {}  # twice: ours is not "previous"
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption_requested() and seen == []  # ours ran, not the old one
    previous[signal.SIGUSR2](signal.SIGUSR2, None)
    assert seen == [signal.SIGUSR2]


def test_a_training_process_saves_and_exits_with_the_requeue_code(tmp_path) -> None:
    """A process polling the flag like the trainer does, sent USR2 from outside."""
    marker = tmp_path / "saved"
    script = textwrap.dedent(
        f"""
        import sys, time
        from maven_dist.contract.preemption import REQUEUE_EXIT_CODE, install_preemption_handler, preemption_requested
        install_preemption_handler()
        print("ready", flush=True)
        for step in range(600):
            time.sleep(0.05)
            if preemption_requested():
                open({str(marker)!r}, "w").write(str(step))
                sys.exit(REQUEUE_EXIT_CODE)
        sys.exit(0)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=30) == REQUEUE_EXIT_CODE
    assert int(marker.read_text()) < 600


def test_worker_processes_survive_the_signals_that_stop_their_rank() -> None:
    """A DataLoader-style worker started with spawn: TERM/USR2 must not kill it (its rank saves)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    worker = ctx.Process(target=_worker, args=(ready, done))
    worker.start()
    try:
        assert ready.wait(60)
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR2)
        time.sleep(0.3)
        assert worker.is_alive()
        done.set()
        worker.join(30)
        assert worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()


def _worker(ready, done) -> None:
    ignore_preemption_signals()
    ready.set()
    done.wait(60)
