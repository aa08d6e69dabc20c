"""No per-layer host work on the GPU paths (issue 23, finding 5), checked where it can be on a CPU:

* packed flash-attn gets the sample boundaries once per micro-batch (transformers otherwise re-derives them
  from the position ids in every layer: a ``nonzero()`` and a ``max()`` each, host syncs on a GPU);
* the 3D decoder's RoPE frequencies are made once per device, not rebuilt on the host and copied per layer;
* the GPU recipes ask for flash-attn where it can run (``auto``), sdpa elsewhere.
"""

from __future__ import annotations

import torch

from maven_dist.config import load_config
from maven_dist.model.maven import resolve_attn_implementation
from maven_dist.model.packing import packed_hidden_states
from maven_dist.parallel.megatron_llama import LlamaShape, rope_cos_sin, rope_inv_freq


class RecordingDecoder(torch.nn.Module):
    def forward(self, inputs_embeds, **kwargs):
        self.kwargs = kwargs
        return type("Out", (), {"last_hidden_state": inputs_embeds})()


def test_packed_flash_attention_gets_the_boundaries_once_per_micro_batch():
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 3, 3, 3, 3]])  # 2 rows, 4 samples and a padding run
    decoder = RecordingDecoder()
    packed_hidden_states(decoder, torch.zeros(2, 6, 4), segments, "flash_attention_2")
    kwargs = decoder.kwargs
    starts = [0, 3, 5, 6, 8, 12]  # every run restarts its positions: samples and the padding run
    assert kwargs["cu_seq_lens_q"].tolist() == starts and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4 and type(kwargs["max_length_q"]) is int
    assert kwargs["attention_mask"] is None and kwargs["position_ids"].shape == (1, 12)


def test_3d_rope_frequencies_are_made_once_per_device():
    shape = LlamaShape(64, 128, 2, 4, 4, 16, 1e-5, 10000.0)
    rope_inv_freq.cache_clear()
    positions = torch.arange(8).expand(2, -1)
    first = rope_cos_sin(shape, positions, torch.float32)
    for _ in range(4):  # four more layer calls
        again = rope_cos_sin(shape, positions, torch.float32)
    info = rope_inv_freq.cache_info()
    assert (info.misses, info.hits) == (1, 4)
    assert rope_inv_freq(16, 10000.0, torch.device("cpu")).dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_gpu_recipes_ask_for_flash_attention_where_it_runs():
    for recipe in ("recipes/maven-7b/stage4.yaml", "recipes/maven-13b/stage4.yaml"):
        assert load_config(recipe, []).model.llm.attn_implementation == "auto"
    assert resolve_attn_implementation("auto", "bf16", "3d") == "sdpa"  # the 3D decoder has no flash path
    assert resolve_attn_implementation("auto", "fp32", "zero3") == "sdpa"  # flash-attn is bf16/fp16 only
    if not torch.cuda.is_available():
        assert resolve_attn_implementation("auto", "bf16", "zero3") == "sdpa"
    assert resolve_attn_implementation("eager", "bf16", "zero3") == "eager"
