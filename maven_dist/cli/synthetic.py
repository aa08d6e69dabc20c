"""Write the synthetic shapes data set (images, masks, LLaVA JSON, COCO instances, captions.txt).

maven synthetic OUT_DIR --num-images 64 --seed 0 --image-size 112
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter
from maven_dist.offline.synthetic import generate_synthetic


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maven synthetic", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("out_dir", type=Path, help="directory to write into (created if missing)")
    parser.add_argument("--num-images", type=int, default=64, help="images to draw")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same set")
    parser.add_argument("--image-size", type=int, default=112, help="side of the square images in pixels")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = generate_synthetic(args.out_dir, args.num_images, args.seed, args.image_size)
    except OSError as exc:  # an output directory that cannot be made or written
        print(f"maven synthetic: error: cannot write {args.out_dir}: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(out.images)} images, {out.captions_json.name}, {out.conversations_json.name}, "
        f"{out.instances_json.name} under {out.root}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
