"""Replace a file or a directory so that a reader sees the old content or the new, never a part of either.

The new content is written to a temporary sibling (same file system, so the rename cannot turn into a
copy), fsynced, and renamed over the target (POSIX ``rename`` is atomic); then the parent directory is
fsynced, so the rename itself survives a power cut. A crash at any point leaves the target as it was and
at most a hidden ``.NAME.tmp-PID`` beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write a file to (with any library); when
    the block ends without an exception, that file replaces ``path``. On an exception it is removed.
    Temporary names carry the process id, so two processes writing one target never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """:func:`atomic_path` for a directory the block creates at the yielded path (a model, a converted
    checkpoint): it replaces ``path`` (an old one is removed first), and is removed on an exception. What
    an earlier, killed writer of ``path`` left behind is removed first (those can be gigabytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any, lines: bool = False) -> None:
    """Replace ``path`` with ``obj`` as indented JSON, or as JSON Lines (one item a line) with ``lines``."""
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=1) + "\n"
    write_text_atomic(path, text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
