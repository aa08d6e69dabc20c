"""The demo assets: a miniature of the real world, built on this machine once (``maven prepare-demo``).

The real recipe starts from pretrained models (Vicuna knows its language, CLIP what is in a picture) and
trains on data that asks what the benchmarks ask. The miniature mirrors that (issue 22)::

    {run_dir}/data/synthetic/        training images, masks, captions.json, conversations.json (every
                                     question kind the benchmarks ask), instances.json
    {run_dir}/base/llm/              tokenizer trained on the synthetic texts + a tiny LLaMA: random
                                     (``model.llm.init: random``) or pretrained on the world's text
                                     (``synthetic``, offline/pretrain_llm.py)
    {run_dir}/base/vision_tower/     a tiny CLIP tower: random, or pretrained on the world's objects
                                     (``synthetic``, offline/pretrain_tower.py), + its image processor config
    {run_dir}/base/kmeans_tokenizer/ the small VQ tokenizer, k-means over the tower's pooled features
    {run_dir}/data/captions/         shards of captions.json with patch labels and visual codes
    {run_dir}/data/conversations/    shards of conversations.json with visual codes
    {run_dir}/data/heldout/          images drawn with another seed, never trained on
    {run_dir}/data/benchmarks/       the synthetic benchmark set on the held-out images, and the held-out
                                     question set (task ``heldout``) that ``maven eval`` scores

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
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from maven_dist.config import Config

if TYPE_CHECKING:
    from maven_dist.offline.synthetic import SyntheticSet

_DONE = ".done"
_ALL_DONE = "demo_done.json"
HELDOUT_SEED = 1_000_003
"""Added to ``demo.seed`` for the held-out images: a stream of draws no training image comes from."""
TEXT_SEED = 2_000_003
"""Added to ``demo.seed`` for the scenes the LLM's pretraining text describes beside the training images."""


def demo_settings(cfg: Config) -> dict:
    """The settings the assets are built from (JSON values, as the marker stores them)."""
    model = cfg.model
    built_from = {"demo": asdict(cfg.demo), "llm": asdict(model.llm),
                  "vision": asdict(model.vision), "discrete": asdict(model.discrete)}  # fmt: skip
    return json.loads(json.dumps(built_from, default=str))


def _already_built(cfg: Config) -> bool:
    """The marker matches and the outputs it stands for are still there (one may have been deleted)."""
    run = Path(cfg.run_dir)
    models = (cfg.model.llm.path, cfg.model.vision.path, cfg.model.discrete.path)
    outputs = [cfg.resolve_path(m) / "config.json" for m in models]
    outputs += [run / "data" / name / "manifest.json" for name in ("captions", "conversations")]
    outputs.append(run / "data" / "benchmarks" / "heldout" / _DONE)
    try:
        same = json.loads((run / "data" / _ALL_DONE).read_text()) == demo_settings(cfg)
    except (OSError, ValueError):
        return False
    return same and all(path.is_file() for path in outputs)


_STARTED = [time.monotonic()]


def log(message: str) -> None:
    """A progress line, with the seconds since the assets began to be built (what each part takes)."""
    print(f"[demo +{time.monotonic() - _STARTED[0]:.0f} s] {message}", flush=True)


def _llm_corpus(cfg: Config, world: SyntheticSet) -> list[tuple[list[dict], str]]:
    """The LLM's pretraining samples, (LLaVA turns, template) (offline/pretrain_llm.py): the training
    images' captions and conversations, and those of ``demo.llm_text_scenes`` scenes described but not drawn
    (another seed's); each caption in the ``plain`` format, and each caption and question conversation in
    LLaVA-1.5's chat template with every image written out as its caption."""
    import numpy as np

    from maven_dist.offline import synthetic
    from maven_dist.offline.pretrain_llm import describe_images
    from maven_dist.offline.synthetic_scene import imagined_scene

    demo = cfg.demo
    captions = json.loads(world.captions_json.read_text())
    chats = json.loads(world.conversations_json.read_text())
    rng = np.random.default_rng(demo.seed + TEXT_SEED)
    scenes = [
        imagined_scene(rng, f"text-{i:06d}", demo.image_size, demo.max_objects)
        for i in range(demo.llm_text_scenes)
    ]
    more_captions, more_chats = synthetic.describe_world(
        scenes, demo.seed + TEXT_SEED, demo.questions_per_image, demo.question_kinds
    )
    captions, chats = captions + more_captions, chats + more_chats
    described = {c["image"]: c["conversations"][1]["value"] for c in captions}
    samples = [(c["conversations"], "plain") for c in captions]
    for sample in captions + chats:
        images = sample["image"] if isinstance(sample["image"], list) else [sample["image"]]
        samples.append((describe_images(sample["conversations"], images, described), "vicuna_v1"))
    return samples


def _base_models(cfg: Config, world: SyntheticSet) -> None:
    """The tokenizer and LLM, and the vision tower, each random or pretrained on the world as configured.
    Each is built in a temporary directory renamed into place when done: a prepare-demo killed while it
    pretrains leaves no ``config.json`` that a rerun would take for a finished (pretrained) model."""
    from maven_dist.contract.atomic_write import atomic_directory
    from maven_dist.offline.base_models import build_random_llm, build_random_vision_tower
    from maven_dist.offline.tokenizer_training import train_tokenizer

    llm, vision, seed = cfg.model.llm, cfg.model.vision, cfg.demo.seed
    llm_dir, tower_dir = cfg.resolve_path(llm.path), cfg.resolve_path(vision.path)
    if llm.init != "pretrained" and not (llm_dir / "config.json").is_file():
        texts = world.captions_txt.read_text().splitlines()
        with atomic_directory(llm_dir) as building:
            tokenizer = train_tokenizer(texts, building, vocab_size=cfg.demo.tokenizer_vocab_size)
            if llm.init == "random":
                log(f"trained the tokenizer; building a random LLM in {llm_dir}")
                build_random_llm(llm, tokenizer, building, seed)
            else:
                from maven_dist.offline.pretrain_llm import pretrain_llm

                log(f"trained the tokenizer; pretraining the LLM on the world's text in {llm_dir}")
                samples = _llm_corpus(cfg, world)
                pretrain_llm(llm, tokenizer, samples, building, seed, steps=cfg.demo.llm_steps, log=log)
    if vision.init == "random" and not (tower_dir / "config.json").is_file():
        log(f"building a random vision tower in {tower_dir}")
        with atomic_directory(tower_dir) as building:
            build_random_vision_tower(vision, building, seed)
    elif vision.init == "synthetic" and not (tower_dir / "config.json").is_file():
        from maven_dist.offline.pretrain_tower import pretrain_vision_tower

        log(f"pretraining the vision tower on the world's objects in {tower_dir}")
        with atomic_directory(tower_dir) as building:
            pretrain_vision_tower(vision, building, seed, steps=cfg.demo.tower_steps, log=log)


def _benchmarks(cfg: Config) -> None:
    """Held-out images (another seed) and the synthetic benchmarks written from them."""
    from maven_dist.offline.synthetic import generate_synthetic
    from maven_dist.offline.synthetic_benchmarks import write_synthetic_benchmarks

    run, demo = Path(cfg.run_dir), cfg.demo
    out = run / "data" / "benchmarks"
    if (out / "heldout" / _DONE).exists():
        return
    log(f"writing the benchmarks on {demo.heldout_images} held-out images in {out}")
    heldout = generate_synthetic(
        run / "data" / "heldout",
        demo.heldout_images,
        demo.seed + HELDOUT_SEED,
        demo.image_size,
        max_objects=demo.max_objects,
    )
    write_synthetic_benchmarks(out, heldout, demo.seed, demo.benchmark_questions, demo.heldout_per_kind)
    (out / "heldout" / _DONE).touch()


def prepare_demo(cfg: Config) -> None:
    """Build whatever of the demo assets under ``cfg.run_dir`` is missing (one process)."""
    if _already_built(cfg):
        return
    _STARTED[0] = time.monotonic()
    from maven_dist.data.prepare import PrepareOptions, prepare
    from maven_dist.offline.discrete.kmeans import train_kmeans_tokenizer
    from maven_dist.offline.pseudo_labels.make_labels import make_patch_labels
    from maven_dist.offline.shard_jobs import tokenize_shards
    from maven_dist.offline.synthetic import SyntheticSet, generate_synthetic

    run, demo = Path(cfg.run_dir), cfg.demo
    synthetic_dir = run / "data" / "synthetic"
    if not (synthetic_dir / _DONE).exists():
        log(f"generating {demo.num_images} synthetic images in {synthetic_dir}")
        generate_synthetic(
            synthetic_dir,
            demo.num_images,
            demo.seed,
            demo.image_size,
            demo.questions_per_image,
            demo.question_kinds,
            demo.max_objects,
        )
        (synthetic_dir / _DONE).touch()
    _base_models(cfg, SyntheticSet(synthetic_dir))
    llm_dir, tower_dir = cfg.resolve_path(cfg.model.llm.path), cfg.resolve_path(cfg.model.vision.path)

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
            seed=cfg.demo.seed,
        )
    for name in shard_sets:
        tokenize_shards(run / "data" / name, "kmeans", kmeans_dir, progress=False)
    _benchmarks(cfg)
    done = run / "data" / _ALL_DONE
    done.with_suffix(".tmp").write_text(json.dumps(demo_settings(cfg), indent=1) + "\n")
    done.with_suffix(".tmp").replace(done)
    log("the demo assets are ready")
