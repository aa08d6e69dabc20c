"""LLaVA-format JSON/JSONL + image folder -> validated Arrow shards (see maven_dist/data/prepare.py).

    maven prepare data/captions.json data/conversations.jsonl \\
        --image-root data/images --out runs/tiny/data/shards --tokenizer runs/tiny/base/llm \\
        --template vicuna_v1 --max-length 2048 --num-codes 32 --num-patches 576 --keep-ratio 0.25

Re-running resumes: finished shards are skipped. Rejected records are listed in OUT/rejects.jsonl
with their reason; OUT/manifest.json holds the counts. --strict stops at the first bad record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.prepare import PrepareError, PrepareOptions, prepare
from maven_dist.data.templates import TEMPLATES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maven prepare", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "sources", nargs="+", type=Path, help="LLaVA .json (a list) or .jsonl (one record per line)"
    )
    p.add_argument(
        "--image-root", type=Path, required=True, help="folder the records' image paths are relative to"
    )
    p.add_argument("--out", type=Path, required=True, help="shards directory to write")
    p.add_argument(
        "--tokenizer", type=Path, required=True, help="HF tokenizer directory (for the length check)"
    )
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        default="vicuna_v1",
        help="conversation template the lengths are measured in (the recipe's data.template; plain for captions)",
    )
    p.add_argument("--max-length", type=int, default=2048, help="longest sequence after image expansion")
    p.add_argument("--num-codes", type=int, default=32, help="discrete codes per image")
    p.add_argument("--num-patches", type=int, default=576, help="continuous patches per image")
    p.add_argument("--keep-ratio", type=float, default=0.25, help="fraction of patches the selector keeps")
    p.add_argument("--views", default="discrete,continuous", help="views counted per image (longest: both)")
    p.add_argument(
        "--resize", type=int, default=0, help="store images letterboxed+resized to this side (0: as is)"
    )
    p.add_argument("--tower", type=Path, help="vision tower dir: take --resize and the pad colour from it")
    p.add_argument("--keep-original", action="store_true", help="also store the original image bytes")
    p.add_argument("--image-format", choices=["png", "ppm"], default="png",
                   help="encoding of re-encoded (e.g. resized) images: png is compact, ppm decodes fastest")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard")
    p.add_argument("--workers", type=int, default=2, help="worker processes (0: in this process)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    resize, pad_mean = args.resize, None
    if args.tower is not None:
        transform = ImageTransform.from_pretrained(args.tower)
        resize, pad_mean = resize or transform.image_size, transform.mean
    options = PrepareOptions(
        image_root=args.image_root,
        out_dir=args.out,
        tokenizer_dir=args.tokenizer,
        template=args.template,
        max_length=args.max_length,
        num_codes=args.num_codes,
        num_patches=args.num_patches,
        keep_ratio=args.keep_ratio,
        views=tuple(v for v in args.views.split(",") if v),
        resize=resize,
        pad_mean=pad_mean,
        keep_original=args.keep_original,
        image_format=args.image_format,
        shard_size=args.shard_size,
        num_workers=args.workers,
        strict=args.strict,
    )
    try:
        manifest = prepare(args.sources, options)
    except PrepareError as err:
        print(f"maven prepare: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["counts"], indent=1))
    if manifest["counts"]["rejected"]:
        print(f"rejected records are listed in {args.out / 'rejects.jsonl'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
