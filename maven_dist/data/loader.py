"""The resumable, data-parallel shard loader.

Design: the main process owns the *step order* and workers only decode. From a small index (each
sample's length and image count, read from the memory-mapped shards) it computes, for every
(seed, epoch), the same global list of optimizer-step groups on every rank; rank r takes its slice
of each group. Resuming is "start at batch k of epoch e": workers are handed batch indices, never
iterator state, so the position is exact whatever ``num_workers`` was or is.

Per epoch:

1. permute all samples with ``numpy.random.default_rng([seed, epoch])`` (or keep file order);
2. if ``data.group_by_length``: cut the permutation into windows of ``GROUP_STEPS`` steps and sort
   each window by (number of images, length, descending) so a step's samples share a modality and
   a length — less padding, and ranks get balanced work at each step (LLaVA's
   ``group_by_modality_length`` does the same within megabatches); then shuffle the order of the
   steps so long and short steps interleave;
3. drop the incomplete last step (every rank must take the same number of steps).

With ``data.packing`` a step is ``global_batch_size / micro_batch_size`` micro-batches of packed rows
instead, filled from the same permutation (no length grouping: ``maven_dist/data/packing.py``); rank r
takes its micro-batches of each step as above.

Shards are read with ``pyarrow.memory_map``: a worker touches only the pages of the rows it decodes.
Samples that fail at load time (an undecodable image, a missing code list, too long for this stage)
are logged with shard, row and id, counted in ``num_skipped`` and left out of their batch, or stop
the run when ``data.strict`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from maven_dist.contract.batch import Batch
from maven_dist.contract.lengths import visual_tokens_per_image
from maven_dist.contract.preemption import ignore_preemption_signals
from maven_dist.contract.vocab import VocabLayout
from maven_dist.data.formats import BadSample, DataError, Example, SampleFormat, collate, make_example
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.packing import PackedBatch, PackingBudget, collate_packed, pack_micro_batches
from maven_dist.data.shards import list_shards, read_shard
from maven_dist.data.workers import worker_context

logger = logging.getLogger(__name__)

GROUP_STEPS = 8
"""Steps per length-grouping window: larger groups pad less, smaller ones stay closer to random."""


Split = Literal["all", "train", "val"]

ShardDirs = str | Path | Sequence[str | Path]
"""One shards directory, or several read as one data set (stage 1: COCO and Visual Genome labels)."""


def as_shard_dirs(shards_dirs: ShardDirs) -> list[Path]:
    """The directories of `shards_dirs` as a list of paths."""
    if isinstance(shards_dirs, (str, Path)):
        return [Path(shards_dirs)]
    return [Path(d) for d in shards_dirs]


def _describe(dirs: list[Path]) -> str:
    return str(dirs[0]) if len(dirs) == 1 else "[" + ", ".join(map(str, dirs)) + "]"


def is_held_out(sample_id: str, fraction: float) -> bool:
    """Whether a sample belongs to the validation split: a hash of its id, so every stage, rank and rerun
    holds out the same samples whatever the shard order (the seed plays no part)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(f"val:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class ShardIndex:
    """Where every sample of a split lives and the two numbers the step order needs (length, image count).

    ``shards_dir`` is one directory or several, concatenated in the order given (their shards must have
    the same columns). ``split`` selects the samples: all, or those :func:`is_held_out` puts in (``val``)
    or keeps out of (``train``) the validation split of ``val_fraction``."""

    def __init__(self, shards_dir: ShardDirs, split: Split = "all", val_fraction: float = 0.0) -> None:
        self.dirs = as_shard_dirs(shards_dir)
        if not self.dirs:
            raise DataError("no shards directory given: set data.path to one directory or a list of them")
        self.paths: list[Path] = []
        dir_of_shard: list[int] = []
        for j, d in enumerate(self.dirs):
            found = list_shards(d)
            if not found:
                raise DataError(f"no shards (shard-*.arrow) in {d}: run maven prepare first")
            self.paths += found
            dir_of_shard += [j] * len(found)
        lengths, images, shard_of, row_of, columns = [], [], [], [], None
        for k, path in enumerate(self.paths):
            table = read_shard(path)
            if table.num_rows and columns is None:
                columns = table.column_names
            elif table.num_rows and set(table.column_names) != set(columns):
                raise DataError(
                    f"{path} has columns {table.column_names}, other shards {columns}; re-run the tool that added "
                    "them (several data.path directories need the same columns: the same maven prepare flags, "
                    "labels and codes)"
                )
            keep = np.ones(table.num_rows, dtype=bool)
            if split != "all":
                held = np.array(
                    [is_held_out(str(i), val_fraction) for i in table["id"].to_pylist()], dtype=bool
                )
                keep = held if split == "val" else ~held
            lengths.append(table["num_tokens"].to_numpy(zero_copy_only=False)[keep])
            images.append(pc.list_value_length(table["images"]).to_numpy(zero_copy_only=False)[keep])
            shard_of.append(np.full(int(keep.sum()), k, dtype=np.int64))
            row_of.append(np.flatnonzero(keep).astype(np.int64))
        self.column_names: list[str] = list(columns or [])
        self.lengths = np.concatenate(lengths).astype(np.int64)
        self.num_images = np.concatenate(images).astype(np.int64)
        self.shard_of = np.concatenate(shard_of)
        self.row_of = np.concatenate(row_of)
        self.dir_of = np.asarray(dir_of_shard, dtype=np.int64)[self.shard_of]
        """Per sample: which of ``dirs`` it comes from."""

    def __len__(self) -> int:
        return len(self.lengths)

    def locate(self, index: int) -> tuple[int, int]:
        """Sample index (within the split) -> (shard number, row)."""
        return int(self.shard_of[index]), int(self.row_of[index])


def epoch_steps(
    index: ShardIndex,
    seed: int,
    epoch: int,
    step_size: int,
    shuffle: bool,
    group_by_length: bool,
) -> list[list[int]]:
    """Every optimizer step of the epoch as global sample indices (`step_size` = the global batch).

    The order depends on the global batch only, not on how it is split over ranks and accumulation
    micro-batches: a run on 2 ranks sees the same samples per step as 1 rank accumulating twice,
    which is what makes data-parallel parity and resuming on another dp size possible."""
    n, per_step = len(index), step_size
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    num_steps = n // per_step
    order = order[: num_steps * per_step]
    if group_by_length:
        _group_windows(order, index.lengths, index.num_images, per_step * GROUP_STEPS)
    steps = [order[s * per_step : (s + 1) * per_step].tolist() for s in range(num_steps)]
    if group_by_length and shuffle:
        steps = [steps[k] for k in rng.permutation(num_steps)]
    return steps


def epoch_packed_steps(
    index: ShardIndex,
    lengths: np.ndarray,
    seed: int,
    epoch: int,
    batches_per_step: int,
    budget: PackingBudget,
    shuffle: bool,
) -> list[list[PackedBatch]]:
    """The packed epoch (``data.packing``): every optimizer step as `batches_per_step` micro-batches of
    packed rows (:func:`~maven_dist.data.packing.pack_micro_batches`), from `lengths`, each sample's
    positions at this stage.

    The same permutation as :func:`epoch_steps`, packed in that order; the incomplete last step is
    dropped. Length grouping does not apply: packing fills each micro-batch longest first from the next
    samples, which pads less than grouping does (``pack_micro_batches``). A step holds as many samples as
    its rows take, so the number of steps per epoch depends on the lengths and the order (and differs a
    little between epochs)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(index)) if shuffle else np.arange(len(index))
    batches = pack_micro_batches(order, lengths, index.num_images, budget)
    num_steps = len(batches) // batches_per_step
    return [batches[s * batches_per_step : (s + 1) * batches_per_step] for s in range(num_steps)]


def _group_windows(order: np.ndarray, lengths: np.ndarray, num_images: np.ndarray, window: int) -> None:
    """Sort each `window` of `order` in place by (number of images, length descending)."""
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        # lexsort: last key is primary -> by image count, then by length, longest first.
        keys = np.lexsort((-lengths[chunk], num_images[chunk]))
        order[start : start + window] = chunk[keys]


class _BatchReader:
    """Decodes one planned batch; lives in the DataLoader workers (each opens shards lazily).

    A planned batch is a list of sample indices, or with `packing` a list of rows of them."""

    def __init__(
        self,
        index: ShardIndex,
        spec: SampleFormat,
        tokenizer,
        layout,
        transform,
        pad_id: int,
        strict: bool,
        packing: bool = False,
    ):
        self.paths, self.shard_of, self.row_of = index.paths, index.shard_of, index.row_of
        self.spec, self.tokenizer, self.layout, self.transform = spec, tokenizer, layout, transform
        self.pad_id, self.strict, self.packing = pad_id, strict, packing
        self._tables: dict[int, object] = {}

    def __getstate__(self) -> dict:
        # Sent to every worker (forkserver): the shards a process opened are memory maps of its own.
        return self.__dict__ | {"_tables": {}}

    def _table(self, shard: int):
        if shard not in self._tables:
            self._tables[shard] = read_shard(self.paths[shard]).select(self.spec.columns)
        return self._tables[shard]

    def __call__(self, planned: list[int] | PackedBatch) -> tuple[Batch | None, list[str]]:
        skipped: list[str] = []
        if self.packing:
            rows = [[e for g in row if (e := self._example(g, skipped)) is not None] for row in planned]
            rows = [row for row in rows if row]
            batch = collate_packed(rows, self.pad_id, self.transform, self.spec.max_length) if rows else None
            return batch, skipped
        examples = [e for g in planned if (e := self._example(g, skipped)) is not None]
        batch = collate(examples, self.pad_id, self.transform) if examples else None
        return batch, skipped

    def _example(self, g: int, skipped: list[str]) -> Example | None:
        shard, row_number = int(self.shard_of[g]), int(self.row_of[g])
        row = self._table(shard).slice(row_number, 1).to_pylist()[0]
        try:
            return make_example(self.spec, row, self.tokenizer, self.layout, self.transform)
        except (BadSample, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            path = self.paths[shard]
            message = f"{path.parent.name}/{path.name} row {row_number} (id {row['id']!r}): {err}"
            if self.strict:
                raise DataError(f"bad sample (data.strict is set): {message}") from err
            skipped.append(message)
            return None


class _PlannedBatches(torch.utils.data.Dataset):
    def __init__(self, batches: list[list[int]] | list[PackedBatch], reader: _BatchReader) -> None:
        self.batches, self.reader = batches, reader

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[Batch | None, list[str]]:
        return self.reader(self.batches[k])


def _unchanged(item):
    return item


def _init_worker(_worker_id: int) -> None:
    # Slurm signals every process of the step; a worker killed by TERM would make its rank raise
    # before it can checkpoint. Workers ignore the signals and end with their rank.
    ignore_preemption_signals()


def worker_loader(
    dataset: torch.utils.data.Dataset,
    num_workers: int,
    seed: int,
    prefetch_factor: int | None = None,
    preload: Sequence[str] = (),
) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset`'s items as they are (one item: one planned batch), in order, decoded by
    `num_workers` helper processes started from a fork server (``maven_dist/data/workers.py``: never a fork
    of this threaded process; `preload`: modules the workers need that the server should import once) that
    ignore the preemption signals; 0: in this process."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_unchanged,
        multiprocessing_context=worker_context(preload) if num_workers else None,
        worker_init_fn=_init_worker if num_workers else None,
        # The workers' base seed comes from this generator, not torch's global RNG: building an
        # iterator (a validation pass, a new epoch) then changes nothing the training computes.
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=prefetch_factor if num_workers else None,
    )


class ShardLoader:
    """Iterates :class:`Batch` es of ``micro_batch_size`` samples forever, epoch after epoch; with
    `packing`, of at most ``micro_batch_size`` packed rows of at most ``spec.max_length`` positions and
    ``pack_max_images`` images (``maven_dist/data/packing.py``), and ``global_batch_size`` counts rows.

    ``state_dict()`` taken after the k-th yielded batch resumes, via ``load_state_dict``, at batch
    k+1 exactly, with any ``num_workers``. Call ``load_state_dict`` before ``iter()``, and iterate
    with one iterator at a time (they share the position).
    """

    def __init__(
        self,
        shards_dir: ShardDirs,
        spec: SampleFormat,
        tokenizer,
        layout: VocabLayout | None,
        transform: ImageTransform,
        micro_batch_size: int,
        global_batch_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        num_workers: int = 2,
        dp_rank: int = 0,
        dp_size: int = 1,
        strict: bool = False,
        split: Split = "all",
        val_fraction: float = 0.0,
        packing: bool = False,
        pack_max_images: int = 0,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.index = ShardIndex(shards_dir, split, val_fraction)
        where = _describe(self.index.dirs)
        spec.check_columns(self.index.column_names, f"shards in {where}")
        self.spec, self.transform = spec, transform
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.group_by_length, self.num_workers = group_by_length, num_workers
        self.dp_rank, self.dp_size, self.strict = dp_rank, dp_size, strict
        self.global_batch_size = global_batch_size or micro_batch_size * dp_size
        if self.global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x dp_size = "
                f"{micro_batch_size} x {dp_size}"
            )
        self.accumulation = self.global_batch_size // (micro_batch_size * dp_size)
        self.packing = packing
        self.budget = PackingBudget(micro_batch_size, spec.max_length, pack_max_images)
        self.lengths = stage_lengths(self.index, spec) if packing else self.index.lengths
        """Each sample's positions at this stage (what packing fills rows with)."""
        # The last epoch planned, (epoch, this rank's batches): packing 665K samples takes ~4 s.
        self._plan: tuple[int, list] | None = None
        self.batches_per_epoch = len(self.epoch_batches(0))
        """This rank's micro-batches in an epoch (packed: in epoch 0; other epochs differ a little)."""
        if self.batches_per_epoch == 0:
            what = "packed micro-batches" if packing else "samples"
            raise DataError(
                f"{len(self.index)} samples in {where} cannot fill one step of "
                f"global_batch_size={self.global_batch_size} ({what}); lower the batch size or add data"
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self._reader = _BatchReader(self.index, spec, tokenizer, layout, transform, pad_id, strict, packing)
        self.epoch, self.next_batch, self.num_skipped = 0, 0, 0
        self.too_long = 0
        """Samples estimated too long for this stage before training (:func:`samples_too_long`)."""

    def epoch_batches(self, epoch: int) -> list[list[int]] | list[PackedBatch]:
        """This rank's micro-batches of `epoch` as global sample indices (packed: rows of them): of each
        step's micro-batches (in epoch order) rank r takes r, r + dp, r + 2 dp, ..."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        micro = self.micro_batch_size
        if self.packing:
            per_step = self.global_batch_size // micro
            steps = epoch_packed_steps(
                self.index, self.lengths, self.seed, epoch, per_step, self.budget, self.shuffle
            )
        else:
            steps = [
                [step[k : k + micro] for k in range(0, len(step), micro)]
                for step in epoch_steps(
                    self.index, self.seed, epoch, self.global_batch_size, self.shuffle, self.group_by_length
                )
            ]
        mine = [batch for step in steps for batch in step[self.dp_rank :: self.dp_size]]
        self._plan = (epoch, mine)
        return mine

    def __iter__(self) -> Iterator[Batch]:
        empty_batches = 0  # consecutive planned batches with no usable sample
        while True:
            planned = self.epoch_batches(self.epoch)
            batches = planned[self.next_batch :]
            for batch, skipped in self._workers(batches, prefetch_factor=4):
                self.next_batch += 1
                if self.next_batch == len(planned):
                    self.epoch, self.next_batch = self.epoch + 1, 0
                for message in skipped:
                    logger.warning("skipped bad sample %s", message)
                self.num_skipped += len(skipped)
                if batch is not None:
                    empty_batches = 0
                    yield batch
                    continue
                empty_batches += 1
                if empty_batches >= self.batches_per_epoch:
                    # A whole epoch's worth of batches without one usable sample: looping on would
                    # spin forever (e.g. data.max_length below every sample of this view).
                    raise DataError(
                        f"no usable sample in {empty_batches} consecutive batches (a full epoch) of "
                        f"{_describe(self.index.dirs)}; {self.num_skipped} samples skipped so far, see the "
                        "'skipped bad sample' warnings for why (too long for data.max_length, undecodable image, ...)"
                    )

    def one_pass(self) -> Iterator[Batch]:
        """This rank's batches of one epoch in planned order (epoch 0), leaving the loader's own position
        alone: a validation pass. Every rank gets the same number of batches (whole steps only)."""
        for batch, skipped in self._workers(self.epoch_batches(0)):
            for message in skipped:
                logger.warning("skipped bad sample %s", message)
            if batch is not None:
                yield batch

    def _workers(self, batches: list[list[int]], prefetch_factor: int | None = None):
        """(batch, skipped) for each planned batch, decoded by ``num_workers`` processes (or this one)."""
        # The tokenizer's module (transformers') is what unpickling the reader in a worker would import.
        preload = [type(self._reader.tokenizer).__module__]
        dataset = _PlannedBatches(batches, self._reader)
        return worker_loader(dataset, self.num_workers, self.seed, prefetch_factor, preload)

    def image_codes(self, epochs: Iterable[int]) -> np.ndarray:
        """[n, K] the distinct code sequences of the images in this rank's batches of `epochs`, read from the
        shards' ``image_codes`` column ([0, 0] where the shards have none): what a stage with a frozen LLM
        computes h_eos for before its first step (``maven_dist/parallel/h_eos.py``)."""
        if "image_codes" not in self.index.column_names:
            return np.zeros((0, 0), dtype=np.int64)
        samples: set[int] = set()
        for epoch in epochs:
            for batch in self.epoch_batches(epoch):
                if self.packing:
                    samples.update(g for row in batch for g in row)
                else:
                    samples.update(batch)
        rows_by_shard: dict[int, list[int]] = {}
        for g in samples:
            shard, row = self.index.locate(g)
            rows_by_shard.setdefault(shard, []).append(row)
        codes = []
        for shard, rows in rows_by_shard.items():
            column = read_shard(self.index.paths[shard]).select(["image_codes"]).take(sorted(rows))
            # A malformed list (a bad sample: skipped when it is loaded) needs no h_eos.
            k = self.spec.num_codes
            codes += [
                c
                for sample in column["image_codes"].to_pylist()
                if sample
                for c in sample
                if c and len(c) == k
            ]
        if not codes:
            return np.zeros((0, 0), dtype=np.int64)
        return np.unique(np.asarray(codes, dtype=np.int64), axis=0)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "num_skipped": self.num_skipped,
            "seed": self.seed,
            "num_samples": len(self.index),
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
            "dp_size": self.dp_size,
            "packing": self.packing,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at exactly the batch after the one the state was taken at; on another dp size too,
        when the state was taken on an optimizer-step boundary (checkpoints always are)."""
        current = self.state_dict()
        state = {"packing": False} | state  # states saved before packing existed were unpacked
        for key in ("seed", "num_samples", "micro_batch_size", "global_batch_size", "packing"):
            if state.get(key) != current[key]:
                raise ValueError(
                    f"data loader state has {key}={state.get(key)} but this loader has {current[key]} "
                    f"(dp_size {state.get('dp_size')} -> {self.dp_size}): the batch order would differ, so the run "
                    "cannot resume exactly; restore the original data and batch settings"
                )
        next_batch = state["next_batch"]
        if state["dp_size"] != self.dp_size:
            saved_accumulation = self.global_batch_size // (self.micro_batch_size * state["dp_size"])
            if next_batch % saved_accumulation:
                raise ValueError(
                    f"data loader state is {next_batch % saved_accumulation} micro-batches into an optimizer step; "
                    f"it can resume on dp_size={self.dp_size} (saved on {state['dp_size']}) only at a step boundary"
                )
            next_batch = next_batch // saved_accumulation * self.accumulation
        self.epoch, self.next_batch, self.num_skipped = state["epoch"], next_batch, state["num_skipped"]


def _default_transform(cfg) -> ImageTransform:
    tower = cfg.resolve_path(cfg.model.vision.path)
    if (tower / "preprocessor_config.json").is_file():
        return ImageTransform.from_pretrained(tower)
    return ImageTransform(cfg.model.vision.image_size)


def _check_prepared_size(shards_dirs: list[Path], transform: ImageTransform) -> None:
    for shards_dir in shards_dirs:
        manifest = shards_dir / "manifest.json"
        if not manifest.is_file():
            continue
        resize = json.loads(manifest.read_text()).get("options", {}).get("resize", 0)
        if resize and resize != transform.image_size:
            raise DataError(
                f"{shards_dir} stores images resized to {resize} px but the tower takes {transform.image_size} px; "
                f"re-run maven prepare with --resize {transform.image_size} (or without --resize)"
            )


def _prepared_tokens_per_image(shards_dir: Path) -> int | None:
    """Positions per image the shards' ``num_tokens`` were measured with (their ``manifest.json``), or
    None where the directory does not say."""
    manifest = shards_dir / "manifest.json"
    if not manifest.is_file():
        return None
    options = json.loads(manifest.read_text()).get("options", {})
    try:
        return visual_tokens_per_image(
            int(options["num_codes"]),
            int(options["num_patches"]),
            float(options["keep_ratio"]),
            options["views"],
        )
    except (KeyError, TypeError, ValueError):
        return None


def stage_lengths(index: ShardIndex, spec: SampleFormat) -> np.ndarray:
    """Every sample's sequence positions at the stage's positions per image (``spec.tokens_per_image``):
    the shards' ``num_tokens``, each image's share moved from what they were prepared with. Exact for
    conversations in the template they were prepared with, an upper bound for the caption formats (they
    render the first round only, in the shorter ``plain`` template); a directory without a manifest keeps
    its ``num_tokens`` as they are."""
    lengths = index.lengths.copy()
    for j, d in enumerate(index.dirs):
        prepared = _prepared_tokens_per_image(d)
        if prepared is not None:
            mine = index.dir_of == j
            lengths[mine] += index.num_images[mine] * (spec.tokens_per_image - prepared)
    return lengths


def samples_too_long(shards_dir: ShardDirs, index: ShardIndex, spec: SampleFormat) -> int:
    """How many samples of `index` (read from `shards_dir`) would exceed ``spec.max_length`` at the
    stage's positions per image (:func:`stage_lengths`). A directory without a manifest counts 0
    (nothing to compare with)."""
    dirs = as_shard_dirs(shards_dir)
    known = [j for j, d in enumerate(dirs) if _prepared_tokens_per_image(d) is not None]
    too_long = (stage_lengths(index, spec) > spec.max_length) & np.isin(index.dir_of, known)
    return int(too_long.sum())


def _check_fit(shards_dirs: list[Path], index: ShardIndex, spec: SampleFormat, allowed: bool) -> int:
    too_long = samples_too_long(shards_dirs, index, spec)
    where = _describe(shards_dirs)
    if too_long and not allowed:
        raise DataError(
            f"{too_long} of {len(index)} samples in {where} no longer fit data.max_length={spec.max_length} "
            f"at {spec.tokens_per_image} positions per image (keep ratio {spec.keep_ratio}, views "
            f"{list(spec.views)}): they would be skipped and this stage would train on other data than its "
            "peers. Re-prepare the shards for this keep ratio (maven prepare --keep-ratio ... --max-length ...), "
            "raise data.max_length, or set data.allow_too_long=true to skip them"
        )
    if too_long:
        logger.warning(
            "%d samples of %s are too long at this stage's length and will be skipped", too_long, where
        )
    return too_long


def stage_sample_format(cfg, image_size: int) -> SampleFormat:
    """How the stage turns a shard row into a sample (format, template, lengths, views)."""
    grid = image_size // cfg.model.vision.patch_size
    return SampleFormat(
        name=cfg.data.format,
        template=cfg.data.template,
        max_length=cfg.data.max_length,
        num_codes=cfg.model.discrete.num_codes,
        num_patches=grid * grid,
        keep_ratio=cfg.model.selector.keep_ratio,
        views=tuple(cfg.stage.views),
        t2i_fraction=cfg.data.t2i_fraction,
        seed=cfg.seed,
    )


def build_loader(
    cfg,
    tokenizer,
    layout: VocabLayout | None,
    dp_rank: int = 0,
    dp_size: int = 1,
    transform: Callable | None = None,
    split: Literal["train", "val"] = "train",
) -> ShardLoader | None:
    """The loader for ``cfg.data`` / ``cfg.stage`` on data-parallel rank `dp_rank` of `dp_size`.

    ``split="train"``: the training samples (``data.path``, one shards directory or several read as one,
    less the ``data.val_fraction`` held out).
    ``split="val"``: the validation samples (``data.val_path``, else the held-out fraction of ``data.path``;
    None when the recipe has neither), read in file order, one micro-batch per rank per step.
    Samples that no longer fit ``data.max_length`` (:func:`samples_too_long`) stop a training loader
    with a :class:`DataError` unless ``data.allow_too_long``; the count is ``loader.too_long``.
    `transform` defaults to ``ImageTransform.from_pretrained(model.vision.path)`` when that tower
    directory exists, else ``ImageTransform(model.vision.image_size)``.
    """
    data = cfg.data
    if split == "val" and not (data.val_path or data.val_fraction > 0):
        return None
    transform = transform or _default_transform(cfg)
    configured = [data.val_path] if split == "val" and data.val_path else data.paths
    shards_dirs = [cfg.resolve_path(p) for p in configured]
    _check_prepared_size(shards_dirs, transform)
    spec = stage_sample_format(cfg, transform.image_size)
    held_out = data.val_fraction > 0 and not data.val_path
    index_split = ("val" if split == "val" else "train") if held_out else "all"
    val = split == "val"
    micro = cfg.stage.micro_batch_size
    loader = ShardLoader(
        shards_dirs if len(shards_dirs) > 1 else shards_dirs[0],
        spec,
        tokenizer,
        layout,
        transform,
        micro_batch_size=micro,
        global_batch_size=micro * dp_size if val else cfg.stage.global_batch_size,
        seed=cfg.seed,
        shuffle=data.shuffle and not val,
        group_by_length=data.group_by_length and not val,
        num_workers=data.num_workers,
        dp_rank=dp_rank,
        dp_size=dp_size,
        strict=data.strict,
        split=index_split,
        val_fraction=data.val_fraction,
        # Validation stays unpacked: val/loss then compares across runs with and without packing.
        packing=data.packing and not val,
        pack_max_images=data.pack_max_images,
    )
    loader.too_long = _check_fit(shards_dirs, loader.index, spec, data.allow_too_long or val)
    return loader
