"""A LLaMA decoder layer from megatron-core tensor-parallel linears, numerically HF's LlamaDecoderLayer.

Same parameter names as HF (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``) so conversion is slicing, nothing more
(``maven_dist/parallel/convert.py``). Column-parallel q/k/v/gate/up split heads and the MLP width over
tp ranks; row-parallel o/down sum the partial products. Norms are replicated. RoPE and RMSNorm repeat
transformers' arithmetic operation for operation, so tp=1 is bitwise the HF layer and tp>1 differs
only by the order of the row-parallel sums.

Pipeline layers take and return the tuple ``(hidden [B, T, d], attention_mask [B, T], labels [B, T])``:
DeepSpeed's pipeline engine passes one tuple between layers; the integer tensors travel with the
activations (they carry no gradient) so the last stage needs nothing from the data loader.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from maven_dist.parallel.dims import ParallelDims

PipeTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LlamaShape:
    """What the 3D decoder needs from an HF LlamaConfig."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str = "silu"

    @classmethod
    def from_hf(cls, config) -> LlamaShape:
        rope = getattr(config, "rope_parameters", None) or {
            "rope_type": "default",
            "rope_theta": config.rope_theta,
        }
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"3d backend: rope_type={rope['rope_type']!r} is not supported (only default RoPE, as Vicuna/LLaMA-2)"
            )
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("3d backend: LLaMA with attention/MLP biases is not supported")
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(rope["rope_theta"]),
            hidden_act=config.hidden_act,
        )

    def check_tp(self, tp: int) -> None:
        for what, n in (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
        ):
            if n % tp:
                raise ValueError(f"parallel.tp={tp} must divide the LLM's {what}={n}; choose a tp that does")


def build_tp_config(dims: ParallelDims) -> ModelParallelConfig:
    """megatron-core layer config: fp32 CPU-initialised shells (weights are loaded next), no sequence
    parallelism, no fused kernels (they need CUDA)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def _no_init(weight: torch.Tensor) -> None:
    """Weights come from a checkpoint; megatron's init is skipped (perform_initialization=False)."""


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, operation for operation."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden = hidden.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden.to(input_dtype)


@functools.cache
def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """RoPE's inverse frequencies in fp32 on `device`, as LlamaRotaryEmbedding computes them; made once per
    device (before: rebuilt on the host and copied to the GPU in every layer call, a synchronising copy per
    layer, twice with recomputation)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return inv_freq.to(device)


def rope_cos_sin(
    shape: LlamaShape, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] for integer positions [B, T] exactly as LlamaRotaryEmbedding computes them."""
    inv_freq = rope_inv_freq(shape.head_dim, shape.rope_theta, positions.device)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: causal and the key is a real token (HF's sdpa mask for right padding)."""
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


class TPAttention(nn.Module):
    """Grouped-query self-attention; each tp rank holds num_heads/tp query and num_kv_heads/tp kv heads.

    ``attn_implementation`` (``model.llm.attn_implementation``): `sdpa` is torch's
    ``scaled_dot_product_attention`` (on GPU a fused kernel that takes the padding mask), `eager` the
    explicit matmul-softmax-matmul of transformers' eager LLaMA attention, for debugging. flash-attn is
    not wired into this decoder (the config refuses it for the 3d backend)."""

    def __init__(self, shape: LlamaShape, config: ModelParallelConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"3d backend: model.llm.attn_implementation={attn_implementation!r} is not supported by its "
                "decoder; use sdpa or eager"
            )
        tp = config.tensor_model_parallel_size
        shape.check_tp(tp)
        self.shape = shape
        self.attn_implementation = attn_implementation
        self.local_heads = shape.num_heads // tp
        self.local_kv_heads = shape.num_kv_heads // tp
        d, hd = shape.hidden_size, shape.head_dim
        column = dict(
            config=config, init_method=_no_init, bias=False, gather_output=False, skip_bias_add=True
        )
        self.q_proj = ColumnParallelLinear(d, shape.num_heads * hd, **column)
        self.k_proj = ColumnParallelLinear(d, shape.num_kv_heads * hd, **column)
        self.v_proj = ColumnParallelLinear(d, shape.num_kv_heads * hd, **column)
        self.o_proj = RowParallelLinear(
            shape.num_heads * hd,
            d,
            config=config,
            init_method=_no_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b, t, _ = hidden.shape
        hd = self.shape.head_dim
        q = self.q_proj(hidden)[0].view(b, t, self.local_heads, hd).transpose(1, 2)
        k = self.k_proj(hidden)[0].view(b, t, self.local_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(hidden)[0].view(b, t, self.local_kv_heads, hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        groups = self.local_heads // self.local_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        if self.attn_implementation == "eager":
            scores = torch.matmul(q, k.transpose(2, 3)) * hd**-0.5
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.local_heads * hd))[0]


class TPMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), the width split over tp ranks."""

    def __init__(self, shape: LlamaShape, config: ModelParallelConfig):
        super().__init__()
        if shape.hidden_act != "silu":
            raise ValueError(
                f"3d backend: hidden_act={shape.hidden_act!r} is not supported (LLaMA uses silu)"
            )
        d, f = shape.hidden_size, shape.intermediate_size
        column = dict(
            config=config, init_method=_no_init, bias=False, gather_output=False, skip_bias_add=True
        )
        self.gate_proj = ColumnParallelLinear(d, f, **column)
        self.up_proj = ColumnParallelLinear(d, f, **column)
        self.down_proj = RowParallelLinear(
            f, d, config=config, init_method=_no_init, bias=False, input_is_parallel=True, skip_bias_add=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]


class TPDecoderLayer(nn.Module):
    """One LLaMA block as a pipeline layer: (hidden, mask, labels) -> (hidden', mask, labels)."""

    def __init__(
        self,
        shape: LlamaShape,
        config: ModelParallelConfig,
        checkpoint_activations: bool = False,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        self.shape = shape
        self.checkpoint_activations = checkpoint_activations
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = TPAttention(shape, config, attn_implementation)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = TPMLP(shape, config)

    def block(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # HF LLaMA numbers positions 0..T-1 whatever the padding (right padding keeps them right).
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        cos, sin = rope_cos_sin(self.shape, positions, hidden.dtype)
        mask = attention_mask_4d(attention_mask)
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward(self, inputs: PipeTuple) -> PipeTuple:
        hidden, attention_mask, labels = inputs
        if self.checkpoint_activations and torch.is_grad_enabled():
            # Keep only the layer input; the backward recomputes the block (its tp all-reduces run
            # again on every tp rank, in the same order, so recomputation is collective-safe).
            hidden = checkpoint(self.block, hidden, attention_mask, use_reentrant=False)
        else:
            hidden = self.block(hidden, attention_mask)
        return hidden, attention_mask, labels
