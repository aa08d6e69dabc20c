"""Write every image's discrete codes into shards (the ``image_codes`` column).

    # SEED (official weights on local disk; GPU when present)
    maven tokenize runs/7b/data/llava558k --tokenizer seed \\
        --path models/seed/seed_quantizer.pt --eva models/seed/eva_vit_g.pth --dtype fp16 --batch-size 64

    # The small k-means tokenizer: fit it on the shards' images first (once), then encode
    maven tokenize runs/tiny/data/captions runs/tiny/data/conversations --tokenizer kmeans \\
        --path runs/tiny/base/kmeans_tokenizer --train-kmeans --tower runs/tiny/base/vision_tower \\
        --codebook-size 256 --num-codes 32

    # SEED on 4 GPUs: 4 processes, each encodes every 4th shard file (slurm/tokenize_array.sh: a Slurm array)
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i maven tokenize ... --num-shards 4 --shard-index $i & done; wait

Re-running resumes: shards that have codes are skipped unless --overwrite. Images that cannot be
encoded are null in the column and listed in SHARDS/image_codes_rejects/<shard>.jsonl.

Exit codes: 0 done, 2 a usage error or an input that cannot be used (the message names it), 1 else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from maven_dist.cli.work_share import add_work_share_arguments, work_share
from maven_dist.contract.command_line import HelpFormatter
from maven_dist.offline.discrete.kmeans import CONFIG_NAME, train_kmeans_tokenizer
from maven_dist.offline.shard_jobs import (
    JobInputError,
    input_errors,
    plan_shard_files,
    tokenize_shards,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maven tokenize", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("shards", nargs="+", type=Path, help="shards directories written by `maven prepare`")
    p.add_argument(
        "--tokenizer",
        choices=["seed", "kmeans"],
        required=True,
        help="SEED (the paper's; official weights) or the small k-means tokenizer fitted on your images",
    )
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
    p.add_argument("--codebook-size", type=int, default=256, help="k-means codes to fit (--train-kmeans)")
    p.add_argument("--num-codes", type=int, default=32, help="k-means codes per image (--train-kmeans)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the k-means fit (--train-kmeans)")
    p.add_argument("--device", default="", help="torch device (default: cuda when present)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="model precision (SEED runs fp16 on GPU)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--overwrite", action="store_true", help="recompute shards that already have codes")
    add_work_share_arguments(p, "encodes", "slurm/tokenize_array.sh")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    share = work_share(p, args)
    train = args.train_kmeans and not (args.path / CONFIG_NAME).is_file()
    if args.train_kmeans and (args.tokenizer != "kmeans" or args.tower is None):
        p.error("--train-kmeans needs --tokenizer kmeans and --tower")
    if train and share.split_enabled:
        # N processes would each fit the tokenizer and write it into the same --path at once.
        p.error(
            f"--train-kmeans with --num-shards {share.count}: {args.path} has no tokenizer yet; fit it once "
            "first (the same command without --num-shards/--shard-index fits it and encodes everything)"
        )
    try:
        _check_inputs(args, train)
        plan = plan_shard_files(args.shards, share)
        if args.dry_run:
            print(*plan.files, f"would encode {plan.describe()}", sep="\n")
            return 0
        if train:
            _train_kmeans(args)
        for shards, files in plan.parts:
            if files:
                _encode(shards, files, args)
    except JobInputError as exc:
        print(f"maven tokenize: error: {exc}", file=sys.stderr)
        return 2
    if share.split_enabled:
        print(f"encoded {plan.describe()}")
    return 0


def _check_inputs(args: argparse.Namespace, train: bool) -> None:
    """The files and directories the options name exist, before any shard or model is read."""
    named = [("--eva", args.eva)] + ([("--tower", args.tower)] if train else [("--path", args.path)])
    for flag, path in named:
        if path is not None and not path.exists():
            raise JobInputError(
                f"{flag} {path} does not exist (docs/data_preparation.md says what goes where)"
            )


def _train_kmeans(args: argparse.Namespace) -> None:
    with input_errors(f"fitting the k-means tokenizer on {args.shards[0]} with --tower {args.tower}"):
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


def _encode(shards: Path, files: list[Path], args: argparse.Namespace) -> None:
    report = tokenize_shards(
        shards,
        args.tokenizer,
        args.path,
        eva_path=args.eva,
        device=args.device,
        dtype=DTYPES[args.dtype],
        shard_files=files,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(
        f"{shards}: encoded {len(report.shards_done)} shards ({report.images} images, {report.rejected} rejected"
        f"{f', see {report.rejects_dir}' if report.rejected else ''}), {len(report.shards_skipped)} already done",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
