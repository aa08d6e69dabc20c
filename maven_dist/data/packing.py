"""Sequence packing (``data.packing``): micro-batches of rows that each hold several samples.

Unpacked, a micro-batch is ``stage.micro_batch_size`` samples padded to its longest, so its size is
bound by the longest sample it might hold. Packed, a micro-batch is a *budget*: at most
``stage.micro_batch_size`` rows of at most ``data.max_length`` positions (the unpacked micro-batch's
worst case, so the memory plan holds as it is) and at most ``data.pack_max_images`` images (the tower,
selector and projector work per image), filled from the epoch's shuffled order
(:func:`pack_micro_batches`). The plan needs every sample's length before anything is decoded: the
shards' ``num_tokens`` moved to the stage's positions per image (:func:`~maven_dist.data.loader.stage_lengths`).

The plan is a pure function of the epoch's sample order and the lengths, like the unpacked one, so a
packed run still resumes exactly and sees the same micro-batches on any number of data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import IGNORE_INDEX
from maven_dist.data.formats import Example, collate_images

PackedBatch = list[list[int]]
"""One planned micro-batch: its rows, each a list of sample indices in row order."""


@dataclass(frozen=True)
class PackingBudget:
    """What one packed micro-batch may hold."""

    rows: int
    """Rows per micro-batch (``stage.micro_batch_size``)."""
    row_length: int
    """Positions per row (``data.max_length``)."""
    max_images: int = 0
    """Images per micro-batch (``data.pack_max_images``); 0: only the positions bound them."""


def pack_micro_batches(
    order: Sequence[int], lengths: np.ndarray, num_images: np.ndarray, budget: PackingBudget
) -> list[PackedBatch]:
    """Samples `order` (indices into `lengths` / `num_images`) into micro-batches of packed rows.

    Each micro-batch takes the samples left over from the previous one, then the next ones in `order`
    until they hold as many positions as the micro-batch does, and places them longest first, each into
    the first row with room (first fit decreasing); what fits nowhere, or would pass the image budget,
    is carried over to the next micro-batch. A sample longer than a row (skipped as too long when it is
    decoded) takes a row of its own, so every sample is planned once and then accounted for.

    Why not first fit in plain order: a micro-batch closed at its first misfit keeps the gaps that later,
    shorter samples would fill; on the 665K-like mix of ``bench/packing.py`` (16 rows of 2048) that pads
    5.1% of the positions against 2.6% here. Sorting by length first (``data.group_by_length``) is worse
    still, 11.6%: every micro-batch then holds samples of one length and nothing fills the gaps.
    """
    length_of, images_of = lengths.tolist(), num_images.tolist()
    row_length, max_rows, max_images = budget.row_length, budget.rows, budget.max_images
    capacity = max_rows * row_length
    order = [int(i) for i in order]
    batches: list[PackedBatch] = []
    carried: list[int] = []
    taken = 0
    while taken < len(order) or carried:
        window, positions = carried, sum(min(length_of[i], row_length) for i in carried)
        while taken < len(order) and positions < capacity:
            window.append(order[taken])
            positions += min(length_of[order[taken]], row_length)
            taken += 1
        window.sort(key=lambda i: -length_of[i])  # stable: equal lengths keep the epoch's order
        rows: PackedBatch = []
        free: list[int] = []
        images, carried = 0, []
        for i in window:
            need, k = min(length_of[i], row_length), images_of[i]
            if max_images and rows and images + k > max_images:
                carried.append(i)
                continue
            row = next((r for r, room in enumerate(free) if room >= need), len(rows))
            if row == len(rows):
                if row == max_rows:
                    carried.append(i)
                    continue
                rows.append([])
                free.append(row_length)
            rows[row].append(i)
            free[row] -= need
            images += k
        batches.append(rows)
    return batches


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, transform, row_length: int) -> Batch:
    """Lay each row's examples end to end, right-pad the rows, and number the samples row-major in
    ``segment_ids`` (images and ``sample_ids`` follow the same order, as :class:`Batch` requires).

    The plan placed samples by their estimated lengths; a row whose decoded samples turn out longer than
    `row_length` (an estimate below the truth: shards without a manifest) moves the samples that overflow
    into the first row with room, or a new one, so no row is ever longer than planned."""
    rows = _refit(rows, row_length)
    examples = [e for row in rows for e in row]
    batch = collate_images(examples, transform)  # images, codes and ids in row-major sample order
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    sample = 0
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            span = slice(start, start + len(e.input_ids))
            input_ids[r, span] = torch.tensor(e.input_ids)
            labels[r, span] = torch.tensor(e.labels)
            mask[r, span] = 1
            segment_ids[r, span] = sample
            start, sample = span.stop, sample + 1
    batch.input_ids, batch.labels, batch.attention_mask = input_ids, labels, mask
    batch.segment_ids = segment_ids
    return batch


def _refit(rows: Sequence[Sequence[Example]], row_length: int) -> list[list[Example]]:
    kept: list[list[Example]] = []
    used: list[int] = []
    overflow: list[Example] = []
    for row in rows:
        mine, total = [], 0
        for e in row:
            if mine and total + e.length > row_length:
                overflow.append(e)
                continue
            mine.append(e)
            total += e.length
        if mine:
            kept.append(mine)
            used.append(total)
    for e in overflow:
        r = next((r for r, total in enumerate(used) if total + e.length <= row_length), len(kept))
        if r == len(kept):
            kept.append([])
            used.append(0)
        kept[r].append(e)
        used[r] += e.length
    return kept
