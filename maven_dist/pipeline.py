"""`python -m maven_dist.pipeline RECIPE_DIR [--nproc N] [--set key=value ...]`: the four stages in order.

Each stage is its own `torchrun` (one process per rank), started from the previous stage's export
through the recipes' `init_from`. All four share one MLflow parent run via MAVEN_LAUNCH_ID. The
embedded default (tiny recipe) is prepared once here, before any rank starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

STAGES = ("stage1", "stage2", "stage3", "stage4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maven_dist.pipeline", description=__doc__.splitlines()[0]
    )
    parser.add_argument("recipe_dir", help="directory with stage1.yaml .. stage4.yaml, e.g. recipes/tiny")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per stage (torchrun --nproc_per_node)")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated subset, e.g. stage3,stage4"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from maven_dist.config import ConfigError, load_config
    from maven_dist.data.embedded import prepare_embedded

    recipes = [Path(args.recipe_dir) / f"{stage}.yaml" for stage in args.stages.split(",")]
    try:
        configs = [load_config(r, args.overrides) for r in recipes]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if configs[0].embedded.enabled:
        prepare_embedded(configs[0])

    env = os.environ | {"MAVEN_LAUNCH_ID": os.environ.get("MAVEN_LAUNCH_ID", uuid.uuid4().hex[:12])}
    for recipe, cfg in zip(recipes, configs, strict=True):
        cmd = [sys.executable, "-m", "maven_dist.train", str(recipe), *(f"--set={o}" for o in args.overrides)]
        if args.nproc > 1:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                "-m",
                "maven_dist.train",
                str(recipe),
                *(f"--set={o}" for o in args.overrides),
            ]
        print(f"[pipeline] {cfg.stage.name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd, env=env)
        if code != 0:
            print(
                f"[pipeline] {cfg.stage.name} failed with exit code {code}; rerun the same command to resume "
                "(each stage continues from its latest checkpoint)",
                file=sys.stderr,
            )
            return code
        print(f"[pipeline] {cfg.stage.name} finished in {time.perf_counter() - start:.0f} s", flush=True)
    _deliver_spooled_metrics(configs[-1].run_dir)
    print(
        f"[pipeline] all stages done; MLflow store: {configs[-1].tracking.uri or Path(configs[-1].run_dir) / 'mlflow.db'}"
    )
    return 0


def _deliver_spooled_metrics(run_dir: str) -> None:
    """The last stage may have ended while the tracking server was down: its metrics wait in the spool
    (every earlier stage's are replayed by the next one). Try once more; never fail the pipeline for it."""
    spool = Path(run_dir) / "mlflow_spool"
    if not any(spool.glob("*.jsonl")):
        return
    from maven_dist.train.tracking.sync import sync_spool

    try:
        result = sync_spool(run_dir)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail training
        print(
            f"[pipeline] tracking store still unreachable ({exc}); later run: python -m maven_dist.train.tracking sync {run_dir}"
        )
        return
    if result.failed:
        print(
            f"[pipeline] {len(result.failed)} spool file(s) not delivered yet; later run: "
            f"python -m maven_dist.train.tracking sync {run_dir}"
        )
    else:
        print(f"[pipeline] delivered {result.metrics} spooled metric values to the tracking store")


if __name__ == "__main__":
    sys.exit(main())
