"""Sequence packing on a 665K-like length mix: padding share and training samples/s, packed vs unpacked.

Two parts, both against the unpacked loader measured in the same run:

1. **The plan at 7B shapes** (no model): a whole epoch of a LLaVA-665K-like mix (sample counts of the
   LLaVA-1.5 mixture, text lengths assumed per source, 178 positions per image: 34 discrete + 144 kept
   patches) cut into micro-batches of 16 rows and ``data.max_length`` 2048, as the loader plans them:
   unpacked in random order, unpacked with length grouping (the loader's default) and packed (also at 4
   rows, which keeps about LLaVA-1.5's 256 samples a step). Padding share = positions a micro-batch holds
   beyond its real tokens (rows x its longest row) over all it holds.
2. **The training step at CPU shapes**: fwd + bwd of a small ``MavenModel``'s stage-4 parts on the same
   ``--samples`` samples of the mix (text lengths scaled by ``--text-scale`` to fit rows of ``--max-length``
   on a CPU): micro-batches of ``--micro`` samples drawn from the loader's grouped plan, and the same
   samples packed into micro-batches of ``--micro`` rows; whole passes over them alternate between the
   arms and the median of ``--repeats`` counts. Packed rows run with the block-diagonal mask (SDPA), the
   only path on a CPU, which computes every row's full 512 x 512 scores: the default width 1024 at rows
   of 512 gives attention the share of a token's work it has at 7B (width 4096, rows of 2048).

    python bench/packing.py [--samples 96] [--repeats 3] [--max-length 512] [--text-scale 0.25] [--hidden 1024]

It prints ``ratio samples/s packed/unpacked X`` last.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, VocabLayout
from maven_dist.data.formats import Example, collate
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.loader import epoch_packed_steps, epoch_steps
from maven_dist.data.packing import PackingBudget, collate_packed, pack_micro_batches
from maven_dist.model.maven import MavenModel

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness

SOURCES = [
    # (source, samples, images per sample, median text tokens, sigma of log length)
    # Sample counts: the LLaVA-1.5 instruction mixture (Liu et al. 2023, "Improved Baselines with Visual
    # Instruction Tuning", Table 7). Text lengths (Vicuna tokens: prompt, answers, template) are assumed,
    # log-normal per source: short-answer VQA sets grouped into multi-turn conversations per image, long
    # free-form LLaVA and region answers, long text-only ShareGPT. With length grouping this mix pads 3.6%
    # of its positions, close to the ~4% issue 16 reports for the real 665K.
    ("llava_instruct", 158_000, 1, 230, 0.55),
    ("sharegpt", 40_000, 0, 900, 0.8),
    ("vqav2", 83_000, 1, 180, 0.45),
    ("gqa", 72_000, 1, 250, 0.45),
    ("okvqa", 9_000, 1, 80, 0.4),
    ("ocrvqa", 80_000, 1, 180, 0.4),
    ("aokvqa", 66_000, 1, 90, 0.4),
    ("textcaps", 22_000, 1, 60, 0.3),
    ("refcoco", 48_000, 1, 250, 0.5),
    ("vg", 86_000, 1, 250, 0.5),
]


Plan = list[list[list[int]]]
"""Micro-batches, each as its rows of sample indices (unpacked: one sample per row)."""


@dataclass
class Mix:
    """Sample lengths and image counts, shaped like the loader's ``ShardIndex`` for its planners."""

    lengths: np.ndarray
    num_images: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def mix_665k(
    per_image: int, max_length: int, text_scale: float = 1.0, size: float = 1.0, seed: int = 0
) -> Mix:
    """The mix at `per_image` positions per image, `size` times as many samples; longer than `max_length`
    is left out (preparation rejects it)."""
    rng = np.random.default_rng(seed)
    lengths, images = [], []
    for _, full_count, k, median, sigma in SOURCES:
        count = max(1, round(full_count * size))
        text = np.maximum(8, rng.lognormal(np.log(median * text_scale), sigma, count)).astype(np.int64)
        lengths.append(text + k * per_image)
        images.append(np.full(count, k, dtype=np.int64))
    lengths, images = np.concatenate(lengths), np.concatenate(images)
    fits = lengths <= max_length
    return Mix(lengths[fits], images[fits])


def unpacked_batches(mix: Mix, micro: int, global_batch: int, group: bool, seed: int = 0) -> Plan:
    """The loader's unpacked micro-batches of epoch 0, each as rows of one sample."""
    steps = epoch_steps(mix, seed, 0, global_batch, shuffle=True, group_by_length=group)
    return [[[i] for i in step[k : k + micro]] for step in steps for k in range(0, global_batch, micro)]


def packed_batches(mix: Mix, micro: int, global_batch: int, max_length: int, seed: int = 0) -> Plan:
    budget = PackingBudget(rows=micro, row_length=max_length)
    steps = epoch_packed_steps(mix, mix.lengths, seed, 0, global_batch // micro, budget, shuffle=True)
    return [batch for step in steps for batch in step]


def padding_share(mix: Mix, batches: Plan) -> float:
    used = held = 0
    for rows in batches:
        row_lengths = [int(mix.lengths[row].sum()) for row in rows]
        used += sum(row_lengths)
        held += len(rows) * max(row_lengths)
    return 1 - used / held


def plan_report(args) -> dict[str, dict[str, float]]:
    """The epoch's plan three ways at 16 rows x 2048 and a global batch of 256 rows (LLaVA-1.5's stage-4
    batch, unpacked); packed also at 4 rows and 64 rows a step, which keeps about 256 samples a step."""
    mix = mix_665k(per_image=178, max_length=2048, size=args.mix_size)
    print(f"plan: 665K-like mix, {len(mix)} samples ({mix.num_images.sum()} images), mean {mix.lengths.mean():.0f} "
          f"positions, rows of 2048")  # fmt: skip
    arms = {}
    for name, micro, global_batch, build in (
        ("unpacked, random order", 16, 256, lambda m, g: unpacked_batches(mix, m, g, group=False)),
        ("unpacked, length grouping", 16, 256, lambda m, g: unpacked_batches(mix, m, g, group=True)),
        ("packed", 16, 256, lambda m, g: packed_batches(mix, m, g, 2048)),
        ("packed, 4 rows", 4, 64, lambda m, g: packed_batches(mix, m, g, 2048)),
    ):
        start = time.perf_counter()
        batches = build(micro, global_batch)
        seconds = time.perf_counter() - start
        samples = sum(len(row) for rows in batches for row in rows) / len(batches)
        arms[name] = (len(batches), padding_share(mix, batches))
        print(f"  {name:27s} padding {100 * arms[name][1]:5.1f}%  {len(batches):6d} micro-batches/epoch of "
              f"{micro:2d} rows  {samples:5.1f} samples each  {samples * global_batch / micro:6.0f} per step "
              f"({global_batch} rows)  planned in {seconds:.1f} s")  # fmt: skip
    grouped, packed = arms["unpacked, length grouping"], arms["packed"]
    print(f"  micro-batches per epoch packed/grouped: {packed[0] / grouped[0]:.3f}")
    return {name: {"micro_batches": n, "padding_share": share} for name, (n, share) in arms.items()}


def build_model(args) -> tuple[MavenModel, VocabLayout]:
    """The tiny preset's stage 4 (112 px tower, 2 layers; alpha 0.25) with an LLM of ``--hidden`` x
    ``--layers``. A small text vocabulary and codebook keep the LLM body the larger share of a token's
    work, as at 7B (the head is ~2.5% of Vicuna-7B's per-token FLOPs); the codebook plays no part here."""
    heads, width = args.hidden // 64, args.hidden
    overrides = [f"model.llm.hidden_size={width}", f"model.llm.num_layers={args.layers}",
                 f"model.llm.num_heads={heads}", f"model.llm.num_kv_heads={heads}",
                 f"model.llm.intermediate_size={width * 8 // 3}", "model.llm.max_position_embeddings=4096",
                 "model.vision.num_layers=2", "model.discrete.codebook_size=1024", "model.vocab.pad_to_multiple_of=1024",
                 "stage.gradient_checkpointing=false"]  # fmt: skip
    cfg, _ = harness.load_preset("tiny", overrides)
    model = harness.build_model(cfg, text_vocab=1000)
    return model, model.layout


def example(i: int, mix: Mix, layout: VocabLayout, per_image: int, rng: np.random.Generator) -> Example:
    """Sample `i` of the mix as the loader would decode it: BOS, a prompt with its image placeholders, an
    answer (labelled) filling the rest of its length."""
    images = int(mix.num_images[i])
    text = int(mix.lengths[i]) - images * per_image
    ids = rng.integers(3, layout.text_size, text).tolist()
    ids[0] = 1
    for k in range(images):
        ids[1 + k] = IMAGE_PLACEHOLDER_ID
    prompt = max(1 + images, text // 3)
    labels = [IGNORE_INDEX] * prompt + ids[prompt:]
    pixels = [torch.from_numpy(rng.standard_normal((3, 112, 112), dtype=np.float32)) for _ in range(images)]
    codes = rng.integers(0, layout.codebook_size, (images, 32)).tolist()
    return Example(str(i), pixels, codes, ids, labels, length=int(mix.lengths[i]))


def step_report(args) -> dict[str, float]:
    """Both arms train on the same samples: micro-batches drawn at random from the loader's grouped,
    unpacked plan of an epoch (so the unpacked arm pads as the loader does), and their samples packed
    into micro-batches of ``--micro`` rows. Returns the ratio of samples/s, packed over unpacked."""
    model, layout = build_model(args)
    per_image = 34 + model.num_kept
    mix = mix_665k(per_image, args.max_length, args.text_scale, args.mix_size, seed=1)
    micro = args.micro
    rng = np.random.default_rng(0)
    grouped = unpacked_batches(mix, micro, micro * 16, group=True)
    drawn = [grouped[k] for k in rng.permutation(len(grouped))[: -(-args.samples // micro)]]
    budget = PackingBudget(rows=micro, row_length=args.max_length)
    position = np.argsort(rng.permutation(len(mix)))  # any fixed order stands in for the epoch's

    def packed(rows_of_unpacked):
        ids = sorted((row[0] for rows in rows_of_unpacked for row in rows), key=lambda i: position[i])
        return pack_micro_batches(ids, mix.lengths, mix.num_images, budget)

    plans = {"unpacked (grouped)": drawn, "packed": packed(drawn)}
    transform = ImageTransform(112)

    examples = {row[0]: example(row[0], mix, layout, per_image, rng) for rows in drawn for row in rows}

    def batch_of(name: str, rows: list[list[int]]):
        rows_of = [[examples[i] for i in row] for row in rows]
        if name == "packed":
            return collate_packed(rows_of, 0, transform, args.max_length)
        return collate([e for row in rows_of for e in row], 0, transform)

    batches = {name: [batch_of(name, rows) for rows in plan] for name, plan in plans.items()}
    num_samples = sum(b.num_samples for b in batches["packed"])
    print(f"step: stage-4 fwd+bwd, LLM {args.layers} x {args.hidden}, micro-batch {micro} rows, max_length "
          f"{args.max_length}, text lengths x{args.text_scale}, {per_image} positions per image; both arms "
          f"train on the same {num_samples} samples, median of {args.repeats} passes")  # fmt: skip

    def one_pass(name: str) -> float:
        start = time.perf_counter()
        for batch in batches[name]:
            model.zero_grad(set_to_none=True)
            model(batch, views=("discrete", "continuous"), loss="lm").loss.backward()
        return time.perf_counter() - start

    for name in plans:  # warm-up: the allocator and the kernels see every shape once
        one_pass(name)
    seconds = {name: [] for name in plans}
    for r in range(args.repeats):  # whole passes, alternating which arm goes first: the same machine load
        for name in list(plans)[:: 1 if r % 2 == 0 else -1]:
            seconds[name].append(one_pass(name))
    rates = {}
    for name, bs in batches.items():
        used = sum(int(b.attention_mask.sum()) + b.num_images * (per_image - 1) for b in bs)
        held = sum(int(b.attention_mask.shape[0]) * _longest_row(b, per_image) for b in bs)
        median = statistics.median(seconds[name])
        rates[name] = num_samples / median
        print(f"  {name:19s} {rates[name]:6.2f} samples/s  {used / median:8.0f} tokens/s  padding "
              f"{100 * (1 - used / held):4.1f}%  ({len(bs)} micro-batches; passes "
              f"{', '.join(f'{t:.1f}' for t in seconds[name])} s)")  # fmt: skip
    return rates


def _longest_row(batch, per_image: int) -> int:
    """Assembled positions of the batch's longest row (each placeholder becomes `per_image` positions)."""
    real = batch.attention_mask.sum(dim=1)
    placeholders = ((batch.input_ids == IMAGE_PLACEHOLDER_ID) & batch.attention_mask.bool()).sum(dim=1)
    return int((real + placeholders * (per_image - 1)).max())


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns its figures: ``plan`` {arm: micro-batches and padding share} at 7B shapes,
    ``samples_per_s`` {arm: rate} of the step bench and ``ratio`` (packed over unpacked samples/s)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=96, help="samples each arm of the step bench trains on")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed passes over them per arm (the median counts)"
    )
    p.add_argument("--micro", type=int, default=8, help="rows per micro-batch in the step bench")
    p.add_argument("--max-length", type=int, default=512, help="positions per row in the step bench")
    p.add_argument("--text-scale", type=float, default=0.25, help="text lengths of the mix, scaled for a CPU")
    p.add_argument("--hidden", type=int, default=1024, help="LLM width in the step bench")
    p.add_argument("--layers", type=int, default=2, help="LLM layers in the step bench")
    p.add_argument("--mix-size", type=float, default=1.0, help="samples of the mix, as a fraction of 665K's")
    args = p.parse_args(argv)
    print(f"hardware: {harness.hardware()}")
    plan = plan_report(args)
    rates = step_report(args)
    ratio = rates["packed"] / rates["unpacked (grouped)"]
    print(f"ratio samples/s packed/unpacked {ratio:.2f}")
    return {"plan": plan, "samples_per_s": rates, "ratio": ratio}


if __name__ == "__main__":
    main()
