"""Peak CPU memory of a call, from the allocator's own running total (torch.profiler allocation events)."""

from __future__ import annotations

from collections.abc import Callable

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The CPU allocator's high-water mark during `fn()`, above its level when `fn` started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.typed[1].alloc_size, node.typed[1].total_allocated))
    if not allocations:
        return 0
    allocations.sort()
    start = allocations[0][2] - allocations[0][1]
    return max(total for _, _, total in allocations) - start
