"""Checks a launch must pass before any process group exists, each with an error that says the fix.

A job that is going to fail should fail at once, in one process, with one message, not as N
ranks timing out in a rendezvous an hour into the queue. The launchers run these before
starting tasks (``slurm/launch.sh`` through ``python -m maven_dist.launch.checks``, and
``python -m maven_dist.launch`` before it submits):

* the recipe exists and loads (``load_config`` names the key and the fix otherwise);
* the world size fits the recipe's layout: ``parallel.tp * parallel.pp`` divides it, and the
  global batch splits evenly over the data-parallel ranks;
* GPUs: a job that asks for GPUs sees them, a model that needs GPUs gets them, and on GPU nodes
  there is exactly one task per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from maven_dist.config import Config, ConfigError, load_config
from maven_dist.contract.command_line import HelpFormatter, add_overrides_option
from maven_dist.launch.inputs import input_problems

GPU_PARAM_THRESHOLD = 1_000_000_000
"""An LLM with at least this many parameters needs GPUs: a 7B step on CPU takes hours, so asking
for it is a mistake to report, not a run to start. The tiny recipes (a few M) stay on CPU."""


class LaunchError(RuntimeError):
    """A launch that cannot work as asked; the message says what to change."""


@dataclass(frozen=True)
class Layout:
    """What a launch asks Slurm (or the local executor) for."""

    nodes: int
    """Nodes in the allocation."""
    tasks_per_node: int
    """Processes per node: one per GPU, or the CPU process count on CPU-only nodes."""
    gpus_per_node: int
    """GPUs requested per node; 0 runs on CPU (gloo)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.tasks_per_node} task(s)"


def estimated_llm_params(cfg: Config) -> int:
    """Rough LLaMA parameter count: attention + SwiGLU per layer, plus embedding and head.

    A pretrained model's own ``config.json`` is used when it is on disk (the recipe's shape
    fields only describe random init).
    """
    llm = cfg.model.llm
    h, layers, inter, heads, kv = (
        llm.hidden_size,
        llm.num_layers,
        llm.intermediate_size,
        llm.num_heads,
        llm.num_kv_heads,
    )
    vocab = 32000
    hf_config = cfg.resolve_path(llm.path) / "config.json"
    if llm.init == "pretrained" and hf_config.is_file():
        try:
            hf = json.loads(hf_config.read_text())
            h = hf.get("hidden_size", h)
            layers = hf.get("num_hidden_layers", layers)
            inter = hf.get("intermediate_size", inter)
            heads = hf.get("num_attention_heads", heads)
            kv = hf.get("num_key_value_heads", kv) or heads
            vocab = hf.get("vocab_size", vocab)
        except (OSError, ValueError):
            pass  # an unreadable config is the trainer's error to report, with its path
    attn = 2 * h * h + 2 * h * (h * kv // heads)
    mlp = 3 * h * inter
    return layers * (attn + mlp) + 2 * vocab * h


def recipe_needs_gpu(cfg: Config) -> bool:
    """True when the model is too large to train on CPU (see :data:`GPU_PARAM_THRESHOLD`)."""
    return estimated_llm_params(cfg) >= GPU_PARAM_THRESHOLD


def visible_gpu_count() -> int:
    """CUDA devices this process can use (imports torch only when asked)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_world_size(cfg: Config, layout: Layout, recipe: str) -> None:
    """``parallel.tp * parallel.pp`` divides the world size and the global batch splits over dp."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    world = layout.world_size
    if world % (tp * pp):
        raise LaunchError(
            f"world size {world} ({layout.describe()}) is not a multiple of parallel.tp * parallel.pp = "
            f"{tp} * {pp} = {tp * pp} in {recipe}: ask for a multiple of {tp * pp} tasks "
            f"(nodes x tasks per node) or change parallel.tp/parallel.pp"
        )
    dp = world // (tp * pp)
    per_step = cfg.stage.micro_batch_size * dp
    if cfg.stage.global_batch_size % per_step:
        raise LaunchError(
            f"stage.global_batch_size={cfg.stage.global_batch_size} in {recipe} is not a multiple of "
            f"stage.micro_batch_size * dp = {cfg.stage.micro_batch_size} * {dp} = {per_step} "
            f"(world size {world} = {layout.describe()}, tp={tp}, pp={pp}): change the task count "
            "or the batch sizes (--set stage.global_batch_size=...)"
        )


def check_gpus(cfg: Config, layout: Layout, recipe: str, visible: int | None = None) -> None:
    """GPUs asked for exist, a model that needs GPUs gets them, one task per GPU.

    ``visible`` is the CUDA device count on this node (counted with torch when None and needed).
    """
    needs = recipe_needs_gpu(cfg)
    if layout.gpus_per_node == 0 and not needs:
        return
    if visible is None:
        visible = visible_gpu_count()
    if needs and (layout.gpus_per_node == 0 or visible == 0):
        params = estimated_llm_params(cfg) / 1e9
        raise LaunchError(
            f"{recipe} trains a ~{params:.1f}B-parameter LLM, which needs GPUs, but "
            + (
                "this launch asks for none"
                if layout.gpus_per_node == 0
                else f"no CUDA device is visible on {os.uname().nodename}"
            )
            + ": request GPUs (--gpus-per-node, MAVEN_GPUS_PER_NODE in slurm/env.sh) on a GPU partition, "
            "or use a CPU-sized recipe such as recipes/tiny/"
        )
    if layout.gpus_per_node > 0 and visible == 0:
        raise LaunchError(
            f"{layout.gpus_per_node} GPU(s) per node requested but no CUDA device is visible on "
            f"{os.uname().nodename} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
            "submit to a GPU partition, or set the GPU count to 0 to run on CPU"
        )
    if layout.gpus_per_node > 0 and layout.tasks_per_node != layout.gpus_per_node:
        raise LaunchError(
            f"{layout.tasks_per_node} task(s) per node but {layout.gpus_per_node} GPU(s) per node: "
            "start exactly one task per GPU (sbatch --ntasks-per-node equal to --gpus-per-node)"
        )
    if layout.gpus_per_node > visible:
        raise LaunchError(
            f"{layout.gpus_per_node} GPU(s) per node requested but only {visible} visible on "
            f"{os.uname().nodename}: lower the GPU count or use nodes with more GPUs"
        )


def check_launch(
    recipe: str | Path,
    overrides: list[str] | None,
    layout: Layout,
    visible_gpus: int | None = None,
    inputs: bool = True,
) -> Config:
    """Load the recipe and run every check (`inputs`: also the files it reads, launch/inputs.py); returns the
    resolved config or raises LaunchError."""
    recipe = str(recipe)
    if not Path(recipe).is_file():
        hint = ""
        if Path(recipe).is_dir():
            hint = f"; it is a directory: name one stage file, e.g. {recipe.rstrip('/')}/stage4.yaml"
        raise LaunchError(
            f"recipe {recipe} does not exist (cwd {os.getcwd()}){hint}; recipes live under recipes/, "
            "e.g. recipes/tiny/stage4.yaml or recipes/maven-7b/stage4.yaml"
        )
    if layout.nodes < 1 or layout.tasks_per_node < 1 or layout.gpus_per_node < 0:
        raise LaunchError(f"invalid layout {layout}: nodes and tasks per node must be >= 1, GPUs >= 0")
    try:
        cfg = load_config(recipe, overrides)
    except ConfigError as exc:
        raise LaunchError(f"{recipe}: {exc}") from None
    check_world_size(cfg, layout, recipe)
    check_gpus(cfg, layout, recipe, visible_gpus)
    problems = input_problems(cfg) if inputs else []
    if problems:
        raise LaunchError(f"{recipe}: its inputs are not ready:\n  - " + "\n  - ".join(problems))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m maven_dist.launch.checks",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("recipe", help="stage recipe, e.g. recipes/maven-7b/stage4.yaml")
    parser.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    parser.add_argument("--tasks-per-node", type=int, required=True, help="ranks per node")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; 0 = CPU")
    parser.add_argument(
        "--visible-gpus", type=int, default=None, help="GPUs to assume present (default: count them)"
    )
    parser.add_argument(
        "--skip-inputs", action="store_true", help="check the layout only, not the files the stage reads"
    )
    add_overrides_option(parser, "override a recipe value, as the stage will run it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m maven_dist.launch.checks RECIPE --nodes N --tasks-per-node T --gpus-per-node G``."""
    args = build_parser().parse_args(argv)
    layout = Layout(args.nodes, args.tasks_per_node, args.gpus_per_node)
    try:
        cfg = check_launch(args.recipe, args.overrides, layout, args.visible_gpus, not args.skip_inputs)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"launch ok: {args.recipe} ({cfg.stage.name}, tp={cfg.parallel.tp}, pp={cfg.parallel.pp}) on "
        f"{layout.describe()} = world size {layout.world_size}, {layout.gpus_per_node} GPU(s) per node; "
        f"run_dir={cfg.run_dir}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
