"""bf16 weights with fp32 master copies, for the engines DeepSpeed does not wrap, and TF32 for fp32 stages.

DeepSpeed's bf16 engines keep the model in bf16 for the forward and backward and an fp32 copy of every
trainable parameter for the optimizer (``deepspeed/runtime/bf16_optimizer.py``). The one-process engine
and the 3D engine's ZeRO-less path (a pipeline stage that trains nothing, where DeepSpeed's
``BF16_Optimizer`` fails) do the same here:

* the model's parameters are bf16; frozen ones have no other copy;
* after every micro-batch's backward, the bf16 gradients are added into the fp32 masters' gradients and
  dropped (accumulating in bf16 would round every addition to 8 bits);
* the optimizer (clipping included) runs on the masters; the model gets their rounded values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn


def maybe_enable_tf32() -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on a GPU (torch's default for matmuls is
    full fp32: ``torch.backends.cuda.matmul.fp32_precision == "none"``). Nothing on a CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


class Fp32MasterWeights:
    """fp32 masters of a bf16 model's trainable parameters (see the module doc).

    ``named_parameters()`` yields the masters under the model's names, so the optimizer's parameter groups
    (``build_param_groups``) are built over them exactly as over an fp32 model's."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]]):
        self._pairs: list[tuple[str, nn.Parameter, nn.Parameter]] = [
            (name, param, nn.Parameter(param.detach().to(torch.float32).clone())) for name, param in named
        ]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, master) for name, _, master in self._pairs)

    def masters(self) -> list[nn.Parameter]:
        return [master for _, _, master in self._pairs]

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Add the model's gradients into the masters' (fp32) and drop them: call after each backward."""
        for _, param, master in self._pairs:
            if param.grad is None:
                continue
            if master.grad is None:
                master.grad = param.grad.to(torch.float32)
            else:
                master.grad.add_(param.grad)
            param.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The model's parameters take the masters' values (rounded to their dtype): after each update."""
        for _, param, master in self._pairs:
            param.copy_(master)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: master.detach() for name, _, master in self._pairs}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        names = [name for name, _, _ in self._pairs]
        if sorted(state) != sorted(names):
            raise ValueError(
                f"the checkpoint's fp32 master weights are {sorted(state)[:4]}..., this stage trains {names[:4]}...; "
                "resume with the recipe's stage.trainable"
            )
        for name, _, master in self._pairs:
            master.copy_(state[name])
        self.copy_to_model()
