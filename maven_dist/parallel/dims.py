"""The parallel layout, validated once: dp * tp * pp == world_size."""

from __future__ import annotations

from dataclasses import dataclass

from maven_dist.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def build(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        model_parallel = cfg.tp * cfg.pp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not a multiple of parallel.tp * parallel.pp = "
                f"{cfg.tp} * {cfg.pp} = {model_parallel}; launch a multiple of {model_parallel} processes "
                "or change the layout"
            )
        return cls(dp=world_size // model_parallel, tp=cfg.tp, pp=cfg.pp, world_size=world_size)

    def data_parallel_rank(self, rank: int) -> int:
        """The data-parallel coordinate of a global rank (what the loader's dp_rank must be): every tp and
        pp rank of one replica reads the same micro-batches. Ranks are placed tp fastest, then dp, then pp
        (``parallel/topology.py`` proves both libraries agree)."""
        return (rank // self.tp) % self.dp

    def accumulation_steps(self, global_batch: int, micro_batch: int) -> int:
        """Micro-batches each data-parallel rank runs per optimizer step."""
        per_step = micro_batch * self.dp
        if global_batch % per_step:
            raise ConfigError(
                f"stage.global_batch_size={global_batch} is not a multiple of micro_batch_size * dp = "
                f"{micro_batch} * {self.dp} = {per_step}; change the batch sizes or the number of ranks"
            )
        return global_batch // per_step
