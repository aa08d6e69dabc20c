"""Stages are data: map the parts a stage names to parameters and freeze everything else."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import nn

# Each part is a parameter-name prefix of MavenModel. `vocab_new_rows` holds the unified
# vocabulary's new rows apart from the LLM's text rows, so stage 2 trains exactly those.
PART_PREFIXES: dict[str, str] = {
    "llm": "llm.",
    "vocab_new_rows": "vocab_new_rows.",
    "projector": "projector.",
    "selector": "selector.",
    "vision_tower": "vision_tower.",
}


def part_of(name: str) -> str:
    for part, prefix in PART_PREFIXES.items():
        if name.startswith(prefix):
            return part
    raise KeyError(f"parameter {name!r} belongs to no known part {list(PART_PREFIXES)}")


def apply_trainable(model: nn.Module, parts: Iterable[str]) -> list[str]:
    """Set requires_grad on exactly the parameters of `parts`; return the trainable names."""
    wanted = set(parts)
    unknown = wanted - set(PART_PREFIXES)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; allowed: {list(PART_PREFIXES)}")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) in wanted)
        if param.requires_grad:
            trainable.append(name)
    return trainable


def trainable_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
