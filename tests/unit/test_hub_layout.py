"""Base models laid out as the hub ships them (tests/helpers/hub_models.py) load, and load exactly (issue 24)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from maven_dist.data.tokenizer import load_text_tokenizer
from tests.helpers.hub_models import train_llama_sentencepiece, write_vicuna_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_llama_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_directory_with_only_tokenizer_model_loads(spm_model, tmp_path, legacy):
    """lmsys/vicuna-7b-v1.5 ships tokenizer.model and no tokenizer.json; either legacy flag gives LLaMA's ids."""
    import sentencepiece

    directory = write_vicuna_tokenizer(tmp_path, spm_model, legacy=legacy)
    assert not (directory / "tokenizer.json").exists()
    tok = load_text_tokenizer(directory)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token) == (0, 1, 2, "<unk>")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    for text in ("What is shown?", " A red circle. ", "\n12 café 🙂", ""):
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.encode("Yes") == [1, *sp.encode("Yes")]


def test_sentencepiece_is_a_declared_and_pinned_dependency():
    """Without sentencepiece transformers cannot read tokenizer.model (and says "tiktoken is required")."""
    deps = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\s*"sentencepiece>=[^"]+",', deps, re.M)
    assert re.search(r'^\s*"protobuf>=[^"]+",', deps, re.M)  # transformers reads the model proto with it
    assert re.search(r"^sentencepiece==\S+$", (REPO / "constraints.txt").read_text(), re.M)


def test_a_missing_sentencepiece_is_named(spm_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece now raises ImportError
    with pytest.raises(ImportError, match="needs the sentencepiece package"):
        load_text_tokenizer(write_vicuna_tokenizer(tmp_path, spm_model))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tests.helpers.hub_models import build_clip_336_dir

    return build_clip_336_dir(tmp_path_factory.mktemp("clip-vit-large-patch14-336"))


def _file_tensors(directory: Path) -> dict:
    """Every tensor of a hub directory's weight files, read independently of the project's loader."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    for f in sorted(directory.glob("pytorch_model-*.bin")):
        out |= torch.load(f, weights_only=True)
    return out


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_base_models_as_published_load_exactly(spm_model, clip_dir, tmp_path, weights):
    """fp16 Vicuna shards (pytorch_model-0000N-of-00002.bin or model-0000N-of-00002.safetensors, with their
    index) and the whole-CLIPModel safetensors of openai/clip-vit-large-patch14-336: every weight the model
    starts from is the file's, cast to the model's dtype and nothing else."""
    from maven_dist.contract.vocab import extend_tokenizer
    from maven_dist.model.maven import MavenModel
    from maven_dist.model.spec import MavenSpec
    from tests.helpers.hub_models import build_vicuna_dir

    vicuna = build_vicuna_dir(tmp_path / "vicuna-7b-v1.5", spm_model, weights=weights)
    index = "pytorch_model.bin.index.json" if weights == "bin" else "model.safetensors.index.json"
    assert (vicuna / index).is_file() and not (vicuna / "tokenizer.json").exists()
    tok = load_text_tokenizer(vicuna)
    layout = extend_tokenizer(tok, 64, 128)
    spec = MavenSpec(keep_ratio=0.25, selector_hidden_size=16, num_codes=8, eos_token_id=tok.eos_token_id)
    model = MavenModel.from_base(vicuna, clip_dir, layout, spec)

    llm_files = _file_tensors(vicuna)
    assert {t.dtype for t in llm_files.values()} == {torch.float16}
    llm = dict(model.llm.named_parameters())
    assert set(llm) == set(llm_files)
    for name, param in llm.items():
        assert torch.equal(param.detach(), llm_files[name].to(param.dtype)), name
    clip = _file_tensors(clip_dir)
    tower = dict(model.vision_tower.tower.named_parameters())
    assert set(tower) == {k.removeprefix("vision_model.") for k in clip if k.startswith("vision_model.")} - {
        "embeddings.position_ids"
    }
    for name, param in tower.items():
        assert torch.equal(param.detach(), clip["vision_model." + name].to(param.dtype)), name
    assert model.image_processor_config["crop_size"] == 336  # the published preprocessor config, as is
