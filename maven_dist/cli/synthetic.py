"""Write the synthetic shapes data set (images, masks, LLaVA JSON, COCO instances, captions.txt).

maven synthetic OUT_DIR --num-images 64 --seed 0 --image-size 112
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maven_dist.offline.synthetic import generate_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maven synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=112)
    args = parser.parse_args(argv)
    out = generate_synthetic(args.out_dir, args.num_images, args.seed, args.image_size)
    print(
        f"wrote {len(out.images)} images, {out.captions_json.name}, {out.conversations_json.name}, "
        f"{out.instances_json.name} under {out.root}"
    )
    return 0


if __name__ == "__main__":
    main()
