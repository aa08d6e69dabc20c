"""No per-layer host work on the GPU paths (issue 23, finding 5), checked where it can be on a CPU:

* packed flash-attn gets the sample boundaries once per micro-batch (transformers otherwise re-derives them
  from the position ids in every layer: a ``nonzero()`` and a ``max()`` each, host syncs on a GPU);
* padded flash-attn runs the real tokens end to end, unpadded once per micro-batch (transformers otherwise
  unpads in every layer: a ``nonzero()`` and an ``.item()`` each), and computes what the padded call does;
* the 3D decoder's RoPE frequencies are made once per device, not rebuilt on the host and copied per layer;
* the GPU recipes ask for flash-attn where it can run (``auto``), sdpa elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from maven_dist.config import load_config
from maven_dist.model import maven as maven_module
from maven_dist.model.maven import resolve_attn_implementation
from maven_dist.model.packing import packed_hidden_states, unpadded_hidden_states
from maven_dist.parallel.megatron_llama import LlamaShape, rope_cos_sin, rope_inv_freq


class RecordingDecoder(torch.nn.Module):
    """Hands its input back as the last-layer states and keeps what it was called with."""

    def forward(self, inputs_embeds, **kwargs):
        self.inputs_embeds, self.kwargs = inputs_embeds, kwargs
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


RIGHT_PADDED = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])  # 3 + 6 + 2 real


def test_padded_flash_attention_runs_the_real_tokens_once_per_micro_batch():
    embeds = torch.randn(3, 6, 4)
    decoder = RecordingDecoder()
    hidden = unpadded_hidden_states(decoder, embeds, RIGHT_PADDED)
    kwargs = decoder.kwargs
    assert torch.equal(
        decoder.inputs_embeds, embeds[RIGHT_PADDED.bool()].unsqueeze(0)
    )  # [1, 11, 4], row order
    assert kwargs["attention_mask"] is None
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1]]  # every row counts from 0
    assert (
        kwargs["cu_seq_lens_q"].tolist() == [0, 3, 9, 11]
        and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    )
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 6 and type(kwargs["max_length_q"]) is int
    # The states go back where their tokens were; padding positions are 0.
    assert torch.equal(hidden, embeds * RIGHT_PADDED.unsqueeze(-1))


def tiny_llama(attn: str) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation=attn,
    )
    return LlamaModel(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_unpadded_layout_computes_what_the_padded_call_does(attn):
    # Off a GPU the varlen arguments are ignored and transformers masks the one row block-causally from
    # the restarting positions (masking_utils.find_packed_sequence_indices): the same layout, checked
    # against the padded call it replaces.
    decoder = tiny_llama(attn)
    embeds = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1))
    real = RIGHT_PADDED.bool()
    with torch.no_grad():
        padded = decoder(inputs_embeds=embeds, attention_mask=RIGHT_PADDED, use_cache=False).last_hidden_state
        unpadded = unpadded_hidden_states(decoder, embeds, RIGHT_PADDED)
        # The same tokens in one row with positions that do not restart: another computation, which the
        # comparison above must tell apart (it does not pass by accident).
        run_on = decoder(inputs_embeds=embeds[real].unsqueeze(0), use_cache=False).last_hidden_state[0]
    torch.testing.assert_close(unpadded[real], padded[real], atol=1e-5, rtol=1e-5)
    assert not unpadded[~real].any()
    assert not torch.allclose(run_on, padded[real], atol=1e-3)


def test_only_flash_attention_takes_the_unpadded_path(tiny_base, monkeypatch):
    from tests.helpers.batches import make_batch
    from tests.helpers.models import NUM_CODES, tiny_maven

    model = tiny_maven(tiny_base, "sdpa").eval()
    tower = model.vision_tower
    batch = make_batch(model, NUM_CODES, tower.tower.config.image_size, tower.num_patches)
    views = ("discrete", "continuous")
    calls = []

    def recording(*args):
        calls.append(args)
        return unpadded_hidden_states(*args)

    monkeypatch.setattr(maven_module, "unpadded_hidden_states", recording)
    with torch.no_grad():
        sdpa = model(batch, views=views, loss="lm")
        assert calls == []  # sdpa (and eager) keep the padded call
        # The flash path's layout with sdpa's kernel (flash-attn does not run here): sdpa's own loss.
        monkeypatch.setitem(model.llm.config.__dict__, "_attn_implementation_internal", "flash_attention_2")
        flash_layout = lm_loss_with_sdpa_kernels(model, batch, views, monkeypatch)
    assert len(calls) == 1 and calls[0][1].shape[:2] == calls[0][2].shape
    torch.testing.assert_close(flash_layout.loss, sdpa.loss, atol=1e-5, rtol=1e-5)
    assert flash_layout.num_input_tokens == sdpa.num_input_tokens == int(calls[0][2].sum())
    assert flash_layout.num_tokens == sdpa.num_tokens


def lm_loss_with_sdpa_kernels(model, batch, views, monkeypatch):
    """`model`'s loss on `batch` with transformers' flash-attn entries pointing at sdpa's kernel and mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for table in (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS):
        monkeypatch.setitem(table._global_mapping, "flash_attention_2", table._global_mapping["sdpa"])
    return model(batch, views=views, loss="lm")


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
