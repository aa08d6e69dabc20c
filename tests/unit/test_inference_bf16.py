"""Loading a MaVEn directory for inference in bf16 (issue 23, finding 8): built in bf16 on its device (no fp32
copy of the model on the host first), RoPE's ``inv_freq`` left fp32 (``.to(bf16)`` cast it), ``auto`` a device."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from maven_dist.model.generation import MavenForConditionalGeneration, resolve_device
from maven_dist.model.rope import rotary_modules
from tests.distributed.engine_fixtures import build_stage_setup, micro_batches


@pytest.fixture(scope="module")
def maven_dir(tiny_base, tmp_path_factory):
    setup = build_stage_setup(tiny_base.llm_dir.parent, "stage4")
    model = setup.builder()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    return setup, model.save_pretrained(tmp_path_factory.mktemp("bf16") / "maven", tokenizer)


def test_bf16_load_builds_in_bf16_keeps_rope_fp32_and_tracks_fp32(maven_dir, monkeypatch):
    setup, directory = maven_dir
    fp32 = MavenForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).maven
    built = []
    original = torch.nn.Parameter.__new__

    def record(cls, data=None, requires_grad=True):  # every parameter made, in the dtype it was made in
        built.append(data.dtype)
        return original(cls, data, requires_grad)

    monkeypatch.setattr(torch.nn.Parameter, "__new__", record)
    bf16 = MavenForConditionalGeneration.from_pretrained(directory, dtype="bfloat16", device_map="auto").maven
    monkeypatch.undo()
    assert set(built) == {torch.bfloat16}  # no parameter was made in fp32 first
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert all(p.device == resolve_device("auto") for p in bf16.parameters())
    for got, want in zip(rotary_modules(bf16), rotary_modules(fp32), strict=True):
        assert got.inv_freq.dtype == torch.float32 and torch.equal(got.inv_freq, want.inv_freq)
    for name, param in bf16.named_parameters():
        assert torch.equal(param, dict(fp32.named_parameters())[name].to(torch.bfloat16)), name
    batch = micro_batches(setup, 1)[0]
    with torch.no_grad():
        want, got = fp32(batch).loss, bf16(batch).loss
    assert abs(float(got) - float(want)) <= 2e-2 * abs(float(want))


def test_device_auto_is_one_device():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        resolve_device({"": 0})
