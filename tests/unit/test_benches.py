"""Every script in bench/ end to end at tiny size: it runs, and the figures its ``main`` returns have the
structure its report promises (bench/harness.py:check_figures; no speed is asserted: CI machines are
shared, and docs/performance.md has the measured runs). bench/merge.py runs in
tests/distributed/test_merge_zero3.py, on the 2-rank checkpoint that file builds anyway."""

from __future__ import annotations

import pytest
import torch

from bench import dataloader, generate, loss_memory, packing, selector_guidance, step
from bench.harness import check_figures, make_batch, synchronizer

TEXT = 16
CODES, PATCHES, KEPT = 32, 64, 16  # the tiny recipe: 112 px / 14 = 8 x 8 patches, alpha 0.25
COUNTS = {1: float, 2: float, 4: float}


@pytest.fixture(autouse=True)
def _one_thread():
    """The benches' tiny shapes on one intra-op thread (bench/step.py's default: on a shared 2-core machine
    a second thread mostly waits; the step smoke test took 9 s on two, 2 s on one), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_step_runs_both_arms_at_every_image_count():
    figures = step.main(["--preset", "tiny", "--repeats", "1", "--samples", "1", "--text", str(TEXT)])
    check_figures(figures, {"ratio": COUNTS, "samples_per_s": {"maven": COUNTS, "llava": COUNTS},
                            "h_eos_share": COUNTS, "regions_ms": {1: dict, 2: dict, 4: dict}})  # fmt: skip
    for k in (1, 2, 4):
        assert figures["positions_per_sample"]["maven"][k] == TEXT + k * (
            CODES + 2 + KEPT
        )  # <img> codes </img>
        assert figures["positions_per_sample"]["llava"][k] == TEXT + k * PATCHES  # every patch, nothing else
        regions = set(figures["regions_ms"][k])
        assert {"tower", "h_eos pass", "selector", "projector", "assembly", "LLM body", "loss"} <= regions
        assert {"LLM body bwd", "loss bwd"} <= regions and 0 < figures["h_eos_share"][k] < 1


@pytest.fixture(scope="module")
def tiny():
    cfg, preset = step.load_preset("tiny", None)
    model = step.harness.build_model(cfg, preset.text_vocab)
    return model, step.arms(cfg), make_batch(model, 2, 2, TEXT)


def test_only_the_maven_arm_runs_the_h_eos_pass_and_both_train_the_llm(tiny):
    model, arms, batch = tiny
    maven = step.instrumented_step(model, batch, arms["maven"], synchronizer("cpu"))
    llava = step.instrumented_step(model, batch, arms["llava"], synchronizer("cpu"))
    assert maven["h_eos pass"] > 0 and "h_eos pass" not in llava
    for regions in (maven, llava):
        assert regions["tower"] > 0 and regions["LLM body"] > 0 and regions["LLM body bwd"] > 0
        assert regions["loss"] > 0 and regions["loss bwd"] > 0


def hooks(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


def test_the_step_instrumentation_leaves_the_model_as_it_was(tiny):
    model, arms, batch = tiny
    step.use_arm(model, arms["maven"])
    before = hooks(model)  # transformers registers hooks of its own
    with torch.no_grad():
        plain = model(batch, views=arms["maven"].views).loss
    step.instrumented_step(model, batch, arms["maven"], synchronizer("cpu"))
    assert not {"eos_states", "kept_patches", "sequence_inputs"} & set(vars(model))
    assert hooks(model) == before
    with torch.no_grad():
        assert torch.equal(model(batch, views=arms["maven"].views).loss, plain)
    assert all(p.grad is None for p in model.parameters())


def test_step_mfu_is_the_trainers_definition_where_the_device_peak_is_known():
    """6 N T / (dt P): 1e9 parameters, 500 positions in 1 s at a 1e13 peak."""
    measured = step.Measured()
    for arm in ("maven", "llava"):
        measured.steps[(arm, 1)] = [1.0]
        measured.positions[(arm, 1)] = 500
    assert [r["mfu"] for r in step.throughput(measured, samples=2, n_params=10**9, peak=1e13)] == [0.3, 0.3]
    assert [r["mfu"] for r in step.throughput(measured, samples=2, n_params=10**9, peak=None)] == [None, None]


def test_packing_pads_less_than_length_grouping_at_the_7b_plan():
    """2% of the mix at small shapes; the plan is seeded, so the padding comparison is exact."""
    args = ["--mix-size", "0.02", "--samples", "8", "--micro", "2", "--max-length", "256", "--repeats", "1"]
    figures = packing.main([*args, "--hidden", "64", "--layers", "1"])
    arm = {"micro_batches": int, "padding_share": float}
    plan = {
        "unpacked, random order": arm,
        "unpacked, length grouping": arm,
        "packed": arm,
        "packed, 4 rows": arm,
    }
    check_figures(figures, {"plan": plan, "samples_per_s": {"unpacked (grouped)": float, "packed": float},
                            "ratio": float})  # fmt: skip
    padding = {name: figures["plan"][name]["padding_share"] for name in plan}
    assert padding["packed"] < padding["unpacked, length grouping"] < padding["unpacked, random order"]


def test_generate_times_prefill_and_decode_in_both_arms():
    figures = generate.main(["--preset", "tiny", "--layers", "1", "--images", "1", "--new-tokens", "2",
                             "--repeats", "1"])  # fmt: skip
    measures = {"positions": int, "prefill_s": float, "decode_tok_s": float, "nocache_tok_s": float}
    check_figures(figures, {"arms": {"maven": {1: measures}, "576-patch": {1: measures}},
                            "ratio": {1: {"prefill_time": float, "decode": float, "kv_cache": float}}})  # fmt: skip
    # 32 codes + <img> </img> + 16 kept patches against all 64 patches, with the same 41 other tokens.
    assert figures["arms"]["576-patch"][1]["positions"] - figures["arms"]["maven"][1]["positions"] == 64 - 50


def test_loss_memory_measures_both_ways_and_they_agree():
    figures = loss_memory.main(["--seq", "64", "--hidden", "32", "--vocab", "200,56", "--chunk-rows", "16"])
    both = {"checkpointed": float, "fused": float}
    check_figures(figures, {"extrapolated_gib": both, "seconds": both, "losses_agree_within": float})
    assert figures["losses_agree_within"] < 1e-5 and all(len(p) == 2 for p in figures["peak_gib"].values())


def test_dataloader_bench_prepares_shards_and_compares_both_loaders(tmp_path):
    """`python bench/dataloader.py` on a fresh clone: it prepares its own shards (no discrete codes: the
    LLaVA-style loader has none either)."""
    args = ["--num-images", "12", "--image-size", "64", "--tower-size", "56", "--workers", "0"]
    figures = dataloader.main([*args, "--batch-size", "4", "--rounds", "1", "--work-dir", str(tmp_path)])
    check_figures(figures, {"ours_samples_per_s_best": float, "llava_style_samples_per_s_best": float,
                            "ratio_median_round": float, "prepare_seconds_one_off": float,
                            "timed_samples": {"ours": int, "llava_style": int}})  # fmt: skip
    assert figures["timed_samples"]["ours"] == figures["timed_samples"]["llava_style"] > 0


def test_selector_guidance_reports_every_start(tiny_assets, tmp_path):
    work = tiny_assets.link_into(tmp_path / "work")
    figures = selector_guidance.main(["--work", str(work), "--stage1-steps", "1", "--stage2-steps", "1",
                                      "--heldout-images", "16", "--seeds", "0"])  # fmt: skip
    columns = {
        h: tuple for h in ("start spread", "chance", "p@k", "p@k shuffled", "gain", "stage1 s", "stage2 s")
    }
    check_figures(
        figures, {f"{i}, {o}": columns for i in selector_guidance.INITS for o in selector_guidance.ORDERS}
    )
