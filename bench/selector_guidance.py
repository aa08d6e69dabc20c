"""How much the discrete view guides MaVEn's patch selector, under each way of starting stage 1.

The selector scores patch i by MLP([f_i ; h_eos]); h_eos is the LLM's state after the image's code
block. If every code embeds alike, h_eos is the same for every image and the selector learns from f_i
alone. This bench trains stage 1 on the demo's synthetic set under four starts, in one run:

    init   new input rows at the text rows' mean (transformers' default) or drawn at their scale
    order  stage 1 on the base rows ("1 first"), or after stage 2 has trained the rows ("2 first")

and reports, on held-out synthetic images (another seed): ``selector/h_eos_spread`` at the start of
stage 1, and precision@k of the top-k selection (k = floor(alpha * N), the one the model uses) with the
true h_eos and with h_eos shuffled across images. The gap is what the discrete view contributes.

    python bench/selector_guidance.py [--stage1-steps 400] [--stage2-steps 20] [--seeds 0,1,2] [--work DIR]

CPU-sized (the tiny recipe's shapes, a few minutes on 2 cores); the numbers go into the README.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from maven_dist.config import Config, load_config
from maven_dist.data.loader import build_loader
from maven_dist.data.prepare import PrepareOptions, prepare
from maven_dist.model.frontend import h_eos_spread
from maven_dist.model.parts import apply_trainable
from maven_dist.model.selector import selector_metrics
from maven_dist.offline.demo import prepare_demo
from maven_dist.offline.pseudo_labels.make_labels import make_patch_labels
from maven_dist.offline.shard_jobs import tokenize_shards
from maven_dist.offline.synthetic import generate_synthetic
from maven_dist.parallel.engine import NonFiniteGuard
from maven_dist.parallel.local import LocalEngine
from maven_dist.train.builders import ModelSource, load_stage_tokenizer, model_builder, model_spec

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness

INITS = ("mean", "text_distribution")
ORDERS = ("1 first", "2 first")


def stage_config(work: Path, stage: str, steps: int, init: str, seed: int = 0) -> Config:
    overrides = [
        f"run_dir={work}",
        f"seed={seed}",
        f"stage.max_steps={steps}",
        f"model.vocab.embed_init={init}",
        "data.num_workers=0",
        "tracking.enabled=false",
    ]
    return load_config(f"tests/recipes/tiny/{stage}.yaml", overrides)


def build_eval_set(work: Path, cfg: Config, num_images: int) -> Path:
    """Held-out synthetic images (another seed) through the same offline tools the demo uses."""
    out = work / "data" / "heldout"
    if (out / "manifest.json").is_file():
        return out
    synthetic = generate_synthetic(work / "data" / "heldout_synthetic", num_images, seed=cfg.seed + 1,
                                   image_size=cfg.demo.image_size)  # fmt: skip
    options = PrepareOptions(
        image_root=synthetic.image_root,
        out_dir=out,
        tokenizer_dir=cfg.resolve_path(cfg.model.llm.path),
        template="plain",
        max_length=cfg.data.max_length,
        num_codes=cfg.model.discrete.num_codes,
        num_patches=cfg.model.vision.num_patches,
        keep_ratio=cfg.model.selector.keep_ratio,
        shard_size=64,
        num_workers=0,
        progress=False,
    )
    prepare([synthetic.captions_json], options)
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    make_patch_labels(out, "coco", grid=grid, annotations=[synthetic.instances_json], progress=False)
    tokenize_shards(out, "kmeans", cfg.resolve_path(cfg.model.discrete.path), progress=False)
    return out


def train(model, cfg: Config, tokenizer, layout) -> float:
    """`cfg.stage` for its max_steps on `model` (in place) with the single-process engine; seconds."""
    apply_trainable(model, cfg.stage.trainable)
    loader = build_loader(cfg, tokenizer, layout)
    accumulation = cfg.stage.global_batch_size // cfg.stage.micro_batch_size
    engine = LocalEngine(model, cfg.stage, cfg.stage.max_steps, accumulation)
    guard, batches, start = (
        NonFiniteGuard(cfg.stage.max_bad_steps, cfg.stage.name),
        iter(loader),
        time.perf_counter(),
    )
    for step in range(cfg.stage.max_steps):
        engine.train_step(batches, guard, step + 1)
    batches.close()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model, cfg: Config, tokenizer, layout, shuffles: int = 8) -> dict[str, float]:
    """Spread of h_eos and precision@k with true and shuffled h_eos over every held-out image."""
    loader = build_loader(cfg, tokenizer, layout)
    features, h_eos, labels = [], [], []
    batches = iter(loader)
    for _ in range(loader.batches_per_epoch):
        batch = next(batches)
        features.append(model.vision_tower(batch.pixel_values))
        h_eos.append(model.eos_states(batch.image_codes))
        labels.append(batch.patch_labels)
    batches.close()
    features, h_eos, labels = torch.cat(features), torch.cat(h_eos), torch.cat(labels)
    keep, threshold = model.num_kept, model.spec.label_threshold
    true = selector_metrics(model.selector(features, h_eos), labels, threshold, keep)
    generator = torch.Generator().manual_seed(0)
    shuffled = []
    for _ in range(shuffles):
        perm = torch.randperm(h_eos.shape[0], generator=generator)
        metrics = selector_metrics(model.selector(features, h_eos[perm]), labels, threshold, keep)
        shuffled.append(float(metrics["selector/precision_at_k"]))
    return {
        "spread": float(h_eos_spread(h_eos)),
        "chance": float(labels.mean()),
        "p@k": float(true["selector/precision_at_k"]),
        "p@k shuffled": sum(shuffled) / len(shuffled),
        "images": float(h_eos.shape[0]),
    }


def run_condition(work: Path, init: str, order: str, seed: int, args) -> dict[str, float]:
    stage1 = stage_config(work, "stage1", args.stage1_steps, init, seed)
    source = ModelSource(
        "base",
        stage1.resolve_path(stage1.model.llm.path),
        stage1.resolve_path(stage1.model.vision.path),
        stage1.resolve_path(stage1.model.llm.path),
    )
    tokenizer, layout = load_stage_tokenizer(stage1, source)
    torch.manual_seed(0)
    model = model_builder(stage1, source, layout, model_spec(stage1, tokenizer))()
    row = {"init": init, "order": order, "stage2 s": 0.0}
    if order == "2 first":
        row["stage2 s"] = train(
            model, stage_config(work, "stage2", args.stage2_steps, init), tokenizer, layout
        )
    heldout = copy.deepcopy(stage1)
    heldout.data.path = str(args.heldout)
    heldout.stage.micro_batch_size = heldout.stage.global_batch_size = 8
    heldout.data.shuffle = False
    row["start spread"] = evaluate(model, heldout, tokenizer, layout, shuffles=1)["spread"]
    row["stage1 s"] = train(model, stage1, tokenizer, layout)
    return row | evaluate(model, heldout, tokenizer, layout)


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns its figures: per condition ("<init>, <order>"), the mean and std over the
    seeds of every column of the printed table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench_selector_guidance"))
    parser.add_argument("--stage1-steps", type=int, default=400, help="selector steps (the tiny recipe: 20)")
    parser.add_argument(
        "--stage2-steps", type=int, default=20, help="stage-2 steps before stage 1 (the tiny recipe's)"
    )
    parser.add_argument("--heldout-images", type=int, default=96)
    parser.add_argument(
        "--seeds", default="0,1,2", help="training seeds (new rows, selector init, data order)"
    )
    args = parser.parse_args(argv)
    base = stage_config(args.work, "stage1", args.stage1_steps, "text_distribution")
    prepare_demo(base)
    args.heldout = build_eval_set(args.work, base, args.heldout_images)
    print(
        f"# {harness.hardware()}; tiny recipe shapes; "
        f"stage 1: {args.stage1_steps} steps, stage 2: {args.stage2_steps} steps; "
        f"held out: {args.heldout_images} images (seed {base.seed + 1})"
    )
    header = ("start spread", "chance", "p@k", "p@k shuffled", "gain", "stage1 s", "stage2 s")
    print(
        "  ".join(f"{h:>17}" for h in ("init", "order", *header)) + f"   (mean ± std over seeds {args.seeds})"
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    figures = {}
    for init in INITS:
        for order in ORDERS:
            rows = [run_condition(args.work, init, order, seed, args) for seed in seeds]
            for row in rows:
                row["gain"] = row["p@k"] - row["p@k shuffled"]
            figures[f"{init}, {order}"] = {h: _mean_std([r[h] for r in rows]) for h in header}
            cells = [f"{init:>17}", f"{order:>17}"]
            cells += [f"{m:>8.4f} ± {s:.4f}".rjust(17) for m, s in figures[f"{init}, {order}"].values()]
            print("  ".join(cells), flush=True)
    print(
        "chance = share of labelled patches (the precision@k of a random selection); gain = precision@k with the "
        "true h_eos minus with h_eos shuffled across images (what the discrete view contributes)"
    )
    return figures


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


if __name__ == "__main__":
    main()
