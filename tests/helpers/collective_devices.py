"""Test-only: record the device of every tensor the package hands to a torch.distributed collective.

On a CPU machine every tensor is on the CPU, so a collective fed a tensor that *would* be on the CPU
under NCCL (a ``torch.tensor([...])`` without ``device=``) looks the same as a correct one. The recorder
tells them apart by where a tensor's device came from:

* a tensor made by a factory (``torch.tensor``, ``zeros``, ``ones``, ``empty``, ``full``, ``arange``,
  ``randn``, ...) without a ``device`` argument, or moved with ``.cpu()``, is **defaulted**: it is on the
  CPU whatever the engine's device is;
* anything computed from a defaulted tensor is defaulted too, until the code moves it with
  ``.to(device)`` / ``.to(tensor)`` / ``.cuda()``;
* everything else (parameters, batches moved to the engine, tensors made with ``device=``) is placed.

Every collective called directly from ``maven_dist`` (the package's own collectives; DeepSpeed's and
megatron's internal ones are theirs) is recorded with its tensors' devices and whether each was
defaulted. :meth:`CollectiveDeviceRecorder.violations` lists those that would fail under NCCL.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parents[2] / "maven_dist")
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "reduce",
)
FACTORIES = {
    torch.tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.eye,
    torch.linspace,
    torch.as_tensor,
}
_DEFAULTED = "_maven_device_defaulted"


@dataclass(frozen=True)
class Collective:
    name: str
    caller: str
    """file:line of the package's call."""
    devices: tuple[str, ...]
    defaulted: tuple[bool, ...]


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _is_defaulted(t: torch.Tensor) -> bool:
    return bool(getattr(t, _DEFAULTED, False))


def _mark(value, defaulted: bool) -> None:
    for t in _tensors(value):
        with contextlib.suppress(AttributeError, RuntimeError):  # e.g. tensors of some C++ types
            setattr(t, _DEFAULTED, defaulted)


def _names_a_device(func, args, kwargs) -> bool:
    """Whether a call places its result on a device the code chose."""
    if func in FACTORIES or getattr(func, "__name__", "") in (
        "new_tensor",
        "new_zeros",
        "new_ones",
        "new_empty",
        "new_full",
    ):
        return kwargs.get("device") is not None
    name = getattr(func, "__name__", "")
    if name == "cuda":
        return True
    if name == "to":
        return kwargs.get("device") is not None or any(
            isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:]
        )
    return False


class CollectiveDeviceRecorder(TorchFunctionMode):
    """``with CollectiveDeviceRecorder() as rec: ...``; then ``rec.calls`` and ``rec.violations(device)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Collective] = []
        self._originals: dict[str, object] = {}

    # ------------------------------------------------------------------ provenance of devices

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if func in FACTORIES or name.startswith("new_"):
            if func in FACTORIES:
                _mark(out, kwargs.get("device") is None)
            else:  # tensor.new_*: the source tensor's device unless one is named
                _mark(out, kwargs.get("device") is None and _is_defaulted(args[0]))
        elif name == "cpu":
            _mark(out, True)
        elif _names_a_device(func, args, kwargs):
            _mark(out, False)
        elif any(_is_defaulted(t) for t in _tensors((args, kwargs))):
            _mark(out, True)
        return out

    # ------------------------------------------------------------------ the collectives

    def __enter__(self):
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)
        return super().__exit__(*exc)

    def _wrap(self, name: str, original):
        @functools.wraps(original)
        def recorded(*args, **kwargs):
            caller = sys._getframe(1)
            path = caller.f_code.co_filename
            if path.startswith(PACKAGE):
                tensors = list(_tensors((args, kwargs)))
                self.calls.append(
                    Collective(
                        name,
                        f"{Path(path).relative_to(Path(PACKAGE).parent)}:{caller.f_lineno}",
                        tuple(str(t.device) for t in tensors),
                        tuple(_is_defaulted(t) for t in tensors),
                    )
                )
            return original(*args, **kwargs)

        return recorded

    def violations(self, device: torch.device) -> list[Collective]:
        """The recorded collectives with a tensor off `device` or on it only by default."""
        want = str(torch.device(device))
        return [c for c in self.calls if any(d != want for d in c.devices) or any(c.defaulted)]
