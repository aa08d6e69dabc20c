"""Streaming safetensors writer: header first (computed from shapes), then tensor bytes copied from
the source files in bounded chunks, read ahead by a thread pool and hashed on the way out.

Memory stays at about ``chunk_bytes * (read_ahead + 1)`` whatever the model size: no output shard,
and not even one whole parameter, is ever held in memory. The byte layout is the one the
``safetensors`` library writes (tensors sorted by dtype, largest first, then by name; compact JSON
header padded with spaces to 8 bytes), so a merged file is byte-identical to ``save_file`` of the
same tensors, which the tests check.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from maven_dist.merge.errors import MergeError
from maven_dist.merge.output_files import OutFile, OutTensor
from maven_dist.merge.source import InterleavedPieces, Piece

# safetensors' Dtype enum order (safetensors 0.4-0.8); it sorts tensors by it, descending.
_DTYPE_ORDER = [
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
]
DTYPE_NAMES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}


def safetensors_header(
    tensors: list[OutTensor], metadata: dict[str, str] | None
) -> tuple[bytes, list[OutTensor]]:
    """The header bytes (length prefix included) and the tensors in file order."""
    ordered = sorted(tensors, key=lambda t: (-_DTYPE_ORDER.index(DTYPE_NAMES[t.dtype]), t.key))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in ordered:
        header[t.key] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


class ChunkReader:
    """Positioned reads of source byte ranges on a thread pool (``os.pread`` releases the GIL, so
    reads of different rank files overlap), keeping at most `read_ahead` chunks in flight. A chunk is
    one byte range, or runs of rows from several tp ranks' files interleaved into full rows."""

    def __init__(self, threads: int, chunk_bytes: int, read_ahead: int):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="merge-read")
        self.chunk_bytes = chunk_bytes
        self.read_ahead = max(1, read_ahead)
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise MergeError(f"{path} is missing (it was there when the merge started)") from None
        return self._fds[path]

    def _read(self, path: Path, offset: int, nbytes: int) -> bytes:
        data = os.pread(self._fd(path), nbytes, offset)
        if len(data) != nbytes:
            raise MergeError(
                f"{path} is truncated: {nbytes} bytes wanted at offset {offset}, {len(data)} there; "
                "copy it again or merge an older checkpoint (--step)"
            )
        return data

    def _read_job(self, pieces: tuple[Piece, ...], rows: int) -> bytes:
        if len(pieces) == 1:
            return self._read(pieces[0].path, pieces[0].offset, pieces[0].nbytes)
        # One run of rows from each tp rank: interleave them row by row (InterleavedPieces.blocks).
        parts = [
            np.frombuffer(self._read(p.path, p.offset, p.nbytes), np.uint8).reshape(rows, -1) for p in pieces
        ]
        return np.concatenate(parts, axis=1).tobytes()

    def stream(self, jobs: Iterator[tuple[tuple[Piece, ...], int, object]]) -> Iterator[tuple[bytes, object]]:
        """Yield (bytes, tag) for each (pieces, rows, tag) job, in order: one piece is read as it is;
        several are `rows` rows from each, interleaved row by row."""
        window: deque[tuple[Future, object]] = deque()
        for pieces, rows, tag in jobs:
            for piece in pieces:
                self._fd(piece.path)  # open in this thread: a missing file fails here, in order
            window.append((self.pool.submit(self._read_job, pieces, rows), tag))
            if len(window) >= self.read_ahead:
                future, t = window.popleft()
                yield future.result(), t
        while window:
            future, t = window.popleft()
            yield future.result(), t


def write_file(path: Path, out: OutFile, reader: ChunkReader, on_bytes: Callable[[int], None]) -> str:
    """Write one safetensors file; return its sha256."""
    header, ordered = safetensors_header(out.tensors, out.metadata)
    digest = hashlib.sha256(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    # sha256 runs at ~0.5-1 GB/s, as slow as the copy itself: hash on a thread of its own (hashlib
    # releases the GIL), in order, at most two chunks behind the writes.
    hashing: deque[Future] = deque()
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="merge-sha256") as hasher:
        f.write(header)
        for data, (src_dtype, dst_dtype) in reader.stream(_jobs(ordered, reader.chunk_bytes)):
            if src_dtype != dst_dtype:
                data = (
                    torch.frombuffer(bytearray(data), dtype=src_dtype)
                    .to(dst_dtype)
                    .view(torch.uint8)
                    .numpy()
                    .tobytes()
                )
            hashing.append(hasher.submit(digest.update, data))
            f.write(data)
            on_bytes(len(data))
            while len(hashing) > 2:
                hashing.popleft().result()
        for future in hashing:
            future.result()
    return digest.hexdigest()


def _jobs(ordered: list[OutTensor], chunk_bytes: int):
    for t in ordered:
        for source in t.sources:
            tag = (source.dtype, t.dtype)
            if isinstance(source.pieces, InterleavedPieces):
                # Rows are whole elements (the split dimension's slices), so every job casts cleanly.
                for pieces, rows in source.pieces.blocks(chunk_bytes):
                    yield pieces, rows, tag
                continue
            itemsize = source.dtype.itemsize
            step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
            for piece in source.pieces:
                for start in range(0, piece.nbytes, step):
                    yield (Piece(piece.path, piece.offset + start, min(step, piece.nbytes - start)),), 1, tag


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
