"""Drive an engine through the step-level contract the trainer uses, from lists of micro-batches."""

from __future__ import annotations

from collections.abc import Callable

from maven_dist.contract.batch import Batch
from maven_dist.contract.checkpoint_layout import Manifest
from maven_dist.parallel.engine import Engine, NonFiniteGuard


def train_steps(
    engine: Engine, step_batches: Callable[[int], list[Batch]], steps: range
) -> tuple[list[float], list[float]]:
    """Run optimizer steps `steps` (0-based); step k draws from `step_batches(k)`. Losses and grad norms."""
    guard = NonFiniteGuard(max_in_row=1, stage="test")
    losses, norms = [], []
    for step in steps:
        result = engine.train_step(iter(step_batches(step)), guard, step + 1)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return losses, norms


def manifest_for(world_size: int, dp: int | None = None, tp: int = 1, pp: int = 1) -> Manifest:
    """What the checkpoint manager would have written for a layout (for engines loaded by hand)."""
    layout = {"dp": dp if dp is not None else world_size // (tp * pp), "tp": tp, "pp": pp}
    return Manifest(step=0, world_size=world_size, fingerprint="test", stage="test", extra={"layout": layout})


class FixedState:
    """A stand-in for the loader or trainer state where a test has none: saves and restores one mapping."""

    def __init__(self, state: dict | None = None):
        self.state = dict(state or {})

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)
