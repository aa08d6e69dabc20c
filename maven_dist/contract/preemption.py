"""Turn a preemption signal into a flag the trainer polls at a safe point.

Slurm warns a job before it ends: ``--signal=B:USR2@120`` (our sbatch scripts) or submitit's
``USR2@90`` ahead of the time limit, SIGTERM when an admin or ``scontrol requeue`` preempts it. A
signal can arrive in the middle of a collective or an optimizer step, where nothing may be saved,
so the handler only records it. The trainer checks :func:`preemption_requested` after every
optimizer step (all ranks agree through an all-reduce), saves a checkpoint and exits with
:data:`REQUEUE_EXIT_CODE`. The launcher that started it turns that exit code into a requeue
(``slurm/launch.sh``: ``scontrol requeue``; the submitit callable: submitit's checkpoint-and-requeue).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from types import FrameType

REQUEUE_EXIT_CODE = getattr(os, "EX_TEMPFAIL", 75)
"""75, ``EX_TEMPFAIL`` from sysexits.h ("temporary failure, retry later"): the trainer saved its
state after a preemption signal and wants to be requeued. Chosen to stay clear of 1 (errors),
2 (usage), 124/137/143 (timeout, SIGKILL, SIGTERM) and submitit's local requeue code 144."""

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, signal.SIGTERM)

REQUEUE_MARKER_ENV = "MAVEN_REQUEUE_MARKER"
"""A file the launcher names (``slurm/launch.sh``) for rank 0 to create once the preemption checkpoint is on
disk. ``srun --kill-on-bad-exit=1`` kills the other ranks as soon as the first exits 75, so srun's own exit
code may be another rank's SIGKILL: the marker, not the code, tells the launcher to requeue."""

_requested = threading.Event()
_received: list[int] = []
_previous: dict[int, object] = {}


def _handler(signum: int, frame: FrameType | None) -> None:
    # Async-signal context: record and return, nothing else (no I/O, no locks, no torch).
    _received.append(signum)
    _requested.set()


def install_preemption_handler(
    signals: Iterable[signal.Signals | int] = DEFAULT_SIGNALS,
) -> dict[int, object]:
    """Record ``signals`` as a preemption request instead of their default action.

    Call it from the main thread before training starts (Python only delivers signals there).
    Installing twice is harmless. Returns the handlers that were installed before, by signal
    number, so a launcher that owns them (submitit) can chain to them once the trainer has saved.
    """
    previous: dict[int, object] = {}
    for sig in signals:
        num = int(sig)
        old = signal.signal(num, _handler)
        if old is not _handler:
            previous[num] = old
            _previous[num] = old
    return previous


def ignore_preemption_signals(signals: Iterable[signal.Signals | int] = DEFAULT_SIGNALS) -> None:
    """For helper processes of a rank (DataLoader workers: call it from ``worker_init_fn``).

    Slurm signals every process of a job step, not just the rank: a worker killed by the TERM of
    ``scontrol requeue`` makes the DataLoader raise in the rank before it can save. Workers
    ignore the signals and let their rank save and exit; they end with it.
    """
    for sig in signals:
        signal.signal(int(sig), signal.SIG_IGN)


def mark_requeue_requested() -> None:
    """Rank 0, after the preemption checkpoint is saved on every rank: create the launcher's marker file
    (:data:`REQUEUE_MARKER_ENV`), where a launcher asked for one."""
    path = os.environ.get(REQUEUE_MARKER_ENV)
    if path:
        with open(path, "w") as f:
            f.write(f"{preemption_signal()}\n")


def preemption_requested() -> bool:
    """True once any of the installed signals arrived in this process."""
    return _requested.is_set()


def preemption_signal() -> int | None:
    """The first preemption signal received, or None (USR2: time limit or submitit; TERM: admin)."""
    return _received[0] if _received else None


def received_signals() -> tuple[int, ...]:
    """Every preemption signal received so far, in order (submitit's ``_interrupt`` sends TERM, then USR2)."""
    return tuple(_received)


def previous_handler(sig: signal.Signals | int) -> object | None:
    """The handler that :func:`install_preemption_handler` replaced for ``sig``, if any."""
    return _previous.get(int(sig))


def reset_preemption() -> None:
    """Clear the flag; for tests and for a launcher that reruns the trainer in one process."""
    _requested.clear()
    _received.clear()
