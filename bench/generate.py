"""Prefill and decode speed of MaVEn generation, with and without the KV cache, against the same model fed
all 576 patches of each image (LLaVA-1.5's visual input), at 1 and 4 images per prompt, in one run.

    python bench/generate.py [--preset cpu] [--layers 8] [--new-tokens 64] [--repeats 3]

Arms (the same random weights; only what the LLM is fed differs):

* ``maven``: 32 codes + 144 kept patches (+ ``<img>``/``</img>``) = 178 positions per image (alpha 0.25);
* ``576-patch``: every patch projected, no discrete view, no selector (alpha 1): 576 positions per image.

Prefill = the time to the first generated token (tower, h_eos pass, selector, assembly, LLM over the prompt);
decode = tokens per second after it, with the KV cache and (recomputing the whole sequence each step)
without. Shapes are bench/harness.py's presets: ``cpu`` by default (a 768-wide LLM, here 8 layers; CLIP at
336 px), ``7b`` the Vicuna-7B / CLIP-L shapes for a GPU, ``tiny`` the smoke test's. Ratios are printed last;
absolute numbers are labelled with the hardware.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from maven_dist.contract.vocab import IMAGE_PLACEHOLDER_ID
from maven_dist.model.generation import MavenForConditionalGeneration
from maven_dist.model.maven import MavenModel

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    import harness
except ModuleNotFoundError:
    from bench import harness

ARMS = {"maven": (("discrete", "continuous"), 0.25), "576-patch": (("continuous",), 1.0)}
"""The arms' views and keep ratios ("576-patch": every patch of the tower, whatever its image size)."""


def prompt(model: MavenModel, images: int, device: str) -> tuple[torch.Tensor, ...]:
    """``<s>``, `images` placeholders, 40 text tokens; random pixels and codes (seeded by `images`)."""
    g = torch.Generator().manual_seed(images)
    layout, size = model.layout, model.vision_tower.tower.config.image_size
    text = torch.randint(3, layout.text_size, (40,), generator=g).tolist()
    ids = torch.tensor([[harness.BOS, *[IMAGE_PLACEHOLDER_ID] * images, *text]], device=device)
    pixels = torch.randn(images, 3, size, size, generator=g).to(device)
    codes = torch.randint(0, layout.codebook_size, (images, model.spec.num_codes), generator=g).to(device)
    return ids, torch.ones_like(ids), pixels, codes


def measure(model: MavenModel, views, alpha: float, images: int, args) -> dict[str, float]:
    model.spec = dataclasses.replace(model.spec, keep_ratio=alpha)
    generator = MavenForConditionalGeneration.wrap(model)
    inputs = prompt(model, images, args.device)
    positions = generator.prompt_embeds(*inputs, views=views)[0].shape[1]

    def cached(new: int):
        return generator.generate(*inputs, views=views, max_new_tokens=new, min_new_tokens=new)

    def uncached():  # greedy, recomputing every position at every step (the reference decoder)
        return generator.generate(*inputs, views=views, max_new_tokens=args.new_tokens, use_cache=False)

    first = harness.timed(lambda: cached(1), args.repeats, args.device)
    with_cache = harness.timed(lambda: cached(args.new_tokens), args.repeats, args.device)
    steps_nocache = uncached().shape[1] - 1  # it may stop at EOS
    without_cache = harness.timed(uncached, max(1, args.repeats // 2), args.device)
    return {
        "positions": positions,
        "prefill_s": first,
        "prefill_tok_s": positions / first,
        "decode_tok_s": (args.new_tokens - 1) / max(with_cache - first, 1e-9),
        "nocache_tok_s": steps_nocache / max(without_cache - first, 1e-9),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the bench; returns its figures: ``arms`` {arm: {images: measures}} and ``ratio`` {images:
    prefill-time, decode and kv-cache ratios}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(harness.PRESETS), default="cpu")
    parser.add_argument("--layers", type=int, default=8, help="LLM layers (a slice of the preset's LLM)")
    parser.add_argument("--images", default="1,4", help="images per prompt, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args(argv)
    cfg, preset = harness.load_preset(args.preset, [f"model.llm.num_layers={args.layers}"])
    model = harness.build_model(cfg, preset.text_vocab, args.device, getattr(torch, args.dtype)).eval()
    print(f"# {harness.hardware(args.device)}; {args.preset} preset, {args.layers} LLM layers, {args.dtype}; "
          f"{args.new_tokens} new tokens")  # fmt: skip
    print(f"{'arm':>10} {'images':>6} {'positions':>9} {'prefill s':>9} {'prefill tok/s':>13} "
          f"{'decode tok/s':>12} {'no-cache tok/s':>14}")  # fmt: skip
    counts = [int(k) for k in args.images.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in ARMS}
    with torch.no_grad():
        for images in counts:
            for arm, (views, alpha) in ARMS.items():
                r = results[arm][images] = measure(model, views, alpha, images, args)
                print(f"{arm:>10} {images:>6} {r['positions']:>9} {r['prefill_s']:>9.3f} {r['prefill_tok_s']:>13.0f} "
                      f"{r['decode_tok_s']:>12.1f} {r['nocache_tok_s']:>14.1f}", flush=True)  # fmt: skip
    ratios = {}
    for images in counts:
        m, p = results["maven"][images], results["576-patch"][images]
        ratios[images] = {"prefill_time": p["prefill_s"] / m["prefill_s"], "decode": m["decode_tok_s"] / p["decode_tok_s"],
                          "kv_cache": m["decode_tok_s"] / m["nocache_tok_s"]}  # fmt: skip
        print(f"ratio@{images}img prefill-time {ratios[images]['prefill_time']:.2f}x  decode "
              f"{ratios[images]['decode']:.2f}x  kv-cache {ratios[images]['kv_cache']:.2f}x  "
              "(maven vs 576-patch; cache vs none)")  # fmt: skip
    return {"arms": results, "ratio": ratios}


if __name__ == "__main__":
    main()
