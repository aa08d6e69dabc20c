"""``maven eval MODEL_DIR [--tasks vqav2,gqa,...] [--data BENCH_ROOT] [--out OUT]``: score a trained MaVEn.

Also ``python -m maven_dist.eval``. Reads each benchmark from ``BENCH_ROOT/<task>/`` (docs/evaluation.md
says where the files come from and the layouts); without ``--tasks`` it runs every task found there;
without ``--data`` it writes and runs the synthetic benchmark set (one task per format, known answers,
built from the synthetic images): the demo's and CI's default. Under ``torchrun`` the questions are
shared by the ranks and the results gathered on rank 0 (the same predictions as one rank). A rerun
continues from the predictions already written under OUT.

Results: ``OUT/<task>/predictions.jsonl`` and ``metrics.json``, ``OUT/summary.md``, ``OUT/metrics.json``;
and, unless ``--no-tracking``, an MLflow run nested under the recipe's parent run (``--run-dir RUN_DIR``:
its store and launch; or ``--tracking-uri`` / ``--experiment``) with metrics ``eval/<task>/<metric>``,
the predictions and the summary as artifacts, and tags naming the model directory, its provenance and
the benchmark data's version.

Exit codes: 0 scored, 2 bad input (a model directory or benchmark file that cannot be used), 1 else.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

from maven_dist.contract.command_line import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maven eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("model_dir", type=Path, help="a MaVEn directory: a stage export or a `maven merge` output")
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: every task under --data)")
    p.add_argument("--data", type=Path, default=None, help="benchmark root (default: the synthetic set)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default: MODEL_DIR/../eval)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest generated answer")
    p.add_argument(
        "--limit", type=int, default=None, help="only the first N questions of each task (smoke tests)"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda (default: cuda when present; torchrun: the local GPU)"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="model precision")
    p.add_argument(
        "--control",
        default="",
        help="image-blind controls, comma-separated: blank (a constant image), swap (another question's "
        "images), none (no images); adds the majority baseline and the visual gain (eval/controls.py) "
        "(default: no control, the scores with images only)",
    )
    where = p.add_argument_group("tracking")
    where.add_argument(
        "--run-dir", type=Path, default=None, help="log into this run directory's store and launch"
    )
    where.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (overrides the run directory's)"
    )
    where.add_argument(
        "--experiment", default=None, help="MLflow experiment (default: the run's, else maven-eval)"
    )
    where.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from maven_dist.eval.controls import CONTROLS

    args.controls = [c for c in args.control.split(",") if c]
    unknown = sorted(set(args.controls) - set(CONTROLS))
    if unknown:
        parser.error(f"--control {','.join(unknown)}: unknown; choose from {', '.join(CONTROLS)}")
    from maven_dist.eval.tasks.base import BenchmarkError
    from maven_dist.inference import InputError
    from maven_dist.parallel.distributed import destroy, init_distributed

    env = init_distributed()
    try:
        results = _evaluate(args, env)
    except (BenchmarkError, InputError, FileNotFoundError) as err:
        print(f"maven eval: error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy()
    if env.is_main:
        from maven_dist.eval.runner import summary_table, within_noise

        print(summary_table(results), end="")
        flagged = within_noise(results)
        if flagged:
            print(
                f"[eval] WARNING: the visual gain is within noise (p >= 0.05) for {', '.join(flagged)}: "
                "on these the scores do not show that the model uses its images",
                flush=True,
            )
    return 0


def _evaluate(args, env) -> list:
    from transformers.utils import logging as hf_logging

    from maven_dist.eval.controls import ControlledTask, majority_baseline, visual_gain, write_blank_image
    from maven_dist.eval.runner import MavenPredictor, run_task, summary_table, visual_gain_report
    from maven_dist.eval.tasks.base import first_questions
    from maven_dist.eval.tasks.registry import find_tasks, load_task
    from maven_dist.inference import MavenGenerator
    from maven_dist.parallel.distributed import barrier

    hf_logging.disable_progress_bar()
    model_dir = args.model_dir
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a MaVEn directory (no config.json)")
    out = args.out or model_dir.parent / "eval"
    data = args.data or _synthetic_benchmarks(out / "synthetic_benchmarks", env)
    names = [t for t in args.tasks.split(",") if t] or find_tasks(data)
    if not names:
        raise FileNotFoundError(f"no benchmark task under {data}: see docs/evaluation.md for the layout")
    device = args.device or (f"cuda:{env.local_rank}" if _cuda() else "cpu")
    predictor = MavenPredictor(
        MavenGenerator.from_pretrained(model_dir, device=device, dtype=args.dtype), args.max_new_tokens
    )
    results = []
    blank_image = out / "control-blank.png"
    if env.is_main and "blank" in args.controls:
        write_blank_image(blank_image)
    barrier()
    for name in names:
        task = load_task(name, data, cache_dir=out / "cache")
        if args.limit is not None:
            task = first_questions(task, args.limit)
        run = functools.partial(
            run_task, predictor=predictor, rank=env.rank, world_size=env.world_size,
            batch_size=args.batch_size, barrier=barrier,
        )  # fmt: skip
        result = run(task, out_dir=out, progress=_progress(name, env.is_main))
        controlled = {
            control: run(
                ControlledTask(task, control, blank_image),
                out_dir=out / f"control-{control}",
                progress=_progress(f"{name} ({control})", env.is_main),
            )
            for control in args.controls
        }
        if result is not None:
            for skip in result.skipped:
                print(f"[eval] {name}: skipped {skip}", file=sys.stderr)
            if controlled:
                result.majority = majority_baseline(task, result.questions)
            for control, other in controlled.items():
                result.controls[control] = visual_gain(
                    task.score, result.questions, result.predictions, other.predictions
                )
            results.append(result)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(summary_table(results))
        (out / "metrics.json").write_text(
            json.dumps({r.name: r.metrics for r in results}, indent=2, sort_keys=True)
        )
        if args.controls:
            (out / "visual_gain.json").write_text(
                json.dumps(visual_gain_report(results), indent=2, sort_keys=True)
            )
        if not args.no_tracking:
            _log_to_mlflow(args, model_dir, data, out, results)
    return results


def _synthetic_benchmarks(root: Path, env) -> Path:
    """The synthetic benchmark set under `root`, written once by rank 0."""
    from maven_dist.offline.synthetic import generate_synthetic
    from maven_dist.offline.synthetic_benchmarks import write_synthetic_benchmarks
    from maven_dist.parallel.distributed import barrier

    if env.is_main and not (root / ".done").exists():
        images = generate_synthetic(root / "images", num_images=24, seed=1234, image_size=112)
        write_synthetic_benchmarks(root, images, seed=1234)
        (root / ".done").touch()
    barrier()
    return root


def _progress(name: str, enabled: bool):
    import time

    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if enabled and (now - last[0] > 10 or done == total):
            last[0] = now
            print(f"[eval] {name}: {done}/{total} batches (rank 0)", flush=True)

    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------- MLflow


def _log_to_mlflow(args, model_dir: Path, data: Path, out: Path, results: list) -> None:
    from maven_dist.eval.runner import within_noise
    from maven_dist.train.tracking import MLflowTracker, resolve_tracking_uri
    from maven_dist.train.tracking.run_info import TRACKING_URI_ENV, resolve_launch_id

    run_dir = args.run_dir
    recipe = _run_recipe(run_dir) if run_dir else None
    uri = args.tracking_uri or (resolve_tracking_uri(recipe) if recipe else None)
    if uri is None and run_dir:
        uri = (
            os.environ.get(TRACKING_URI_ENV, "").strip()
            or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"
        )
    if uri is None:
        print(
            "[eval] not logged to MLflow: give --run-dir or --tracking-uri (or --no-tracking)",
            file=sys.stderr,
        )
        return
    experiment = args.experiment or (recipe.tracking.experiment if recipe else None) or "maven-eval"
    # The evaluation's record (metrics.jsonl, tracking/) lies in its output folder, under the run directory
    # where there is one: `maven sync RUN_DIR` and the next stage find it there.
    tracker = MLflowTracker(
        record_dir=out, uri=uri, experiment=experiment, launch_id=resolve_launch_id(run_dir or out),
        run_dir=run_dir or out,
    )  # fmt: skip
    label = model_dir.parent.name if model_dir.name == "export" else model_dir.name
    tags = {
        "maven.eval.model_dir": str(model_dir.resolve()),
        "maven.eval.provenance": _provenance(model_dir),
        "maven.eval.data": str(data.resolve()),
        "maven.eval.data_version": _data_version(data, [r.name for r in results]),
    }
    if args.controls:
        tags["maven.eval.visual_gain_within_noise"] = ", ".join(within_noise(results)) or "none"
    tracker.start_stage(f"eval-{label}", params={"eval.tasks": ",".join(r.name for r in results)}, tags=tags)
    tracker.log_metrics(_tracked_metrics(results), step=0)
    for r in results:
        tracker.log_artifact(out / r.name / "predictions.jsonl", artifact_path=f"eval/{r.name}")
        tracker.log_artifact(out / r.name / "metrics.json", artifact_path=f"eval/{r.name}")
    tracker.log_artifact(out / "summary.md", artifact_path="eval")
    if args.controls:
        tracker.log_artifact(out / "visual_gain.json", artifact_path="eval")
    tracker.end_stage("FINISHED")
    tracker.close()


def _tracked_metrics(results: list) -> dict[str, float]:
    """``eval/<task>/<metric>``, and with controls ``.../majority``, ``.../<control>`` (the score under it),
    ``.../visual_gain_<control>`` and its permutation p-value ``.../visual_gain_<control>_p``."""
    metrics = {}
    for r in results:
        for metric, value in r.metrics.items():
            key = f"eval/{r.name}/{metric}"
            metrics[key] = value
            if metric in r.majority:
                metrics[f"{key}/majority"] = r.majority[metric]
            for control, gains in r.controls.items():
                if metric in gains:
                    metrics[f"{key}/{control}"] = gains[metric].control
                    metrics[f"{key}/visual_gain_{control}"] = gains[metric].gain
                    metrics[f"{key}/visual_gain_{control}_p"] = gains[metric].p_value
    return metrics


def _run_recipe(run_dir: Path):
    """The resolved recipe of a stage of the run (the store and experiment its stages logged to), or None."""
    from maven_dist.config import load_config

    for recipe in sorted(Path(run_dir).glob("stage*/resolved_recipe.yaml")):
        return load_config(recipe)
    return None


def _provenance(model_dir: Path) -> str:
    """Where the weights came from: a merge's provenance, or the stage and step of an export."""
    merged = model_dir / "merge_provenance.json"
    if merged.is_file():
        info = json.loads(merged.read_text())
        return f"merge of {info.get('source', '?')} step {info.get('step', '?')}"
    latest = model_dir.parent / "checkpoints" / "latest"
    if model_dir.name == "export" and latest.is_file():
        return f"export of {model_dir.parent.name} at {latest.read_text().strip()}"
    return "unknown"


def _data_version(root: Path, tasks: list[str]) -> str:
    """sha256 (first 16 hex digits) over every file of the evaluated tasks: names, sizes and contents."""
    digest = hashlib.sha256()
    for name in sorted(tasks):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and "cache" not in path.relative_to(root).parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    sys.exit(main())
