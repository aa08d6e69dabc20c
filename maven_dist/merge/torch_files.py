"""Where each tensor of a ``torch.save`` file lies on disk, without reading any tensor data.

The trainer writes its DeepSpeed rank files in torch's zip format
(``maven_dist.parallel.deepspeed_common.WeightsOnlyCheckpointEngine``), and so do ``ds_to_universal``
and plain ``torch.save``. ``zero_to_fp32`` loads them whole (41-54 GB of host RAM for 8-13B models,
DeepSpeed PR #6658) or memory-maps them and then materialises the merged state dict. Here each file
is opened with torch's public loader, ``torch.load(path, mmap=True, weights_only=True)``: only the
pickle is read and unpickled (weights-only, so no pickled code runs), and every storage is a slice of
one private memory map of the whole file, so no tensor byte is read and no page is faulted in as
long as nobody touches the tensors' data. Each storage's byte offset in the file is its address
relative to that mapping, cross-checked against the offsets Python's ``zipfile`` gives for the
archive's records. Readers then copy exactly the bytes a merged tensor needs with positioned reads
(``writer.ChunkReader``), through the page cache and never through the mapping, so no rank file is
ever resident in the merge's memory and a file truncated during the merge is a short read (a clear
error), not a SIGBUS.

torch's legacy (pre-1.6, non-zip) format is refused: ``torch.load`` cannot memory-map it, so reading
it in bounded memory meant parsing it by hand through torch internals, and the trainer no longer
writes it.
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maven_dist.merge.errors import MergeError

# torch.save's legacy format begins with a pickled magic number (a 10-byte LONG1).
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _Opaque:
    """Stand-in for the DeepSpeed types in its checkpoints (ZeroStageEnum, LossScaler,
    fragment_address): rebuilt from plain values (``args``, and ``__dict__`` from the pickle's state),
    never executed, and no import of DeepSpeed needed to merge."""

    def __new__(cls, *args):
        obj = super().__new__(cls)
        obj.args = args
        return obj


# Allowlisted by name only (torch.serialization.safe_globals accepts (callable, "module.qualname")),
# the same names ``maven_dist.parallel.deepspeed_common`` allowlists as the real classes.
_SAFE_GLOBALS = [
    (_Opaque, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Opaque, "deepspeed.utils.tensor_fragment.fragment_address"),
]

# torch's allowlist is one process-wide set that ``safe_globals`` adds to on entry and removes from on
# exit, so two overlapping loads on reader threads would take each other's entries away: hold it
# entered while any load runs.
_globals_lock = threading.Lock()
_globals_users = 0
_globals_ctx: torch.serialization.safe_globals | None = None


@contextmanager
def _deepspeed_stand_ins() -> Iterator[None]:
    global _globals_users, _globals_ctx
    with _globals_lock:
        if _globals_users == 0:
            _globals_ctx = torch.serialization.safe_globals(_SAFE_GLOBALS)
            _globals_ctx.__enter__()
        _globals_users += 1
    try:
        yield
    finally:
        with _globals_lock:
            _globals_users -= 1
            if _globals_users == 0 and _globals_ctx is not None:
                _globals_ctx.__exit__(None, None, None)
                _globals_ctx = None


@dataclass(frozen=True)
class StorageSpan:
    """A storage's bytes in the file."""

    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorLocation:
    """A (contiguous) tensor's bytes in the file."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class TorchFileIndex:
    """The object tree of a zip-format ``torch.save`` file, and each tensor's byte range.

    ``obj`` is ``torch.load(path, mmap=True, weights_only=True)``: its tensors are views of a memory
    map of the file. Use their metadata (shape, dtype, ``numel``) freely but do not read their data
    (that faults pages in, which counts in RSS); ``locate(t)`` gives the byte range of any tensor in
    ``obj`` for positioned reads instead.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._spans: dict[int, StorageSpan] = {}  # storage data_ptr (in the mapping) -> span in the file
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(64)
            if head[:4] != b"PK\x03\x04":
                if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]:
                    raise MergeError(
                        f"{self.path} is in torch's legacy (non-zip) torch.save format, which merge_ckpt does "
                        "not read: torch cannot memory-map it, so it cannot be streamed in bounded memory, and "
                        "the trainer writes only zip-format files. Re-save it with torch.save (zip is the "
                        "default) or merge a checkpoint saved by this version of the trainer"
                    )
                raise MergeError(
                    f"{self.path} is truncated or corrupt: it is no zip-format torch.save file "
                    f"(it starts with {head[:8]!r}); copy it again or merge an older checkpoint (--step)"
                )
            records = self._records()
            with _deepspeed_stand_ins():
                self.obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            self._match(records)
        except MergeError:
            raise
        except FileNotFoundError:
            raise MergeError(f"{self.path} is missing") from None
        except Exception as e:  # any zip, unpickling or structure error means a damaged file
            raise MergeError(
                f"{self.path} is truncated or corrupt ({type(e).__name__}: {_reason(e)}); copy it again from "
                "the run or merge an older checkpoint (--step)"
            ) from e

    def locate(self, tensor: torch.Tensor) -> TensorLocation:
        if not tensor.is_contiguous():
            raise MergeError(f"{self.path}: a non-contiguous tensor {tuple(tensor.shape)} cannot be streamed")
        nbytes = tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        span = self._spans.get(storage.data_ptr())
        if span is None or span.nbytes != storage.nbytes():
            if nbytes == 0:  # no bytes to read (an empty storage has no record of its own to match)
                return TensorLocation(self.path, 0, 0, tensor.dtype, tuple(tensor.shape))
            raise MergeError(f"{self.path}: tensor {tuple(tensor.shape)} does not belong to this file")
        start = tensor.storage_offset() * tensor.element_size()
        if start + nbytes > span.nbytes:
            raise MergeError(
                f"{self.path}: tensor {tuple(tensor.shape)} overruns its storage; the file is corrupt"
            )
        return TensorLocation(self.path, span.offset + start, nbytes, tensor.dtype, tuple(tensor.shape))

    # ------------------------------------------------------------------ structure

    def _records(self) -> dict[int, int]:
        """Data offset -> size of every non-empty tensor record (``<archive>/data/<key>``), checked to be
        stored uncompressed and inside the file; the pickle's CRC is checked on the way."""
        with zipfile.ZipFile(self.path) as zf, open(self.path, "rb") as raw:
            infos = zf.infolist()
            pkl = next(
                (i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None
            )
            if pkl is None:
                raise MergeError(f"{self.path} is a zip file without data.pkl: not a torch.save file")
            zf.read(pkl)  # checks its local header and CRC: a damaged pickle is named as such
            prefix = pkl.filename.removesuffix("data.pkl") + "data/"
            records = {}
            for info in infos:
                if not info.filename.startswith(prefix) or info.file_size == 0:
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise MergeError(
                        f"{self.path}: record {info.filename} is compressed; it cannot be streamed"
                    )
                offset = _record_data_offset(raw, info)
                if offset + info.file_size > self.size:
                    raise MergeError(
                        f"{self.path} is truncated: it has {self.size} bytes but record {info.filename} "
                        f"needs {offset + info.file_size}; copy it again or merge an older checkpoint (--step)"
                    )
                records[offset] = info.file_size
        return records

    def _match(self, records: dict[int, int]) -> None:
        """Each storage's file offset: its address minus the mapping's, which is where the first record's
        storage lies. Every offset must be a record of exactly the storage's size."""
        storages: dict[int, int] = {}
        for tensor in _tensors(self.obj):
            storage = tensor.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        if not storages:
            return
        if not records:
            raise MergeError(
                f"{self.path}: its tensors have data but the file has no data records; corrupt file"
            )
        base = min(storages) - min(records)
        for ptr, nbytes in storages.items():
            offset = ptr - base
            if records.get(offset) != nbytes:
                raise MergeError(
                    f"{self.path}: a storage of {nbytes} bytes lies at offset {offset}, where the zip directory "
                    f"has {'no record' if offset not in records else f'a record of {records[offset]} bytes'}; "
                    "the file is corrupt"
                )
            self._spans[ptr] = StorageSpan(offset, nbytes)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a weights-only object tree (containers and allowlisted stand-ins)."""
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            yield x
            continue
        if isinstance(x, (str, bytes, int, float, type(None), torch.dtype, torch.device)) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
        elif hasattr(x, "__dict__"):
            stack += list(vars(x).values())


def _reason(e: Exception) -> str:
    """The gist of an error: for a refused weights-only load, the refusal itself, without torch's advice
    to allowlist the global or to load with ``weights_only=False`` (which would run the pickled code)."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        return text.split("WeightsUnpickler error:", 1)[1].strip().split(". ", 1)[0]
    return text


def _record_data_offset(raw, info: zipfile.ZipInfo) -> int:
    """A stored zip record's data starts after its local header (whose extra field torch uses to
    64-byte-align tensor data, so it differs from the central directory's)."""
    name = info.filename.encode()
    header = os.pread(raw.fileno(), 30 + len(name), info.header_offset)
    if len(header) < 30 + len(name) or header[:4] != b"PK\x03\x04" or header[30:] != name:
        raise MergeError(f"{raw.name}: bad local zip header for {info.filename}; the file is corrupt")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len
