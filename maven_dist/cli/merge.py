"""Sharded training checkpoint -> one HF-layout MaVEn model (sharded safetensors, configs, tokenizer).

    maven merge RUN_DIR OUT_DIR                 # the run's newest checkpoint
    maven merge runs/x/stage4 OUT --step 1000   # one step of one stage
    maven merge CKPT OUT --dtype bf16 --only projector --only selector

SRC is a run directory, a stage directory, its checkpoints/ directory or one step_XXXXXXXX checkpoint.
Tensors are streamed from the rank files (no rank file or output shard is ever held in memory); the
result is written to OUT_DIR.merging and renamed, with merge_provenance.json (source, step, recipe
fingerprint, sha256 of every file). See docs/merge.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter
from maven_dist.merge import MergeError, MergeOptions, merge_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maven merge", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("src", type=Path, help="run, stage, checkpoints or step_XXXXXXXX directory")
    p.add_argument("out_dir", type=Path, help="output directory (must not exist unless --force)")
    p.add_argument("--stage", help="stage of a run directory (default: the stage with the newest checkpoint)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    which.add_argument("--tag", help="checkpoint directory name, e.g. step_00000010 (default: latest)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the written weights"
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file per component")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PART",
        help="write only this part (llm, vocab_new_rows, projector, selector, vision_tower); repeatable",
    )
    p.add_argument(
        "--exclude-frozen", action="store_true", help="leave out parameters the stage did not train"
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--threads", type=int, default=4, help="reader threads")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress (a bar on a terminal, else a line every 10 s)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = MergeOptions(
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        only=tuple(args.only),
        exclude_frozen=args.exclude_frozen,
        stage=args.stage,
        step=args.step,
        tag=args.tag,
        force=args.force,
        threads=args.threads,
        progress=not args.no_progress,
    )
    try:
        result = merge_checkpoint(args.src, args.out_dir, options)
    except MergeError as e:
        print(f"merge_ckpt: error: {e}", file=sys.stderr)
        return 2
    print(
        f"merged {result.checkpoint} ({result.kind}, step {result.step}): {result.num_parameters} parameters, "
        f"{result.num_bytes / 1e6:.1f} MB in {result.seconds:.1f} s -> {result.out_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
