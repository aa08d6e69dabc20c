"""HF MaVEn directory <-> 3D tensor/pipeline shards, bit for bit (single process)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from maven_dist.contract.vocab import extend_tokenizer
from maven_dist.model import hf_layout
from maven_dist.model.maven import MavenModel
from maven_dist.parallel.convert import load_shards, placement, save_shards, shard_tensor, unshard_state_dict
from maven_dist.train.builders import model_spec
from tests.distributed.three_d_worker import stage_config


@pytest.fixture(scope="module")
def maven_model_dir(tiny_base, tmp_path_factory):
    cfg = stage_config("stage4")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    layout = extend_tokenizer(tokenizer, cfg.model.discrete.codebook_size, cfg.model.vocab.pad_to_multiple_of)
    model = MavenModel.from_base(
        tiny_base.llm_dir, tiny_base.tower_dir, layout, model_spec(cfg, tokenizer), seed=0
    )
    return model.save_pretrained(tmp_path_factory.mktemp("convert") / "maven", tokenizer)


def _hf_tensors(directory):
    out = {}
    for component in (hf_layout.LLM_DIR, hf_layout.TOWER_DIR):
        out |= {f"{component}/{k}": v for k, v in hf_layout.iter_checkpoint_tensors(directory / component)}
    from safetensors.torch import load_file

    return out | load_file(directory / hf_layout.MAVEN_MODULES_FILE)


@pytest.mark.parametrize("tp", [1, 2])
def test_hf_to_shards_to_hf_is_bitwise_identical(maven_model_dir, tmp_path, tp):
    shards = save_shards(maven_model_dir, tmp_path / "shards", tp=tp)
    state = load_shards(shards)
    model = MavenModel.from_pretrained(maven_model_dir)
    reference = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name
    back = model.save_pretrained(tmp_path / "back", state_dict=state)
    original, rebuilt = _hf_tensors(maven_model_dir), _hf_tensors(back)
    assert set(original) == set(rebuilt)
    for key, tensor in original.items():
        assert rebuilt[key].dtype == tensor.dtype and torch.equal(rebuilt[key], tensor), key


def shard_state_dict(full: dict[str, torch.Tensor], num_layers: int, tp_rank: int, tp: int) -> dict:
    """Full MavenModel state -> one tp rank's shards, keys ``"{layer}.{local}"`` (as save_shards writes)."""
    out = {}
    for name, tensor in full.items():
        place = placement(name, num_layers)
        out[f"{place.layer}.{place.local}"] = shard_tensor(tensor, place.split_dim, tp_rank, tp)
    return out


def test_shards_are_megatron_slices(maven_model_dir):
    """Column-parallel weights split output rows, row-parallel ones input columns, the unified vocabulary
    rows per row set; norms and the MaVEn modules are replicated."""
    full = MavenModel.from_pretrained(maven_model_dir).state_dict()
    num_layers = 2
    ranks = [shard_state_dict(full, num_layers, r, 2) for r in range(2)]
    q = full["llm.model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(ranks[1]["1.self_attn.q_proj.weight"], q[q.shape[0] // 2 :])
    o = full["llm.model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(ranks[0]["2.self_attn.o_proj.weight"], o[:, : o.shape[1] // 2])
    new_head = full["vocab_new_rows.head.weight"]
    assert torch.equal(ranks[1]["3.head_new.weight"], new_head[new_head.shape[0] // 2 :])
    assert placement("llm.model.norm.weight", num_layers).split_dim is None
    assert torch.equal(ranks[1]["0.projector.0.weight"], full["projector.0.weight"])
    rebuilt = unshard_state_dict(ranks, num_layers)
    assert all(torch.equal(rebuilt[k], v) for k, v in full.items())


def test_incomplete_shard_set_is_refused(maven_model_dir, tmp_path):
    shards = save_shards(maven_model_dir, tmp_path / "shards", tp=2)
    (shards / "layer_002-tp_01.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="layer_002-tp_01.safetensors is missing"):
        load_shards(shards)


def test_unknown_parameter_has_no_place():
    with pytest.raises(KeyError, match="no place in the 3D model"):
        placement("llm.model.rotary_emb.extra", 2)
