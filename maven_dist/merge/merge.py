"""``merge_checkpoint``: a training checkpoint -> a HF-layout MaVEn directory, streamed and verified."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from maven_dist.contract.atomic_write import atomic_directory
from maven_dist.merge.errors import MergeError
from maven_dist.merge.local_source import read_safetensors_header
from maven_dist.merge.output_files import (
    DTYPES,
    OutputFiles,
    build_output_files,
    expected_shapes,
    parse_size,
    select_names,
)
from maven_dist.merge.source import CheckpointRef, find_checkpoint, open_source
from maven_dist.merge.writer import DTYPE_NAMES, ChunkReader, sha256_file, write_file

PROVENANCE_FILE = "merge_provenance.json"


@dataclass(frozen=True)
class MergeOptions:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Floating-point dtype of every written tensor (the checkpoint holds fp32 master weights)."""
    max_shard_size: str | int = "5GB"
    """Largest safetensors file per component (huggingface_hub units: 5GB = 5 * 10**9 bytes)."""
    only: tuple[str, ...] = ()
    """Parts to write (llm, vocab_new_rows, projector, selector, vision_tower); empty: all."""
    exclude_frozen: bool = False
    """Leave out parameters the checkpoint's stage did not train."""
    stage: str | None = None
    """Stage of a run directory (default: the one with the newest checkpoint)."""
    step: int | None = None
    tag: str | None = None
    """Checkpoint directory name, e.g. step_00000010 (default: the one 'latest' names)."""
    force: bool = False
    """Replace an existing OUT_DIR."""
    threads: int = 4
    """Reader threads (positioned reads overlap across rank files)."""
    chunk_mb: int = 16
    """Copy granularity; memory in flight is about chunk_mb * (2 * threads + 1)."""
    progress: bool = True


@dataclass
class MergeResult:
    out_dir: Path
    checkpoint: Path
    kind: str
    step: int
    num_parameters: int
    num_bytes: int
    seconds: float
    files: dict[str, str] = field(default_factory=dict)


def merge_checkpoint(
    src: str | Path, out_dir: str | Path, options: MergeOptions = MergeOptions()
) -> MergeResult:
    """Merge the checkpoint SRC names into OUT_DIR (see ``docs/merge.md``)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if options.dtype not in DTYPES:
        raise MergeError(f"--dtype {options.dtype!r}: choose one of {list(DTYPES)}")
    if out_dir.exists() and not options.force:
        raise MergeError(f"{out_dir} exists; pass --force to replace it")
    ref = find_checkpoint(Path(src), options.stage, options.step, options.tag)
    source = open_source(ref, threads=options.threads)
    tensors = source.tensors()
    if options.exclude_frozen and not source.knows_trainable:
        raise MergeError(
            f"--exclude-frozen: {ref.path.parent.parent}/resolved_recipe.yaml is missing, so which parts trained is unknown"
        )
    expected = expected_shapes(ref.skeleton)
    names = select_names(expected, tensors, str(ref.path), list(options.only), options.exclude_frozen)
    layout = build_output_files(names, tensors, DTYPES[options.dtype], parse_size(options.max_shard_size))

    with atomic_directory(out_dir) as tmp:  # a failed or killed merge leaves nothing behind
        shutil.copytree(ref.skeleton, tmp)
        hashes = _write_weights(tmp, layout, options)
        for relpath, index in layout.indexes.items():
            (tmp / relpath).write_text(json.dumps(index, indent=2))
        _verify(tmp, layout)
        files = {
            p.relative_to(tmp).as_posix(): hashes.get(p.relative_to(tmp).as_posix()) or sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        _write_provenance(tmp, ref, source.kind, source.world_size, options, layout, files, expected)
    return MergeResult(
        out_dir,
        ref.path,
        source.kind,
        ref.step,
        len(names),
        layout.nbytes,
        time.perf_counter() - start,
        files,
    )


def _write_weights(tmp: Path, layout: OutputFiles, options: MergeOptions) -> dict[str, str]:
    chunk = max(1, options.chunk_mb) << 20
    reader = ChunkReader(options.threads, chunk, read_ahead=2 * options.threads)
    progress = _Progress(layout.nbytes, options.progress)
    hashes = {}
    try:
        for out in layout.files:
            progress.file(out.relpath)
            hashes[out.relpath] = write_file(tmp / out.relpath, out, reader, progress.update)
    finally:
        reader.close()
        progress.close()
    return hashes


class _Progress:
    """Bytes written: a tqdm bar on a terminal; in a log file (stderr redirected, a Slurm ``.out``) a plain
    line every `every_s` seconds and per finished output file, where a bar's carriage returns would pile up."""

    def __init__(self, total: int, enabled: bool, every_s: float = 10.0):
        from tqdm import tqdm

        self.total, self.every_s, self.done = total, every_s, 0
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="merge", disable=not enabled or self.lines
        )
        self.start = self.last = time.monotonic()
        self.current = ""

    def file(self, name: str) -> None:
        if self.current:
            self._line(f"wrote {self.current}")
        self.current = name
        self.bar.set_postfix_str(name)

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        self.bar.update(nbytes)
        if self.lines and time.monotonic() - self.last >= self.every_s:
            self._line(self.current)

    def close(self) -> None:
        if self.current and self.done >= self.total:
            self._line(f"wrote {self.current}")
        self.bar.close()

    def _line(self, what: str) -> None:
        if not self.lines:
            return
        now = time.monotonic()
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        share = 100.0 * self.done / max(self.total, 1)
        print(
            f"[merge] {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB ({share:.0f}%) {rate / 1e6:.0f} MB/s {what}",
            flush=True,
        )


def _verify(tmp: Path, layout: OutputFiles) -> None:
    """Every planned tensor is in its file with the planned dtype, shape and size."""
    for out in layout.files:
        path = tmp / out.relpath
        header, start = read_safetensors_header(path)
        for t in out.tensors:
            info = header.get(t.key)
            if info is None or info["shape"] != list(t.shape) or info["dtype"] != DTYPE_NAMES[t.dtype]:
                raise MergeError(
                    f"verification failed: {path} has {t.key} as {info}, planned {t.shape} {t.dtype}"
                )
        if path.stat().st_size != start + out.nbytes:
            raise MergeError(
                f"verification failed: {path} has {path.stat().st_size} bytes, planned {start + out.nbytes}"
            )


def _write_provenance(
    tmp: Path,
    ref: CheckpointRef,
    kind: str,
    world_size: int,
    options: MergeOptions,
    layout: OutputFiles,
    files: dict[str, str],
    expected: dict,
) -> None:
    manifest = ref.manifest
    provenance = {
        "source": str(ref.path.resolve()),
        "kind": kind,
        "stage": manifest.get("stage"),
        "step": ref.step,
        "tag": ref.path.name,
        "world_size": world_size,
        "layout": manifest.get("layout"),
        "recipe_fingerprint": manifest.get("fingerprint"),
        "git_sha": manifest.get("git_sha"),
        "options": {k: v for k, v in asdict(options).items() if k not in ("progress", "force")},
        "complete": len(layout.names) == len(expected),
        "num_parameters": len(layout.names),
        "num_weight_bytes": layout.nbytes,
        "sha256": files,
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
