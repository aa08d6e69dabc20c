"""Write stage-1 patch pseudo-labels into shards (the ``patch_labels`` column).

    # COCO instance masks (polygons and RLE), grid from the vision tower (336/14 -> 24)
    maven labels runs/7b/data/coco_captions --source coco \\
        --annotations coco/annotations/instances_train2017.json --tower models/clip-vit-large-patch14-336

    # Visual Genome region boxes whose phrase occurs in the sample text
    maven labels SHARDS --source vg --annotations vg/region_descriptions.json --grid 24

    # Grounding SAM: noun phrases -> Grounding DINO boxes -> SAM masks (GPU when present)
    maven labels SHARDS --source grounding_sam \\
        --dino models/grounding-dino-base --sam models/sam-vit-huge --grid 24 --batch-size 16

    # the same on 4 GPUs: 4 processes, each labels every 4th shard file (slurm/labels_array.sh: a Slurm array)
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i maven labels ... --num-shards 4 --shard-index $i & done; wait

A patch is 1 when the mask covers more than --threshold of it (default 0: any overlap, as in the
paper), under the tower's letterbox. Re-running resumes: shards that have labels are skipped unless
--overwrite. Images without a label are null in the column and listed in
SHARDS/patch_labels_rejects/<shard>.jsonl (shard, row, id, image, reason).

Exit codes: 0 done, 2 a usage error or an input that cannot be used (the message names it), 1 else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maven_dist.cli.work_share import add_work_share_arguments, work_share
from maven_dist.contract.command_line import HelpFormatter
from maven_dist.offline.pseudo_labels.grounding_sam import GroundingSamConfig
from maven_dist.offline.pseudo_labels.make_labels import grid_from_tower, make_patch_labels
from maven_dist.offline.shard_jobs import JobInputError, input_errors, plan_shard_files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maven labels", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("shards", nargs="+", type=Path, help="shards directories written by `maven prepare`")
    p.add_argument(
        "--source",
        choices=["coco", "vg", "grounding_sam"],
        required=True,
        help="where the masks come from: COCO instances, VG region boxes, or Grounding SAM on the text",
    )
    p.add_argument(
        "--annotations",
        type=Path,
        action="append",
        default=[],
        help="COCO instances / VG region file (repeatable; --source coco and vg)",
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
    p.add_argument("--box-threshold", type=float, default=0.35, help="Grounding DINO box score to keep a box")
    p.add_argument(
        "--text-threshold", type=float, default=0.25, help="Grounding DINO score for a phrase to match a box"
    )
    p.add_argument("--max-boxes", type=int, default=16, help="most boxes per image given to SAM")
    p.add_argument("--device", default="", help="torch device (default: cuda when present)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--overwrite", action="store_true", help="recompute shards that already have labels")
    add_work_share_arguments(p, "labels", "slurm/labels_array.sh")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    share = work_share(p, args)
    grounding = _grounding_config(p, args)
    try:
        _check_inputs(args)
        with input_errors(f"--tower {args.tower}"):
            grid = args.grid or grid_from_tower(args.tower)
        plan = plan_shard_files(args.shards, share)
        if args.dry_run:
            print(*plan.files, f"would label {plan.describe()}", sep="\n")
            return 0
        for shards, files in plan.parts:
            if files:
                _label(shards, files, args, grid, grounding)
    except JobInputError as exc:
        print(f"maven labels: error: {exc}", file=sys.stderr)
        return 2
    if share.split_enabled:
        print(f"labelled {plan.describe()}")
    return 0


def _grounding_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> GroundingSamConfig | None:
    if args.source != "grounding_sam":
        if not args.annotations:
            p.error(f"--source {args.source} needs --annotations")
        return None
    if args.dino is None or args.sam is None:
        p.error("--source grounding_sam needs --dino and --sam")
    return GroundingSamConfig(
        str(args.dino), str(args.sam), args.box_threshold, args.text_threshold, args.max_boxes, args.device
    )


def _check_inputs(args: argparse.Namespace) -> None:
    """The files and directories the options name exist, before any shard or model is read."""
    named = [("--annotations", a) for a in args.annotations] + [("--tower", args.tower)]
    if args.source == "grounding_sam":
        named += [("--dino", args.dino), ("--sam", args.sam)]
    for flag, path in named:
        if path is not None and not path.exists():
            raise JobInputError(
                f"{flag} {path} does not exist (docs/data_preparation.md says what goes where)"
            )


def _label(shards: Path, files: list[Path], args, grid: int, grounding: GroundingSamConfig | None) -> None:
    report = make_patch_labels(
        shards,
        args.source,
        grid=grid,
        threshold=args.threshold,
        annotations=args.annotations,
        vg_select=args.vg_select,
        grounding=grounding,
        shard_files=files,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print(
        f"{shards}: labelled {len(report.shards_done)} shards ({report.images} images, {report.rejected} rejected"
        f"{f', see {report.rejects_dir}' if report.rejected else ''}), {len(report.shards_skipped)} already done",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
