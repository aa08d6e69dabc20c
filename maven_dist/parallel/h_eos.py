"""Where the engines that run one micro-batch at a time (local, ZeRO-3) get h_eos from.

h_eos is the LLM's state after an image's discrete block (``MavenModel.eos_states``): a gradient-free
pass of the whole LLM. Under ZeRO-3 that pass gathers every partitioned LLM parameter once more
(~13.5 GB at 7B in bf16) for a forward of ~36 positions per image, which cannot hide the gather. Before,
each micro-batch's forward ran it; now (issue 23, finding 6):

* **stages whose LLM is frozen** (1 and 3: the pass reads the LLM body and the text and new-row
  embeddings, none of which trains) take h_eos from :class:`HEosCache`: one value per image code
  sequence, computed before the first step by the stage's own frozen model for every image this rank
  will see (its training batches and its validation share), in passes of :data:`PASS_IMAGES` images,
  and kept on disk under the model's fingerprint (:func:`h_eos_fingerprint`), so a resumed stage reads
  them back; a different model (another ``init_from``, another layout) gets another directory. A
  step whose images are all cached issues no all-gather for h_eos.
* **stages that train the LLM** (4) run one pass per optimizer step over all of the step's images
  (:class:`PerStepHEos`): the weights do not change between the step's micro-batches, so the values
  are the ones each micro-batch computed before.

Either way the forward gets the precomputed values (``MavenModel.forward(h_eos=...)``). The losses equal the
former per-micro-batch pass's within 1e-6 (``tests/unit/test_h_eos.py``); the saving is measured in
docs/performance.md ("h_eos without the extra all-gather").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from maven_dist.contract.atomic_write import atomic_path
from maven_dist.contract.batch import Batch

PASS_IMAGES = 64
"""Images per h_eos pass while a cache is filled (one all-gather of the LLM per pass under ZeRO-3)."""

EosPass = Callable[[torch.Tensor], torch.Tensor]
"""image codes [N, K] on the engine's device -> h_eos [N, d]: one gradient-free pass (every rank together)."""


class HEosSource(Protocol):
    def for_step(self, batches: Sequence[Batch]) -> list[torch.Tensor]:
        """h_eos of each batch's images ([n_b, d] on the engine's device), for a step's micro-batches.
        Every rank calls it with as many batches, at the same point."""
        ...


def _blank_codes(batches: Sequence[Batch], device: torch.device) -> torch.Tensor:
    k = next((b.image_codes.shape[1] for b in batches if b.image_codes.shape[1]), 1)
    return torch.zeros(1, k, dtype=torch.long, device=device)


class PerStepHEos:
    """One h_eos pass per optimizer step over every image of its micro-batches (stage 4)."""

    def __init__(self, eos_pass: EosPass, device: torch.device):
        self.eos_pass, self.device = eos_pass, device

    def for_step(self, batches: Sequence[Batch]) -> list[torch.Tensor]:
        counts = [b.num_images for b in batches]
        codes = [b.image_codes.to(self.device) for b in batches if b.num_images]
        # Every rank runs the pass (ZeRO-3 gathers collectively): one without images runs a blank one.
        h_eos = self.eos_pass(torch.cat(codes) if codes else _blank_codes(batches, self.device))
        return list(h_eos[: sum(counts)].split(counts))


def _key(codes: np.ndarray) -> bytes:
    return np.ascontiguousarray(codes, dtype=np.int64).tobytes()


class HEosCache:
    """h_eos by image code sequence for a stage whose LLM is frozen (see the module doc)."""

    def __init__(
        self,
        eos_pass: EosPass,
        device: torch.device,
        width: int,
        dtype: torch.dtype,
        directory: Path | None = None,
    ):
        self.eos_pass, self.device, self.directory = eos_pass, device, directory
        self.width, self.dtype = width, dtype
        """h_eos's size and dtype (the LLM's width, the model's dtype): a text-only batch gets [0, width]."""
        self._states: dict[bytes, torch.Tensor] = {}
        self.passes = 0
        """h_eos passes this cache ran (filling it, and on misses)."""

    def __len__(self) -> int:
        return len(self._states)

    # ------------------------------------------------------------------ filling

    def fill(self, image_codes: np.ndarray, rank: int = 0, world_size: int = 1) -> None:
        """Make sure every row of `image_codes` [n, K] (this rank's images) has its h_eos: read this rank's
        file, compute what is missing in passes of :data:`PASS_IMAGES` (as many passes on every rank),
        write the file back. Collective."""
        path = None if self.directory is None else self.directory / f"rank{rank}-of-{world_size}.safetensors"
        if path is not None and path.is_file():
            saved = load_file(path)
            for codes, state in zip(saved["codes"].numpy(), saved["h_eos"], strict=True):
                self._states[_key(codes)] = state
        codes = np.asarray(image_codes, dtype=np.int64)
        rows = np.unique(codes, axis=0) if codes.size else np.zeros((0, 1), dtype=np.int64)
        missing = [r for r in rows if _key(r) not in self._states]
        passes = -(-len(missing) // PASS_IMAGES)
        for k in range(_max_over_ranks(passes, self.device)):
            chunk = missing[k * PASS_IMAGES : (k + 1) * PASS_IMAGES]
            self._compute(np.stack(chunk) if chunk else None, rows.shape[1] if rows.size else 1)
        if path is not None and missing:
            self._save(path)

    def _compute(self, codes: np.ndarray | None, width: int) -> None:
        """One pass over `codes` (a blank image where this rank has none left: every rank must run it)."""
        batch = torch.zeros(1, width, dtype=torch.long) if codes is None else torch.from_numpy(codes)
        with torch.no_grad():
            h_eos = self.eos_pass(batch.to(self.device)).to("cpu")
        self.passes += 1
        if codes is not None:
            for row, state in zip(codes, h_eos, strict=True):
                self._states[_key(row)] = state.clone()

    def _save(self, path: Path) -> None:
        keys = list(self._states)
        codes = torch.from_numpy(np.stack([np.frombuffer(k, dtype=np.int64) for k in keys]))
        states = torch.stack([self._states[k] for k in keys])
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"codes": codes, "h_eos": states.contiguous()}, tmp)

    # ------------------------------------------------------------------ use

    def for_step(self, batches: Sequence[Batch]) -> list[torch.Tensor]:
        """Cached h_eos of each batch's images. An image not in the cache (on any rank) makes every rank run
        one pass over its misses first (a plan the cache did not foresee, e.g. more epochs)."""
        wanted = [b.image_codes.cpu().numpy() for b in batches]
        missing = np.unique(
            np.concatenate([w for w in wanted if len(w)] or [np.zeros((0, 1), np.int64)]), axis=0
        )
        missing = [r for r in missing if _key(r) not in self._states]
        if _max_over_ranks(int(bool(missing)), self.device):
            width = max((w.shape[1] for w in wanted if w.size), default=1)
            self._compute(np.stack(missing) if missing else None, width)
        return [
            torch.stack([self._states[_key(r)] for r in w]).to(self.device)
            if len(w)
            else torch.zeros(0, self.width, dtype=self.dtype, device=self.device)
            for w in wanted
        ]


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


H_EOS_PARTS = ("llm.model.", "vocab_new_rows.embed.")
"""Parameter-name prefixes the h_eos pass reads: the LLM body (text embedding, decoder, final norm) and the
new rows' embedding (the codes and the image specials)."""


def h_eos_fingerprint(module: nn.Module, extra: Iterable[object], device: torch.device) -> str:
    """A hash of what h_eos depends on: the weights the pass reads (:data:`H_EOS_PARTS`; under ZeRO-3 each
    rank hashes its own partitions and the ranks' digests are combined, so a new layout gets a new
    fingerprint) and `extra` (the spec's token ids and the vocabulary layout). Collective."""
    digest = hashlib.sha256(repr(list(extra)).encode())
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith(H_EOS_PARTS):
                local = getattr(param, "ds_tensor", param).detach()
                digest.update(name.encode())
                digest.update(local.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()), dtype=torch.uint8, device=device)
    if dist.is_initialized():
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        mine = torch.cat(parts)
    return hashlib.sha256(mine.cpu().numpy().tobytes()).hexdigest()[:16]


def frozen_llm(trainable: Sequence[str]) -> bool:
    """Whether h_eos is a constant of the stage: nothing the pass reads trains."""
    return not {"llm", "vocab_new_rows"} & set(trainable)
