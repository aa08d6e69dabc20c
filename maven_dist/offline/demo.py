"""The demo assets: everything the tiny recipe needs, built on this machine, once (``maven prepare-demo``).

    {run_dir}/data/synthetic/        images, masks, captions.json, conversations.json, instances.json
    {run_dir}/base/llm/              tokenizer trained on the synthetic texts + a random tiny LLaMA
    {run_dir}/base/vision_tower/     a random tiny CLIP tower + its image processor config
    {run_dir}/base/kmeans_tokenizer/ the small VQ tokenizer, k-means over the tower's pooled features
    {run_dir}/data/captions/         shards of captions.json with patch labels and visual codes
    {run_dir}/data/conversations/    shards of conversations.json with visual codes

Each step runs the same tools a user runs on real data (tools/prepare_data.py,
tools/make_pseudo_labels.py, tools/tokenize_images.py, as functions) and is skipped when its
output exists. Once every step ran, ``{run_dir}/data/demo_done.json`` records the settings the assets
were built from; a later call with the same settings returns before importing any of the tools (every
Slurm job and every ``maven pipeline`` calls it, and importing them cost 8-10 s per call). The recipe runner
(``maven pipeline``) and the launchers (``slurm/*.sh``, ``maven launch``) call it for recipes with
``demo.enabled``; the trainer never does (training does not import this package).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from maven_dist.config import Config

_DONE = ".done"
_ALL_DONE = "demo_done.json"


def demo_settings(cfg: Config) -> dict:
    """The settings the assets are built from (JSON values, as the marker stores them)."""
    model = cfg.model
    built_from = {"demo": asdict(cfg.demo), "seed": cfg.seed, "llm": asdict(model.llm),
                  "vision": asdict(model.vision), "discrete": asdict(model.discrete)}  # fmt: skip
    return json.loads(json.dumps(built_from, default=str))


def _already_built(cfg: Config) -> bool:
    """The marker matches and the outputs it stands for are still there (one may have been deleted)."""
    run = Path(cfg.run_dir)
    models = (cfg.model.llm.path, cfg.model.vision.path, cfg.model.discrete.path)
    outputs = [cfg.resolve_path(m) / "config.json" for m in models]
    outputs += [run / "data" / name / "manifest.json" for name in ("captions", "conversations")]
    try:
        same = json.loads((run / "data" / _ALL_DONE).read_text()) == demo_settings(cfg)
    except (OSError, ValueError):
        return False
    return same and all(path.is_file() for path in outputs)


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def prepare_demo(cfg: Config) -> None:
    """Build whatever of the demo assets under ``cfg.run_dir`` is missing (one process)."""
    if _already_built(cfg):
        return
    from maven_dist.data.prepare import PrepareOptions, prepare
    from maven_dist.offline.base_models import build_random_llm, build_random_vision_tower
    from maven_dist.offline.discrete.kmeans import train_kmeans_tokenizer
    from maven_dist.offline.pseudo_labels.make_labels import make_patch_labels
    from maven_dist.offline.shard_jobs import tokenize_shards
    from maven_dist.offline.synthetic import generate_synthetic
    from maven_dist.offline.tokenizer_training import train_tokenizer

    run = Path(cfg.run_dir)
    synthetic_dir = run / "data" / "synthetic"
    if not (synthetic_dir / _DONE).exists():
        log(f"generating {cfg.demo.num_images} synthetic images in {synthetic_dir}")
        generate_synthetic(synthetic_dir, cfg.demo.num_images, cfg.seed, cfg.demo.image_size)
        (synthetic_dir / _DONE).touch()

    llm_dir = cfg.resolve_path(cfg.model.llm.path)
    if cfg.model.llm.init == "random" and not (llm_dir / "config.json").is_file():
        log(f"training the tokenizer and building a random LLM in {llm_dir}")
        texts = (synthetic_dir / "captions.txt").read_text().splitlines()
        tokenizer = train_tokenizer(texts, llm_dir, vocab_size=cfg.demo.tokenizer_vocab_size)
        build_random_llm(cfg.model.llm, tokenizer, llm_dir, cfg.seed)
    tower_dir = cfg.resolve_path(cfg.model.vision.path)
    if cfg.model.vision.init == "random" and not (tower_dir / "config.json").is_file():
        log(f"building a random vision tower in {tower_dir}")
        build_random_vision_tower(cfg.model.vision, tower_dir, cfg.seed)

    shard_sets = {
        "captions": synthetic_dir / "captions.json",
        "conversations": synthetic_dir / "conversations.json",
    }
    for name, source in shard_sets.items():
        out = run / "data" / name
        if not (out / "manifest.json").is_file():
            log(f"preparing shards {out}")
            options = PrepareOptions(
                image_root=synthetic_dir / "images",
                out_dir=out,
                tokenizer_dir=llm_dir,
                template="plain" if name == "captions" else "vicuna_v1",
                max_length=cfg.data.max_length,
                num_codes=cfg.model.discrete.num_codes,
                num_patches=cfg.model.vision.num_patches,
                keep_ratio=cfg.model.selector.keep_ratio,
                shard_size=64,
                num_workers=0,
                progress=False,
            )
            prepare([source], options)

    make_patch_labels(
        run / "data" / "captions",
        "coco",
        grid=cfg.model.vision.image_size // cfg.model.vision.patch_size,
        annotations=[synthetic_dir / "instances.json"],
        progress=False,
    )

    kmeans_dir = cfg.resolve_path(cfg.model.discrete.path)
    if not (kmeans_dir / "config.json").is_file():
        log(f"training the k-means visual tokenizer in {kmeans_dir}")
        train_kmeans_tokenizer(
            run / "data" / "captions",
            tower_dir,
            kmeans_dir,
            codebook_size=cfg.model.discrete.codebook_size,
            num_codes=cfg.model.discrete.num_codes,
            seed=cfg.seed,
        )
    for name in shard_sets:
        tokenize_shards(run / "data" / name, "kmeans", kmeans_dir, progress=False)
    done = run / "data" / _ALL_DONE
    done.with_suffix(".tmp").write_text(json.dumps(demo_settings(cfg), indent=1) + "\n")
    done.with_suffix(".tmp").replace(done)
