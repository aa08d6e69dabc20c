"""Training-step speed of MaVEn against a LLaVA-style arm, at 1, 2 and 4 images per sample, in one run.

    python bench/step.py                                 # CPU-sized shapes (docs/performance.md's numbers)
    python bench/step.py --preset 7b --layers 8          # Vicuna-7B / CLIP-L shapes on a GPU: bf16, MFU
    python bench/step.py --preset tiny --repeats 1       # the tiny recipe's shapes: seconds (the test)

Both arms are the project's own ``MavenModel``, one instance with one set of random weights; only what
the LLM is fed differs:

* ``maven``: the recipe's stage-4 views, 32 codes (+ ``<img>``/``</img>``) and the selector's top
  alpha * 576 patches: 34 + 144 = 178 positions per image at alpha 0.25;
* ``llava``: every patch projected, no discrete view, no selector and so no h_eos pass (alpha 1):
  576 positions per image (all patches of the tower, whatever its image size).

A step is the forward and backward of stage 4 as the recipe sets it up: the parts it trains
(``stage.trainable``: llm, vocab_new_rows, projector), the tower and selector frozen, activation
checkpointing as ``stage.gradient_checkpointing`` says, in ``stage.dtype`` (fp32 on CPU). The
optimizer step is left out: its cost depends on the parameter count, not on the sequence, and is the
same in both arms. Each sample is ``<s>``, its images, ~``--text`` text tokens (the second half labelled,
as an answer), ``</s>``; every sample of a step has the same length, so nothing is padding.

Timing: wall time of whole steps with ``torch.cuda.synchronize`` before and after on GPU. One warm-up
round, then ``--repeats`` rounds; each round runs every image count in both arms back to back
(alternating which arm goes first), so an arm's ratio is the median of paired rounds that saw the
same machine load. samples/s and tokens/s are medians too; tokens are the positions the LLM body
processes (``perf/tokens_per_s``), and model TFLOP/s and MFU use the trainer's definition
(``maven_dist/train/perf.py``: 6 x LLM parameters per position, no attention term, no h_eos pass).
On CPU the step runs on one intra-op thread by default (``--threads``): on a shared 2-core machine
two OpenMP threads wait at every barrier for whichever one the scheduler has taken away (a MaVEn
1-image step took 9.7 s on 2 threads under load and 3.3 s on 1). The same ratios are also printed
from this process's CPU seconds per step (``time.process_time``), which other processes' load barely
moves on one thread: where the two disagree, the wall-time ratios saw contention.

Where the MaVEn step goes: each round also runs one *instrumented* MaVEn step per image count, timed
with explicit timers, not torch.profiler (the profiler's per-op bookkeeping inflates a CPU step far
more than it inflates the big matmuls, and it does not split backward by the forward's regions).
Module hooks and wrapped methods mark region boundaries in forward (tower, h_eos pass, selector:
the MLP scores and the top-k gather, projector, assembly: discrete-code embedding and
``assemble_sequences``, LLM body, loss: ``UnifiedHeadLoss``); gradient hooks on the LLM body's output,
its input embeddings and the projector's output mark them in backward (loss, then LLM body, then
assembly, then projector). Each boundary synchronises the GPU, and each region's time is exclusive
(the h_eos pass's LLM call is the h_eos pass's, not the LLM body's). ``other`` is what lies between:
the label gather before the loss, the metrics. The instrumented step's total is printed beside the
plain step's, so the cost of the synchronisations shows.

The last lines are ``ratio@2img``, ``ratio@4img`` and ``ratio@1img``: MaVEn samples/s over
LLaVA-style samples/s (> 1: MaVEn is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from maven_dist.config import Config
from maven_dist.contract.batch import Batch
from maven_dist.contract.lengths import num_kept_patches
from maven_dist.model.maven import MavenModel
from maven_dist.train.perf import device_peak_flops

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness


@dataclass(frozen=True)
class Arm:
    views: tuple[str, ...]
    keep_ratio: float


def arms(cfg: Config) -> dict[str, Arm]:
    return {
        "maven": Arm(tuple(cfg.stage.views), cfg.model.selector.keep_ratio),
        "llava": Arm(("continuous",), 1.0),
    }


def load_preset(name: str, layers: int | None):
    return harness.load_preset(name, [f"model.llm.num_layers={layers}"] if layers else [])


def use_arm(model: MavenModel, arm: Arm) -> None:
    model.spec = dataclasses.replace(model.spec, keep_ratio=arm.keep_ratio)


def llm_parameters(model: MavenModel) -> int:
    """The N of MFU = 6 N T / (dt P): the LLM with the unified vocabulary's new rows (as StepMeter)."""
    return sum(p.numel() for part in (model.llm, model.vocab_new_rows) for p in part.parameters())


# ---------------------------------------------------------------------- timing


def plain_step(model: MavenModel, batch: Batch, arm: Arm, sync) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, LLM-body positions) of one forward + backward,
    nothing instrumented."""
    use_arm(model, arm)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = model(batch, views=arm.views)
    out.loss.backward()
    sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    model.zero_grad(set_to_none=True)
    return seconds, cpu_seconds, out.num_input_tokens


class RegionClock:
    """Exclusive wall time per region of one step: entering a region pauses the one around it.

    Backward has no call structure to hook into, only the moments gradients reach tensors, so there
    :meth:`backward_in` says which region the time from now on belongs to."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack = ["other"]
        self.phase = ""
        self.mark = 0.0

    def _charge(self) -> None:
        self.sync()
        now = time.perf_counter()
        self.seconds[self.stack[-1] + self.phase] += now - self.mark
        self.mark = now

    def start(self) -> None:
        self.sync()
        self.mark = time.perf_counter()

    def enter(self, region: str) -> None:
        self._charge()
        self.stack.append(region)

    def leave(self) -> None:
        self._charge()
        self.stack.pop()

    def backward_in(self, region: str) -> None:
        self._charge()
        self.stack, self.phase = [region], " bwd"

    def stop(self) -> dict[str, float]:
        self._charge()
        return dict(self.seconds)


@contextlib.contextmanager
def instrumented(model: MavenModel, clock: RegionClock) -> Iterator[None]:
    """Region boundaries on `model` for the duration of the block (hooks and wrapped methods)."""
    handles = []

    def region(module: torch.nn.Module, name: str) -> None:
        handles.append(module.register_forward_pre_hook(lambda *_: clock.enter(name)))
        handles.append(module.register_forward_hook(lambda *_: clock.leave()))

    def body_enters(module, args, kwargs) -> None:
        # The h_eos pass calls the same LLM body: that call stays in the h_eos pass's region.
        clock.enter("h_eos pass" if clock.stack[-1] == "h_eos pass" else "LLM body")
        embeds = kwargs["inputs_embeds"]
        if embeds.requires_grad:  # reached in backward once the LLM body's backward is done
            embeds.register_hook(lambda grad: clock.backward_in("assembly"))

    def body_leaves(module, args, kwargs, out) -> None:
        clock.leave()
        if out.last_hidden_state.requires_grad:  # reached once the loss's backward is done
            out.last_hidden_state.register_hook(lambda grad: clock.backward_in("LLM body"))

    def projector_leaves(module, args, out) -> None:
        if out.requires_grad:  # reached once the assembly's backward is done
            out.register_hook(lambda grad: clock.backward_in("projector"))

    region(model.vision_tower, "tower")
    region(model.projector, "projector")
    region(model.lm_loss, "loss")
    handles.append(model.projector.register_forward_hook(projector_leaves))
    handles.append(model.llm.model.register_forward_pre_hook(body_enters, with_kwargs=True))
    handles.append(model.llm.model.register_forward_hook(body_leaves, with_kwargs=True))
    # The forward calls these through `self`, so instance attributes shadow them for the block.
    wrapped = {"eos_states": "h_eos pass", "kept_patches": "selector", "sequence_inputs": "assembly"}
    for method, name in wrapped.items():
        setattr(model, method, _in_region(getattr(model, method), name, clock))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for method in wrapped:
            delattr(model, method)


def _in_region(fn: Callable, name: str, clock: RegionClock) -> Callable:
    def timed(*args, **kwargs):
        clock.enter(name)
        try:
            return fn(*args, **kwargs)
        finally:
            clock.leave()

    return timed


def instrumented_step(model: MavenModel, batch: Batch, arm: Arm, sync) -> dict[str, float]:
    """Seconds per region (``" bwd"`` appended in backward) of one forward + backward."""
    use_arm(model, arm)
    clock = RegionClock(sync)
    with instrumented(model, clock):
        clock.start()
        out = model(batch, views=arm.views)
        clock.backward_in("loss")
        out.loss.backward()
        seconds = clock.stop()
    model.zero_grad(set_to_none=True)
    return seconds


# ---------------------------------------------------------------------- the run


@dataclass
class Measured:
    steps: dict[tuple[str, int], list[float]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    """(arm, images) -> seconds of each timed plain step."""
    cpu_steps: dict[tuple[str, int], list[float]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    """(arm, images) -> this process's CPU seconds of each timed plain step."""
    positions: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    """(arm, images) -> LLM-body positions per step."""
    regions: dict[int, list[dict[str, float]]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    """images -> seconds per region of each instrumented MaVEn step."""


def measure(model, cfg, batches: dict[int, Batch], repeats: int, sync) -> Measured:
    """One warm-up round and `repeats` timed rounds; each round alternates which arm goes first."""
    measured, by_name = Measured(), arms(cfg)
    for round_index in range(1 + repeats):
        order = list(by_name.items())
        order = order if round_index % 2 else order[::-1]
        for images, batch in batches.items():
            for name, arm in order:
                seconds, cpu_seconds, positions = plain_step(model, batch, arm, sync)
                measured.positions[(name, images)] = positions
                if round_index:
                    measured.steps[(name, images)].append(seconds)
                    measured.cpu_steps[(name, images)].append(cpu_seconds)
            regions = instrumented_step(model, batch, by_name["maven"], sync)
            if round_index:
                measured.regions[images].append(regions)
        print(f"# round {round_index}/{repeats} done" + (" (warm-up)" if not round_index else ""), flush=True)
    return measured


def paired_ratio(steps: dict[tuple[str, int], list[float]], images: int) -> float:
    """Median over rounds of llava seconds / maven seconds (= MaVEn samples/s over LLaVA's)."""
    pairs = zip(steps[("llava", images)], steps[("maven", images)], strict=True)
    return statistics.median(llava / maven for llava, maven in pairs)


def throughput(measured: Measured, samples: int, n_params: int, peak: float | None) -> list[dict]:
    """One row per arm and image count (median step): positions per sample, step ms, samples/s, tokens/s,
    model TFLOP/s and, where the device's peak is known, MFU (the trainer's 6 N T / (dt P))."""
    rows = []
    for (name, images), runs in sorted(
        measured.steps.items(), key=lambda kv: (kv[0][1], kv[0][0] != "maven")
    ):
        seconds, positions = statistics.median(runs), measured.positions[(name, images)]
        flops = 6 * n_params * positions / seconds
        rows.append({"arm": name, "images": images, "positions_per_sample": positions // samples,
                     "step_ms": seconds * 1e3, "samples_per_s": samples / seconds, "tokens_per_s": positions / seconds,
                     "model_tflops": flops / 1e12, "mfu": flops / peak if peak else None})  # fmt: skip
    return rows


def print_throughput(rows: list[dict]) -> None:
    mfu = rows and rows[0]["mfu"] is not None
    print(f"{'arm':<6} {'images':>6} {'positions/sample':>16} {'step ms':>9} {'samples/s':>9} {'tokens/s':>9} "
          f"{'model TFLOP/s':>13}" + (f" {'MFU':>6}" if mfu else ""))  # fmt: skip
    for r in rows:
        print(f"{r['arm']:<6} {r['images']:>6} {r['positions_per_sample']:>16} {r['step_ms']:>9.1f} "
              f"{r['samples_per_s']:>9.2f} {r['tokens_per_s']:>9.0f} {r['model_tflops']:>13.3f}"
              + (f" {r['mfu']:>6.1%}" if mfu else ""))  # fmt: skip


REGION_ORDER = ("tower", "h_eos pass", "selector", "projector", "assembly", "LLM body", "loss", "other")


def print_regions(measured: Measured) -> None:
    counts = sorted(measured.regions)
    names = [r + phase for r in REGION_ORDER for phase in ("", " bwd")]
    names = [n for n in names if any(n in step for runs in measured.regions.values() for step in runs)]
    print("# share of the MaVEn step by region (median of the instrumented steps; exclusive wall time)")
    print(f"{'region':<16}" + "".join(f" {f'{k}img ms':>9} {'share':>6}" for k in counts))
    for name in names:
        cells = []
        for k in counts:
            runs = measured.regions[k]
            ms = statistics.median(step.get(name, 0.0) for step in runs) * 1e3
            share = statistics.median(step.get(name, 0.0) / sum(step.values()) for step in runs)
            cells.append(f" {ms:>9.1f} {share:>6.1%}")
        print(f"{name:<16}" + "".join(cells))
    totals = [statistics.median(sum(step.values()) for step in measured.regions[k]) * 1e3 for k in counts]
    plain = [statistics.median(measured.steps[("maven", k)]) * 1e3 for k in counts]
    print(f"{'total':<16}" + "".join(f" {t:>9.1f} {'':>6}" for t in totals))
    print(f"{'plain step':<16}" + "".join(f" {p:>9.1f} {'':>6}" for p in plain))
    for k in counts:
        runs = measured.regions[k]
        share = statistics.median(_h_eos_share(step) for step in runs)
        print(f"h_eos@{k}img {share:.1%} of the MaVEn step")


def describe(cfg: Config, preset_name: str, model: MavenModel, samples: int, args) -> str:
    m, tower, layout = cfg.model, model.vision_tower, model.layout
    kept = num_kept_patches(tower.num_patches, m.selector.keep_ratio)
    recipe = harness.PRESETS[preset_name].recipe.relative_to(harness.REPO)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return (
        f"# {preset_name} preset ({recipe}): LLM {m.llm.num_layers} x "
        f"{m.llm.hidden_size}, vocabulary {layout.text_size} text + {layout.codebook_size} codes "
        f"({layout.padded_size} rows); CLIP {m.vision.num_layers} x {m.vision.hidden_size} at "
        f"{m.vision.image_size} px ({tower.num_patches} patches; maven keeps {kept}); {samples} samples/step, "
        f"{args.text} text tokens each; {dtype}, activation checkpointing "
        f"{'on' if cfg.stage.gradient_checkpointing else 'off'}, attention {m.llm.attn_implementation}; "
        f"trains {', '.join(cfg.stage.trainable)}; forward + backward, no optimizer step; "
        f"{args.repeats} timed rounds after 1 warm-up round"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(harness.PRESETS), default="cpu")
    p.add_argument("--layers", type=int, help="LLM layers (a slice of the recipe's LLM, so it fits)")
    p.add_argument(
        "--samples", type=int, help="samples per step (default: the preset's stage.micro_batch_size)"
    )
    p.add_argument("--text", type=int, default=120, help="text tokens per sample, <s> and </s> included")
    p.add_argument("--images", default="1,2,4", help="images per sample, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (default 1: on a shared machine more threads wait at every "
        "barrier for the one that is descheduled)",
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], help="default: the recipe's stage.dtype on GPU, fp32 on CPU"
    )
    p.add_argument(
        "--activation-checkpointing",
        choices=["recipe", "on", "off"],
        default="recipe",
        help="recompute the LLM's activations in backward (default: stage.gradient_checkpointing)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1 (the ratios are medians over the timed rounds)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the bench; returns its figures: ``ratio`` {images per sample: MaVEn samples/s over LLaVA-style
    samples/s}, ``samples_per_s`` and ``positions_per_sample`` per arm and image count, ``h_eos_share`` and
    ``regions_ms`` (the instrumented MaVEn step) per image count."""
    args = parse_args(argv)
    cfg, preset = load_preset(args.preset, args.layers)
    if args.activation_checkpointing != "recipe":
        cfg.stage.gradient_checkpointing = args.activation_checkpointing == "on"
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or (cfg.stage.dtype if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    samples = args.samples or cfg.stage.micro_batch_size
    model = harness.build_model(cfg, preset.text_vocab, device, dtype)
    counts = [int(k) for k in args.images.split(",")]
    batches = {k: harness.make_batch(model, samples, k, args.text, device) for k in counts}
    print(f"# hardware: {harness.hardware(device)}")
    print(describe(cfg, args.preset, model, samples, args), flush=True)
    measured = measure(model, cfg, batches, args.repeats, harness.synchronizer(device))
    peak = device_peak_flops() if device.type == "cuda" else None
    rows = throughput(measured, samples, llm_parameters(model), peak)
    print_throughput(rows)
    print_regions(measured)
    ratios = {k: paired_ratio(measured.steps, k) for k in counts}
    if device.type == "cpu":  # a cross-check on a shared machine: other processes' load barely moves it
        by_cpu = "  ".join(f"{k}img {paired_ratio(measured.cpu_steps, k):.2f}" for k in counts)
        print(f"# the same ratio by this process's CPU seconds per step: {by_cpu}")
    print(f"# ratio = maven samples/s / llava samples/s (wall time), median of {args.repeats} paired rounds")
    for k in sorted(counts, key=lambda k: {4: 1, 1: 2}.get(k, 0)):  # ratio@4img and ratio@1img last
        print(f"ratio@{k}img {ratios[k]:.2f}")
    return {
        "ratio": ratios,
        "samples_per_s": {arm: {k: samples / statistics.median(measured.steps[(arm, k)]) for k in counts}
                          for arm in ("maven", "llava")},
        "positions_per_sample": {arm: {k: measured.positions[(arm, k)] // samples for k in counts}
                                 for arm in ("maven", "llava")},
        "h_eos_share": {k: statistics.median(_h_eos_share(step) for step in measured.regions[k]) for k in counts},
        "regions_ms": {k: {name: statistics.median(step.get(name, 0.0) for step in measured.regions[k]) * 1e3
                           for name in {n for step in measured.regions[k] for n in step}} for k in counts},
    }  # fmt: skip


def _h_eos_share(step: dict[str, float]) -> float:
    return (step.get("h_eos pass", 0.0) + step.get("h_eos pass bwd", 0.0)) / sum(step.values())


if __name__ == "__main__":
    main()
