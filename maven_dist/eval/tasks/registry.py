"""Benchmark names -> readers: ``load_task("mme", BENCH_ROOT, cache_dir)`` reads ``BENCH_ROOT/mme/``.

Each task lives in its own folder under one benchmark root, named as in :data:`TASK_FORMATS`; what
each folder holds is in the readers' docstrings and docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

from maven_dist.eval.tasks.base import BenchmarkError, Task
from maven_dist.eval.tasks.mme import MmeTask
from maven_dist.eval.tasks.multi_image import MultiImageTask
from maven_dist.eval.tasks.multiple_choice import MMBenchTask, SeedBenchTask
from maven_dist.eval.tasks.vqa import VqaTask

TASK_FORMATS: dict[str, str] = {
    "vqav2": "vqa",
    "gqa": "vqa",
    "textvqa": "vqa",
    "mme": "mme",
    "mmbench": "multiple_choice",
    "seedbench": "multiple_choice",
    "demon": "multi_image",
    "heldout": "multi_image",
}
"""Every known task name and the reader (``Task.format``) that reads it, in reporting order. ``heldout`` is
the synthetic world's held-out question set, one DEMON-style sub-task per question kind (``offline/synthetic_benchmarks.py``)."""


def task_directory(name: str, root: Path) -> Path:
    """``root/<name>/`` for a benchmark root; ``root`` itself when it is already the task folder ``<name>/``."""
    root = Path(root)
    if (root / name).is_dir():
        return root / name
    if root.name == name and root.is_dir():
        return root
    raise BenchmarkError(f"{root / name}: benchmark {name} not found (layout in docs/evaluation.md)")


def load_task(name: str, root: Path, cache_dir: Path) -> Task:
    """Read task ``name`` from the benchmark root ``root`` (``root/<name>/``, or ``root`` if it is that folder).

    ``cache_dir`` receives files a reader derives (MMBench's decoded images); its files are named by
    content, so one directory may serve every task and run. Raises KeyError for an unknown name and
    :class:`BenchmarkError` for a missing or malformed benchmark.
    """
    if name not in TASK_FORMATS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(TASK_FORMATS)}")
    directory = task_directory(name, root)
    if TASK_FORMATS[name] == "vqa":
        return VqaTask(directory, name)
    if name == "mme":
        return MmeTask(directory)
    if name == "mmbench":
        return MMBenchTask(directory, Path(cache_dir))
    if name == "seedbench":
        return SeedBenchTask(directory)
    return MultiImageTask(directory, name=name)


def find_tasks(root: Path) -> list[str]:
    """The known task names whose folder exists under ``root``, in :data:`TASK_FORMATS` order."""
    return [name for name in TASK_FORMATS if (Path(root) / name).is_dir()]
