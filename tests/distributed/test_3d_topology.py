"""megatron-core and DeepSpeed place ranks the same way for every 3D layout we may launch.

The engine also checks the live groups at start-up (``check_topologies_agree``, run by every 3D
worker); this test covers layouts far larger than the CPU runs, from the libraries' own rank
generators (no process group needed).
"""

from __future__ import annotations

import pytest
from megatron.core.parallel_state import RankGenerator

from maven_dist.config import ConfigError, ParallelConfig
from maven_dist.parallel.dims import ParallelDims
from maven_dist.parallel.topology import build_topology

AXES = {"tp": "model", "pp": "pipe", "dp": "data"}


@pytest.mark.parametrize(
    ("tp", "pp", "world"), [(2, 1, 2), (1, 2, 2), (2, 2, 4), (2, 2, 8), (4, 2, 8), (4, 2, 32), (8, 4, 64)]
)
def test_megatron_and_deepspeed_groups_agree(tp, pp, world):
    dims = ParallelDims.build(ParallelConfig(backend="3d", tp=tp, pp=pp), world)
    topo = build_topology(dims)
    generator = RankGenerator(tp=dims.tp, ep=1, dp=dims.dp, pp=dims.pp, cp=1, order="tp-cp-ep-dp-pp")
    for ours, theirs in AXES.items():
        megatron = sorted(sorted(g) for g in generator.get_ranks(ours))
        deepspeed = sorted(sorted(g) for g in topo.get_axis_comm_lists(theirs)) or [[r] for r in range(world)]
        assert megatron == deepspeed, f"{ours} groups differ for tp={tp} pp={pp} world={world}"
    for rank in range(world):
        coord = topo.get_coord(rank)
        assert rank == coord.pipe * dims.dp * dims.tp + coord.data * dims.tp + coord.model


def test_world_size_must_be_a_multiple_of_tp_times_pp():
    with pytest.raises(ConfigError, match="tp \\* parallel.pp"):
        ParallelDims.build(ParallelConfig(backend="3d", tp=4, pp=2), 12)


def test_data_parallel_rank_is_the_topology_coordinate():
    dims = ParallelDims.build(ParallelConfig(backend="3d", tp=2, pp=2), 8)
    topo = build_topology(dims)
    assert [dims.data_parallel_rank(r) for r in range(8)] == [topo.get_coord(r).data for r in range(8)]
    assert dims.data_parallel_rank(5) == 0  # rank // (tp * pp) would say 1: that is the pipe coordinate
