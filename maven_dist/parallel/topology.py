"""One rank placement for megatron-core and DeepSpeed: tp fastest, then dp, then pp.

megatron-core's ``parallel_state`` (order ``tp-cp-ep-dp-pp``) and DeepSpeed's
``PipeModelDataParallelTopology`` (axes ``pipe, data, model``, the last varying fastest) both put
rank = pp_rank·dp·tp + dp_rank·tp + tp_rank. ``check_topologies_agree`` proves it at start-up from
the groups each library actually built, so a version change cannot silently misplace ranks.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from maven_dist.parallel.dims import ParallelDims


def build_topology(dims: ParallelDims) -> PipeModelDataParallelTopology:
    return PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)


def maybe_init_model_parallel(dims: ParallelDims) -> None:
    """megatron-core's tp/pp/dp groups (its layers find the tp group there); idempotent."""
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        ) != (dims.tp, dims.pp):
            raise RuntimeError("megatron-core model parallelism is already initialised with another layout")
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        order="tp-cp-ep-dp-pp",
        create_gloo_process_groups=False,
    )


def check_topologies_agree(topo: PipeModelDataParallelTopology) -> None:
    """Raise unless this rank's tp, pp and dp coordinates and group members agree in both libraries."""
    rank = dist.get_rank()
    coord = topo.get_coord(rank)
    ours = {"model": coord.model, "pipe": coord.pipe, "data": coord.data}
    megatron = {
        "model": parallel_state.get_tensor_model_parallel_rank(),
        "pipe": parallel_state.get_pipeline_model_parallel_rank(),
        "data": parallel_state.get_data_parallel_rank(),
    }
    groups = {
        "model": parallel_state.get_tensor_model_parallel_group(),
        "pipe": parallel_state.get_pipeline_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
    }
    for axis, group in groups.items():
        members = sorted(dist.get_process_group_ranks(group))
        ds_members = (
            next(sorted(g) for g in topo.get_axis_comm_lists(axis) if rank in g)
            if topo.get_dim(axis) > 1
            else [rank]
        )
        if ours[axis] != megatron[axis] or members != ds_members:
            raise RuntimeError(
                f"rank {rank}: DeepSpeed places it at {axis}={ours[axis]} with {ds_members}, megatron-core at "
                f"{megatron[axis]} with {members}; the two libraries disagree on rank placement"
            )


def pipe_ranks(topo: PipeModelDataParallelTopology) -> list[int]:
    """Global ranks of this rank's pipe group, in stage order."""
    coord = topo.get_coord(dist.get_rank())
    return [topo.get_rank(pipe=s, data=coord.data, model=coord.model) for s in range(topo.get_dim("pipe"))]
