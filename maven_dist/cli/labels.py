"""Write stage-1 patch pseudo-labels into shards (the ``patch_labels`` column).

    # COCO instance masks (polygons and RLE), grid from the vision tower (336/14 -> 24)
    maven labels runs/7b/data/coco_captions --source coco \\
        --annotations coco/annotations/instances_train2017.json --tower models/clip-vit-large-patch14-336

    # Visual Genome region boxes whose phrase occurs in the sample text
    maven labels SHARDS --source vg --annotations vg/region_descriptions.json --grid 24

    # Grounding SAM: noun phrases -> Grounding DINO boxes -> SAM masks (GPU when present)
    maven labels SHARDS --source grounding_sam \\
        --dino models/grounding-dino-base --sam models/sam-vit-huge --grid 24 --batch-size 16

A patch is 1 when the mask covers more than --threshold of it (default 0: any overlap, as in the
paper), under the tower's letterbox. Re-running resumes: shards that have labels are skipped unless
--overwrite. Images without a label are null in the column and listed in
SHARDS/patch_labels_rejects.jsonl (shard, row, id, image, reason).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maven_dist.offline.pseudo_labels.grounding_sam import GroundingSamConfig
from maven_dist.offline.pseudo_labels.make_labels import grid_from_tower, make_patch_labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="maven labels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("shards", nargs="+", type=Path, help="shards directories written by tools/prepare_data.py")
    p.add_argument("--source", choices=["coco", "vg", "grounding_sam"], required=True)
    p.add_argument(
        "--annotations",
        type=Path,
        action="append",
        default=[],
        help="COCO instances / VG region file (repeatable)",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tower", type=Path, help="vision tower directory: grid = image_size // patch_size")
    g.add_argument("--grid", type=int, help="patch grid side (24 for CLIP ViT-L/14 at 336)")
    p.add_argument("--threshold", type=float, default=0.0, help="coverage a patch must exceed to be 1")
    p.add_argument(
        "--vg-select", choices=["text", "all"], default="text", help="VG regions: named in the text, or all"
    )
    p.add_argument("--dino", type=Path, help="Grounding DINO directory (save_pretrained layout)")
    p.add_argument("--sam", type=Path, help="SAM directory (save_pretrained layout)")
    p.add_argument("--box-threshold", type=float, default=0.35)
    p.add_argument("--text-threshold", type=float, default=0.25)
    p.add_argument("--max-boxes", type=int, default=16, help="most boxes per image given to SAM")
    p.add_argument("--device", default="", help="torch device (default: cuda when present)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--overwrite", action="store_true", help="recompute shards that already have labels")
    args = p.parse_args(argv)

    grounding = None
    if args.source == "grounding_sam":
        if args.dino is None or args.sam is None:
            p.error("--source grounding_sam needs --dino and --sam")
        grounding = GroundingSamConfig(
            str(args.dino),
            str(args.sam),
            args.box_threshold,
            args.text_threshold,
            args.max_boxes,
            args.device,
        )
    elif not args.annotations:
        p.error(f"--source {args.source} needs --annotations")
    grid = args.grid or grid_from_tower(args.tower)
    for shards in args.shards:
        report = make_patch_labels(
            shards,
            args.source,
            grid=grid,
            threshold=args.threshold,
            annotations=args.annotations,
            vg_select=args.vg_select,
            grounding=grounding,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
        )
        print(
            f"{shards}: labelled {len(report.shards_done)} shards ({report.images} images, {report.rejected} rejected"
            f"{f', see {report.rejects_path}' if report.rejected else ''}), {len(report.shards_skipped)} already done"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
