"""What the 3D backend refuses, with messages that name the setting to change (single process)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from maven_dist.contract.vocab import VocabLayout
from maven_dist.parallel.megatron_llama import LlamaShape
from maven_dist.parallel.pipe_layers import _check_vocab_tp


def _llama(**overrides) -> LlamaConfig:
    base = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=320,
    )
    return LlamaConfig(**(base | overrides))


def test_shape_from_hf_reads_rope_and_gqa():
    shape = LlamaShape.from_hf(_llama())
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rope_theta) == (4, 2, 16, 10000.0)


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match="parallel.tp=4 must divide the LLM's num_key_value_heads=2"):
        LlamaShape.from_hf(_llama()).check_tp(4)


def test_scaled_rope_is_refused():
    config = _llama(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type='linear' is not supported"):
        LlamaShape.from_hf(config)


def test_vocabulary_rows_must_split_over_tp():
    layout = VocabLayout.build(text_size=320, codebook_size=64, pad_to_multiple_of=128)  # 192 new rows
    _check_vocab_tp(layout, 2)
    odd = VocabLayout(text_size=321, codebook_size=64, padded_size=512)
    with pytest.raises(ValueError, match="text rows = 321 is not a multiple of parallel.tp=2"):
        _check_vocab_tp(odd, 2)


def test_selector_stage_is_refused_before_any_set_up(tmp_path):
    from maven_dist.config import ConfigError
    from maven_dist.parallel.dims import ParallelDims
    from maven_dist.parallel.three_d import ThreeDEngine
    from tests.distributed.three_d_worker import stage_config

    cfg = stage_config("stage1", tp=2)
    with pytest.raises(ConfigError, match="run it with parallel.backend=zero3"):
        ThreeDEngine(
            tmp_path, cfg, ParallelDims(dp=1, tp=2, pp=1, world_size=2), total_steps=1, accumulation=1
        )
