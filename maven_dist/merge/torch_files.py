"""Where each tensor of a ``torch.save`` file lies on disk, without reading any tensor data.

DeepSpeed writes its rank files with ``torch.save``: either the zip format (the default of torch and
of DeepSpeed's config) or torch's legacy format (what a ``TorchCheckpointEngine`` built without a
config writes). ``zero_to_fp32`` loads them whole (41-54 GB of host RAM for 8-13B models, DeepSpeed
PR #6658) or, for zip files only, memory-maps them. We unpickle only the small pickle part with
torch's weights-only unpickler, giving every storage a zero-byte *meta* stand-in, and compute the
byte range of each storage from the file's structure. Readers then copy exactly the bytes a merged
tensor needs with positioned reads, so no rank file is ever resident in memory.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from maven_dist.merge.errors import MergeError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Opaque:
    """Stand-in for the two DeepSpeed types in its checkpoints (ZeroStageEnum, LossScaler): rebuilt from
    plain values, never executed, and no import of DeepSpeed needed to merge."""

    def __init__(self, *args):
        self.args = args


# Allowlisted by name only, exactly as ``maven_dist.parallel.zero3`` allowlists the real classes.
_SAFE_GLOBALS = [
    (_Opaque, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Opaque, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
]


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
    """The object tree of a ``torch.save`` file with meta tensors, and each tensor's byte range.

    ``obj`` has the structure of ``torch.load(path)``; its tensors live on the meta device, so
    loading costs only the pickle. ``locate(t)`` gives the byte range of any tensor in ``obj``.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._spans: dict[int, StorageSpan] = {}  # StorageImpl address -> span
        self._keep: list[torch.UntypedStorage] = []  # keep stand-ins alive so addresses stay unique
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                magic = f.read(4)
            if magic == b"PK\x03\x04":
                self.obj = self._load_zip()
            else:
                self.obj = self._load_legacy()
        except MergeError:
            raise
        except FileNotFoundError:
            raise MergeError(f"{self.path} is missing") from None
        except Exception as e:  # any unpickling or structure error means a damaged file
            raise MergeError(
                f"{self.path} is truncated or corrupt ({type(e).__name__}: {e}); copy it again from the run "
                "or merge an older checkpoint (--step)"
            ) from e
        for span in self._spans.values():
            if span.offset + span.nbytes > self.size:
                raise MergeError(
                    f"{self.path} is truncated: it has {self.size} bytes but its tensors need "
                    f"{span.offset + span.nbytes}; copy it again or merge an older checkpoint (--step)"
                )

    def locate(self, tensor: torch.Tensor) -> TensorLocation:
        if not tensor.is_contiguous():
            raise MergeError(f"{self.path}: a non-contiguous tensor {tuple(tensor.shape)} cannot be streamed")
        span = self._spans.get(tensor.untyped_storage()._cdata)
        if span is None:
            raise MergeError(f"{self.path}: tensor {tuple(tensor.shape)} does not belong to this file")
        start = tensor.storage_offset() * tensor.element_size()
        nbytes = tensor.numel() * tensor.element_size()
        if start + nbytes > span.nbytes:
            raise MergeError(
                f"{self.path}: tensor {tuple(tensor.shape)} overruns its storage; the file is corrupt"
            )
        return TensorLocation(self.path, span.offset + start, nbytes, tensor.dtype, tuple(tensor.shape))

    # ------------------------------------------------------------------ formats

    def _stand_in(self, dtype: torch.dtype, numel: int) -> tuple[torch.storage.TypedStorage, int]:
        nbytes = numel * torch._utils._element_size(dtype)
        untyped = torch.UntypedStorage(nbytes, device="meta")
        self._keep.append(untyped)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True), untyped._cdata

    def _unpickle(self, data: io.IOBase, persistent_load) -> Any:
        from torch import _weights_only_unpickler

        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            unpickler = _weights_only_unpickler.Unpickler(data, encoding="utf-8")
            unpickler.persistent_load = persistent_load
            return unpickler.load()

    def _load_zip(self) -> Any:
        with zipfile.ZipFile(self.path) as zf, open(self.path, "rb") as raw:
            infos = {i.filename: i for i in zf.infolist()}
            pkl_name = next((n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl_name is None:
                raise MergeError(f"{self.path} is a zip file without data.pkl: not a torch.save file")
            prefix = pkl_name.removesuffix("data.pkl")
            storages: dict[str, torch.storage.TypedStorage] = {}

            def persistent_load(pid):
                _, storage_type, key, _location, numel = pid
                dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
                if key not in storages:
                    name = f"{prefix}data/{key}"
                    info = infos.get(name)
                    if info is None:
                        raise MergeError(f"{self.path} lacks record {name}: the file is corrupt")
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise MergeError(f"{self.path}: record {name} is compressed; it cannot be streamed")
                    stand_in, cdata = self._stand_in(dtype, numel)
                    nbytes = numel * torch._utils._element_size(dtype)
                    if info.file_size != nbytes:
                        raise MergeError(
                            f"{self.path}: record {name} has {info.file_size} bytes, expected {nbytes}"
                        )
                    self._spans[cdata] = StorageSpan(_record_data_offset(raw, info), nbytes)
                    storages[key] = stand_in
                return storages[key]

            return self._unpickle(io.BytesIO(zf.read(pkl_name)), persistent_load)

    def _load_legacy(self) -> Any:
        with open(self.path, "rb") as f:
            if f.read(2) != b"\x80\x02":
                raise MergeError(f"{self.path} is neither a zip nor a legacy torch.save file")
            f.seek(0)
            magic = pickle.load(f)
            if magic != _LEGACY_MAGIC:
                raise MergeError(f"{self.path}: bad magic number {magic!r}; the file is corrupt")
            pickle.load(f)  # protocol version
            pickle.load(f)  # sys info
            roots: dict[str, tuple[torch.storage.TypedStorage, int, torch.dtype, int]] = {}
            views: dict[str, torch.storage.TypedStorage] = {}
            view_spans: list[tuple[int, str, int, int]] = []

            def persistent_load(pid):
                typename, storage_type, root_key, _location, numel, view_metadata = pid
                if typename != "storage":
                    raise MergeError(f"{self.path}: unexpected persistent id {typename!r}")
                dtype = storage_type.dtype
                if root_key not in roots:
                    stand_in, cdata = self._stand_in(dtype, numel)
                    roots[root_key] = (stand_in, cdata, dtype, numel)
                if view_metadata is None:
                    return roots[root_key][0]
                view_key, offset, size = view_metadata
                if view_key not in views:
                    stand_in, cdata = self._stand_in(dtype, size)
                    views[view_key] = stand_in
                    view_spans.append(
                        (
                            cdata,
                            root_key,
                            offset * torch._utils._element_size(dtype),
                            size * torch._utils._element_size(dtype),
                        )
                    )
                return views[view_key]

            obj = self._unpickle(f, persistent_load)
            keys = pickle.load(f)
            offset = f.tell()
            root_spans = {}
            for key in keys:
                _, cdata, dtype, numel = roots[key]
                header = _pread(f, offset, 8)
                if len(header) < 8:
                    raise MergeError(
                        f"{self.path} is truncated: storage {key} starts past the end of the file"
                    )
                (stored,) = struct.unpack("<q", header)
                if stored != numel:
                    raise MergeError(
                        f"{self.path}: storage {key} has {stored} elements on disk, expected {numel}; corrupt file"
                    )
                nbytes = numel * torch._utils._element_size(dtype)
                root_spans[key] = StorageSpan(offset + 8, nbytes)
                self._spans[cdata] = root_spans[key]
                offset += 8 + nbytes
            for cdata, root_key, start, nbytes in view_spans:
                self._spans[cdata] = StorageSpan(root_spans[root_key].offset + start, nbytes)
            return obj


def _record_data_offset(raw, info: zipfile.ZipInfo) -> int:
    """A stored zip record's data starts after its local header (whose extra field torch uses to
    64-byte-align tensor data, so it differs from the central directory's)."""
    header = _pread(raw, info.header_offset, 30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise MergeError(f"bad local zip header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _pread(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)
