"""Base models laid out as the hub ships them (tests/helpers/hub_models.py) load, and load exactly (issue 24)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

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
