"""bench/step.py at the tiny recipe's shapes: both arms run at 1, 2 and 4 images per sample, the region
table and the ratio lines come out in the bench's format, and the instrumentation leaves the model as it
was. No speed is asserted: CI machines are shared (docs/performance.md has the measured run)."""

from __future__ import annotations

import re

import pytest
import torch

from bench import step  # the repository root is on pytest's path; bench/ is a directory of scripts

TEXT = 16
CODES, PATCHES, KEPT = 32, 64, 16  # the tiny recipe: 112 px / 14 = 8 x 8 patches, alpha 0.25


def test_the_bench_runs_both_arms_at_every_image_count_and_prints_the_ratios_last(capsys):
    ratios = step.main(["--preset", "tiny", "--repeats", "1", "--samples", "1", "--text", str(TEXT)])
    lines = capsys.readouterr().out.splitlines()

    assert re.fullmatch(r"ratio@4img \d+\.\d\d", lines[-2]), lines[-2]
    assert re.fullmatch(r"ratio@1img \d+\.\d\d", lines[-1]), lines[-1]
    assert any(re.fullmatch(r"ratio@2img \d+\.\d\d", line) for line in lines)
    assert set(ratios) == {1, 2, 4} and all(r > 0 for r in ratios.values())
    assert lines[0].startswith("# hardware: ")

    rows = {}
    for line in lines:
        cells = line.split()
        if cells and cells[0] in ("maven", "llava"):
            rows[(cells[0], int(cells[1]))] = (int(cells[2]), float(cells[4]))
    assert set(rows) == {(arm, k) for arm in ("maven", "llava") for k in (1, 2, 4)}
    for k in (1, 2, 4):
        assert rows[("maven", k)][0] == TEXT + k * (CODES + 2 + KEPT)  # <img> codes </img> + kept patches
        assert rows[("llava", k)][0] == TEXT + k * PATCHES  # every patch, nothing else
        assert rows[("maven", k)][1] > 0 and rows[("llava", k)][1] > 0  # samples/s

    regions = {line.split("  ")[0].strip() for line in lines}
    for region in ("tower", "h_eos pass", "selector", "projector", "assembly", "LLM body", "loss"):
        assert region in regions, region
    for region in ("LLM body bwd", "loss bwd"):
        assert region in regions, region
    for k in (1, 2, 4):
        assert any(re.fullmatch(rf"h_eos@{k}img \d+\.\d% of the MaVEn step", line) for line in lines)


@pytest.fixture(scope="module")
def tiny():
    cfg, preset = step.load_preset("tiny", None)
    model = step.build_model(cfg, preset.text_vocab, torch.device("cpu"), torch.float32)
    return model, step.arms(cfg), step.make_batch(model, 2, 2, TEXT, torch.device("cpu"))


def test_only_the_maven_arm_runs_the_h_eos_pass_and_both_train_the_llm(tiny):
    model, arms, batch = tiny
    sync = step.synchronizer(torch.device("cpu"))
    maven = step.instrumented_step(model, batch, arms["maven"], sync)
    llava = step.instrumented_step(model, batch, arms["llava"], sync)
    assert maven["h_eos pass"] > 0 and "h_eos pass" not in llava
    for regions in (maven, llava):
        assert regions["tower"] > 0 and regions["LLM body"] > 0 and regions["LLM body bwd"] > 0
        assert regions["loss"] > 0 and regions["loss bwd"] > 0


def hooks(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


def test_the_instrumentation_leaves_the_model_as_it_was(tiny):
    model, arms, batch = tiny
    step.use_arm(model, arms["maven"])
    before = hooks(model)  # transformers registers hooks of its own
    with torch.no_grad():
        plain = model(batch, views=arms["maven"].views).loss
    step.instrumented_step(model, batch, arms["maven"], step.synchronizer(torch.device("cpu")))
    assert not {"eos_states", "kept_patches", "sequence_inputs"} & set(vars(model))
    assert hooks(model) == before
    with torch.no_grad():
        assert torch.equal(model(batch, views=arms["maven"].views).loss, plain)
    assert all(p.grad is None for p in model.parameters())


def test_mfu_is_printed_where_the_device_peak_is_known(capsys):
    """6 N T / (dt P), the trainer's definition: 1e9 parameters, 500 positions in 1 s at a 1e13 peak."""
    measured = step.Measured()
    for arm in ("maven", "llava"):
        measured.steps[(arm, 1)] = [1.0]
        measured.positions[(arm, 1)] = 500
    step.print_throughput(measured, samples=2, n_params=10**9, peak=1e13)
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "MFU"
    assert [row.split()[-1] for row in rows] == ["30.0%", "30.0%"]
