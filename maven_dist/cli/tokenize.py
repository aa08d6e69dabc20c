"""Write every image's discrete codes into shards (the ``image_codes`` column).

    # SEED (official weights on local disk; GPU when present)
    maven tokenize runs/7b/data/llava558k --tokenizer seed \\
        --path models/seed/seed_quantizer.pt --eva models/seed/eva_vit_g.pth --dtype fp16 --batch-size 64

    # The small k-means tokenizer: fit it on the shards' images first (once), then encode
    maven tokenize runs/tiny/data/captions runs/tiny/data/conversations --tokenizer kmeans \\
        --path runs/tiny/base/kmeans_tokenizer --train-kmeans --tower runs/tiny/base/vision_tower \\
        --codebook-size 256 --num-codes 32

Re-running resumes: shards that have codes are skipped unless --overwrite. Images that cannot be
encoded are null in the column and listed in SHARDS/image_codes_rejects.jsonl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from maven_dist.offline.discrete.kmeans import CONFIG_NAME, train_kmeans_tokenizer
from maven_dist.offline.shard_jobs import tokenize_shards

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="maven tokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("shards", nargs="+", type=Path, help="shards directories written by tools/prepare_data.py")
    p.add_argument("--tokenizer", choices=["seed", "kmeans"], required=True)
    p.add_argument(
        "--path", type=Path, required=True, help="seed_quantizer.pt (or its folder) / k-means tokenizer dir"
    )
    p.add_argument("--eva", type=Path, help="EVA ViT-g weights (eva_vit_g.pth) for SEED")
    p.add_argument(
        "--train-kmeans",
        action="store_true",
        help="fit the k-means tokenizer on the first shards dir if --path has none",
    )
    p.add_argument("--tower", type=Path, help="CLIP vision tower directory (k-means training)")
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--num-codes", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="", help="torch device (default: cuda when present)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="model precision (SEED runs fp16 on GPU)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="recompute shards that already have codes")
    args = p.parse_args(argv)

    if args.train_kmeans:
        if args.tokenizer != "kmeans" or args.tower is None:
            p.error("--train-kmeans needs --tokenizer kmeans and --tower")
        if not (args.path / CONFIG_NAME).is_file():
            train_kmeans_tokenizer(
                args.shards[0],
                args.tower,
                args.path,
                codebook_size=args.codebook_size,
                num_codes=args.num_codes,
                seed=args.seed,
                device=args.device,
                progress=True,
            )
            print(f"trained the k-means tokenizer into {args.path}")
    for shards in args.shards:
        report = tokenize_shards(
            shards,
            args.tokenizer,
            args.path,
            eva_path=args.eva,
            device=args.device,
            dtype=DTYPES[args.dtype],
            batch_size=args.batch_size,
            overwrite=args.overwrite,
        )
        print(
            f"{shards}: encoded {len(report.shards_done)} shards ({report.images} images, {report.rejected} rejected"
            f"{f', see {report.rejects_path}' if report.rejected else ''}), {len(report.shards_skipped)} already done"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
