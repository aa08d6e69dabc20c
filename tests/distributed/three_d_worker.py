"""Worker for test_3d_engine.py: the tiny MaVEn on the 3D backend, several checks in one process group.

argv: MAVEN_DIR OUT_FILE STAGE STEPS TP PP RESUME_AT CKPT_DIR [gc]   (gc: activation checkpointing on)

1. One micro-batch forward and backward by hand through this rank's pipeline layers (blocking p2p
   between stages): loss, full logits (gathered over tp, vocabulary order) and every trainable
   parameter's gradient (gathered to full tensors).
2. STEPS training steps through ``ThreeDEngine.train_step`` (DeepSpeed's pipeline schedule); the
   state is saved after RESUME_AT steps (0: no save).
3. With RESUME_AT > 0: a fresh engine loads that checkpoint and runs the remaining steps.

Rank 0 writes everything to OUT_FILE.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.core import parallel_state  # noqa: E402

from maven_dist.config import Config, load_config  # noqa: E402
from maven_dist.parallel.convert import full_name, placement  # noqa: E402
from maven_dist.parallel.dims import ParallelDims  # noqa: E402
from maven_dist.parallel.distributed import init_distributed  # noqa: E402
from maven_dist.parallel.three_d import ThreeDEngine  # noqa: E402
from tests.helpers.batches import make_batch  # noqa: E402
from tests.helpers.memory import peak_allocated_bytes  # noqa: E402
from tests.helpers.steps import manifest_for, train_steps  # noqa: E402

NUM_CODES = 8
CODEBOOK = 64
MICRO = 3
GLOBAL = 6
VAL_BATCHES = 4


def stage_config(
    stage: str,
    tp: int = 1,
    pp: int = 1,
    run_dir: str = "/tmp/unused",
    checkpointing: bool = False,
    extra: tuple[str, ...] = (),
) -> Config:
    """The tiny stage recipe at test size; the vocabulary padded to 128 * 2 so tp=2 divides it."""
    return load_config(
        f"tests/recipes/tiny/{stage}.yaml",
        [
            f"run_dir={run_dir}",
            f"model.discrete.codebook_size={CODEBOOK}",
            f"model.discrete.num_codes={NUM_CODES}",
            "model.vocab.pad_to_multiple_of=256",
            "model.selector.hidden_size=16",
            f"stage.micro_batch_size={MICRO}",
            f"stage.global_batch_size={GLOBAL}",
            f"stage.gradient_checkpointing={str(checkpointing).lower()}",
            "stage.schedule.warmup_ratio=0",
            f"parallel.backend={'3d' if tp * pp > 1 else 'zero3'}",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            *extra,
        ],
    )


def micro_batches(layout, image_size: int, num_patches: int, n: int) -> list:
    return [make_batch(layout, NUM_CODES, image_size, num_patches, seed=i) for i in range(n)]


def _send(t: torch.Tensor, dst: int) -> None:
    dist.send(torch.tensor(list(t.shape), dtype=torch.long), dst=dst)
    dist.send(t.contiguous(), dst=dst)


def _recv(ndim: int, dtype: torch.dtype, src: int) -> torch.Tensor:
    shape = torch.empty(ndim, dtype=torch.long)
    dist.recv(shape, src=src)
    out = torch.empty(*shape.tolist(), dtype=dtype)
    dist.recv(out, src=src)
    return out


def manual_forward_backward(engine: ThreeDEngine, batch) -> dict:
    """Forward and backward of one micro-batch through the pipeline by hand (no DeepSpeed schedule)."""
    layers, stage, ranks = engine.local_layers, engine.stage, engine.pipe_ranks
    pp, num_layers = len(ranks), engine.num_layers
    inputs = engine.stage_inputs([batch])[0][0]
    if stage == 0:
        x = layers[0](inputs)
        received = None
    else:
        hidden = _recv(3, torch.float32, ranks[stage - 1]).requires_grad_(True)
        mask, labels = _recv(2, torch.long, ranks[stage - 1]), _recv(2, torch.long, ranks[stage - 1])
        x, received = (hidden, mask, labels), hidden
    for index in sorted(layers):
        if 1 <= index <= num_layers:
            x = layers[index](x)
    result = {}
    if stage < pp - 1:
        for t in x:
            _send(t.detach(), ranks[stage + 1])
        grad = torch.empty_like(x[0])
        dist.recv(grad, src=ranks[stage + 1])
        x[0].backward(grad)
    else:
        head = layers[num_layers + 1]
        loss = head(x)
        result = {"loss": loss.detach(), "logits": full_logits(head, x[0]).detach()}
        loss.backward()
    if received is not None:
        dist.send(received.grad.contiguous(), dst=ranks[stage - 1])
    return result


def full_logits(head, hidden: torch.Tensor) -> torch.Tensor:
    """The output stage's logits, every tp shard gathered and put back in vocabulary order."""
    local = head.local_logits(head.norm(hidden)).contiguous()
    # megatron's gather helper allocates on CUDA; a plain all_gather is the same on any device.
    parts = [torch.empty_like(local) for _ in range(head.tp)]
    dist.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
    t, n = head.layout.text_size // head.tp, head.layout.num_new_rows // head.tp
    shards = torch.cat(parts, dim=-1).split(t + n, dim=-1)
    return torch.cat([s[..., :t] for s in shards] + [s[..., t:] for s in shards], dim=-1)


class SavedBytes:
    """Bytes autograd saves for backward inside a block (each storage once): measured activations."""

    def __init__(self):
        self.total, self._seen = 0, set()

    def _pack(self, t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.total += key[1]
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def measured_memory(engine: ThreeDEngine, batch) -> dict:
    """This rank's model-state bytes (weights; optimizer state incl. ZeRO-1's fp32 partitions) after
    training, and on pipeline stage 0 the activation bytes autograd saves in one decoder layer and,
    with pp=1, in the output stage, for `batch` (the planner's inputs, checked in the tests)."""
    params = sum(p.numel() * p.element_size() for p in engine.pipe.parameters())
    opt = engine.engine.optimizer
    optimizer = sum(t.numel() * t.element_size() for t in getattr(opt, "single_partition_of_fp32_groups", []))
    inner = getattr(opt, "optimizer", opt)
    optimizer += sum(
        v.numel() * v.element_size()
        for st in inner.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    result = {
        "stage": engine.stage,
        "tp": engine.tp_rank,
        "dp": engine.dp_rank,
        "params": params,
        "optimizer": optimizer,
    }
    inputs = engine.stage_inputs([batch])[0][0]  # collective (the h_eos pass): every stage calls it
    if engine.stage == 0:
        x = engine.local_layers[0](inputs)
        hidden = x[0].detach().requires_grad_(True)
        layer = engine.local_layers[1]
        with SavedBytes() as saved:
            out = layer((hidden, x[1], x[2]))
        result |= {"layer_act": saved.total, "seq": int(hidden.shape[1]), "rows": int(hidden.shape[0])}
        head = engine.local_layers.get(engine.num_layers + 1)
        if head is not None:
            # The loss's activation peak over forward and backward (collective over tp: every tp rank
            # runs it). The head's weights are frozen meanwhile: their gradients are counted apart, and
            # DeepSpeed's gradient hooks would allocate its reduction buckets here.
            head_input = (out[0].detach().requires_grad_(True), x[1], x[2])
            trainable = [p for p in head.parameters() if p.requires_grad]
            for p in trainable:
                p.requires_grad_(False)
            result["head_peak"] = peak_allocated_bytes(lambda: head(head_input).backward())
            for p in trainable:
                p.requires_grad_(True)
    return result


def gathered_grads(engine: ThreeDEngine) -> dict[str, torch.Tensor] | None:
    """Full gradients of the trainable parameters on rank 0 (shards concatenated like the weights)."""
    local = {}
    for key, p in engine.pipe.named_parameters():
        if p.grad is not None:
            layer, name = key.split(".", 1)
            local[full_name(int(layer), name, engine.num_layers)] = p.grad.detach().clone()
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((engine.tp_rank, engine.dp_rank, local), gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    shards: dict[str, dict[int, torch.Tensor]] = {}
    for tp_rank, dp_rank, state in gathered:
        if dp_rank == 0:
            for name, g in state.items():
                shards.setdefault(name, {})[tp_rank] = g
    out = {}
    for name, by_rank in shards.items():
        split = placement(name, engine.num_layers).split_dim
        out[name] = (
            by_rank[0] if split is None else torch.cat([by_rank[r] for r in sorted(by_rank)], dim=split)
        )
    return out


def selection_probe(engine: ThreeDEngine, batch) -> dict | None:
    """Kept-patch indices of `batch`'s images, and again with image 0's codes changed (collective: the
    h_eos pass runs on every stage). On pipeline stage 0 (where the selector is), else None."""
    changed = with_codes_of_image0_changed(batch.image_codes)
    h_eos, h_eos_changed = engine.eos_states(batch.image_codes), engine.eos_states(changed)
    if engine.stage != 0:
        return None
    front = engine.local_layers[0]
    with torch.no_grad():
        features = front.vision_tower(batch.pixel_values)
        return {
            "kept": front.selected_patches(features, h_eos),
            "kept_changed": front.selected_patches(features, h_eos_changed),
        }


def with_codes_of_image0_changed(codes: torch.Tensor) -> torch.Tensor:
    changed = codes.clone()
    changed[0] = (changed[0] + 17) % CODEBOOK
    return changed


def run_steps(
    engine: ThreeDEngine, batches: list, dims: ParallelDims, steps: range
) -> tuple[list[float], list[float]]:
    """Train `steps`; each replica takes its micro-batches of the global step. Losses and grad norms."""
    per_step = engine.accumulation * dims.dp

    def mine(step: int) -> list:
        return [batches[step * per_step + a * dims.dp + engine.dp_rank] for a in range(engine.accumulation)]

    return train_steps(engine, mine, steps)


def main() -> None:
    maven_dir, out_file, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    steps, tp, pp, resume_at, ckpt_dir = (
        int(sys.argv[4]),
        int(sys.argv[5]),
        int(sys.argv[6]),
        int(sys.argv[7]),
        Path(sys.argv[8]),
    )
    env = init_distributed()
    cfg = stage_config(stage, tp, pp, checkpointing=sys.argv[9:] == ["gc"])
    dims = ParallelDims.build(cfg.parallel, env.world_size)
    accumulation = dims.accumulation_steps(cfg.stage.global_batch_size, cfg.stage.micro_batch_size)
    engine = ThreeDEngine(maven_dir, cfg, dims, total_steps=steps, accumulation=accumulation)
    tower = engine.module.vision_tower
    batches = micro_batches(
        engine.layout, tower.tower.config.image_size, tower.num_patches, steps * GLOBAL // MICRO
    )

    start = time.perf_counter()
    codes = batches[0].image_codes
    for _ in range(3):
        engine.eos_states(codes)
    eos_s = (time.perf_counter() - start) / 3
    single = manual_forward_backward(engine, batches[0])
    result = {"eos_pass_s": eos_s, "selection": selection_probe(engine, batches[0])}
    # The last stage of rank 0's pipe group holds loss and logits; rank 0 writes them.
    last = engine.pipe_ranks[-1] if dist.get_rank() == 0 else None
    if (
        engine.dp_rank == 0
        and engine.tp_rank == 0
        and engine.stage == len(engine.pipe_ranks) - 1
        and dist.get_rank() != 0
    ):
        dist.send(torch.tensor(list(single["logits"].shape)), dst=0)
        dist.send(single["loss"].reshape(1), dst=0)
        dist.send(single["logits"].contiguous(), dst=0)
    if dist.get_rank() == 0:
        if single:
            result |= single
        else:
            shape = torch.empty(3, dtype=torch.long)
            dist.recv(shape, src=last)
            loss = torch.empty(1)
            dist.recv(loss, src=last)
            logits = torch.empty(*shape.tolist())
            dist.recv(logits, src=last)
            result |= {"loss": loss[0], "logits": logits}
    result["grads"] = gathered_grads(engine)
    for p in engine.pipe.parameters():
        p.grad = None

    start = time.perf_counter()
    if resume_at:
        first, first_norms = run_steps(engine, batches, dims, range(resume_at))
        engine.save(ckpt_dir)
        rest, rest_norms = run_steps(engine, batches, dims, range(resume_at, steps))
        result["losses"], result["grad_norms"] = first + rest, first_norms + rest_norms
    else:
        result["losses"], result["grad_norms"] = run_steps(engine, batches, dims, range(steps))
    result["step_s"] = (time.perf_counter() - start) / steps
    # Validation of the trained model: replica r evaluates every dp-th of the first VAL_BATCHES micro-batches.
    result["val"] = engine.evaluate(
        b for k, b in enumerate(batches[:VAL_BATCHES]) if k % dims.dp == engine.dp_rank
    )
    memory = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(measured_memory(engine, batches[0]), memory, dst=0)
    result["memory"] = memory
    result["state"] = engine.export_state_dict()
    if resume_at:
        resumed = ThreeDEngine(maven_dir, cfg, dims, total_steps=steps, accumulation=accumulation)
        resumed.load(ckpt_dir, manifest_for(env.world_size, tp=tp, pp=pp))
        result["resumed_losses"], _ = run_steps(resumed, batches, dims, range(resume_at, steps))
        result["resumed_state"] = resumed.export_state_dict()
    if env.rank == 0:
        torch.save(result, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
