"""RoPE's inverse frequencies stay fp32, whatever dtype the model's weights are in.

transformers' ``LlamaRotaryEmbedding`` computes ``inv_freq = 1 / theta ** (arange(0, d, 2) / d)`` once, in
fp32, and keeps it as a buffer; its forward multiplies positions by it in fp32. Two things turn it into
bf16 silently, and a bf16 ``inv_freq`` (8 significant bits) puts position 2000's phase off by several
radians in the slow dimensions:

* ``deepspeed.zero.Init`` with bf16 casts every floating tensor a constructor returns, ``arange(...,
  dtype=float)`` included (``deepspeed/runtime/zero/partition_parameters.py:
  zero_wrapper_for_fp_tensor_constructor``); transformers' ``prevent_arange_dtype_change`` only helps when
  entered *before* zero.Init;
* ``module.to(torch.bfloat16)`` casts buffers with the parameters (inference in bf16, the one-process
  engine in bf16).

:func:`apply_fp32_rope` recomputes the buffers in fp32 with the module's own init function after either;
every place that builds or casts a MaVEn model calls it.
"""

from __future__ import annotations

import torch
from torch import nn


def rotary_modules(module: nn.Module) -> list[nn.Module]:
    """transformers' rotary embeddings in `module` (they hold an ``inv_freq`` buffer and their config)."""
    return [
        m
        for m in module.modules()
        if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
        and hasattr(m, "config")
        and hasattr(m, "rope_type")
    ]


def apply_fp32_rope(module: nn.Module) -> nn.Module:
    """Recompute every rotary embedding's ``inv_freq`` (and ``original_inv_freq``) in fp32 on its device.
    Must run outside ``deepspeed.zero.Init`` (whose constructors would cast it again)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rotary in rotary_modules(module):
        device = rotary.inv_freq.device
        if rotary.rope_type == "default":
            init = type(rotary).compute_default_rope_parameters
        else:
            init = ROPE_INIT_FUNCTIONS[rotary.rope_type]
        inv_freq, _ = init(rotary.config, device=device)
        rotary.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        if hasattr(rotary, "original_inv_freq"):
            rotary.original_inv_freq = rotary.inv_freq.clone()
    return module
