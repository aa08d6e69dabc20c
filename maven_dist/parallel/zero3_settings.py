"""ZeRO-3's memory knobs, in one place: the DeepSpeed config (``zero3.build_ds_config``) and the memory
planner (``memory_plan.py``) read them from here, so the plan counts the buffers the run allocates.

Values are DeepSpeed 0.19's defaults (``deepspeed/runtime/zero/config.py``) where they are not ours:
``stage3_prefetch_bucket_size`` 5e7 and ``reduce_bucket_size`` 5e8 elements; ``stage3_max_live_parameters``
and ``stage3_max_reuse_distance`` 1e9 elements. On a CPU the two bucket sizes are 10x smaller: the CPU runs are
tiny, and full-size buckets would allocate ~2 GB per rank for nothing.
"""

from __future__ import annotations

PERSISTENCE_THRESHOLD = 1e5
"""Parameters with fewer elements stay whole on every rank (norms, biases): DeepSpeed's default."""
MAX_LIVE_PARAMETERS = 1e9
"""At most this many parameter elements are gathered at once (DeepSpeed's default)."""
MAX_REUSE_DISTANCE = 1e9
"""A gathered parameter is kept if it is used again within this many elements (DeepSpeed's default)."""


def bucket_sizes(gpu: bool) -> dict[str, float]:
    """``reduce_bucket_size`` (the contiguous gradient bucket) and ``stage3_prefetch_bucket_size`` (what is
    gathered ahead of use), in elements."""
    scale = 1 if gpu else 0.1
    return {"reduce_bucket_size": 5e8 * scale, "stage3_prefetch_bucket_size": 5e7 * scale}


def zero_optimization(gpu: bool) -> dict:
    """The ``zero_optimization`` section of the ZeRO-3 engine's DeepSpeed config."""
    return {
        "stage": 3,
        "overlap_comm": gpu,
        "contiguous_gradients": True,
        **bucket_sizes(gpu),
        "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
        "stage3_max_live_parameters": MAX_LIVE_PARAMETERS,
        "stage3_max_reuse_distance": MAX_REUSE_DISTANCE,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
