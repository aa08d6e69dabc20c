"""Prefill and decode speed of MaVEn generation, with and without the KV cache, against the same model fed
all 576 patches of each image (LLaVA-1.5's visual input), at 1 and 4 images per prompt, in one run.

    python bench/generate.py [--layers 8] [--hidden 768] [--new-tokens 64] [--repeats 3]

Arms (the same random weights; only what the LLM is fed differs):

* ``maven``: 32 codes + 144 kept patches (+ ``<img>``/``</img>``) = 178 positions per image (alpha 0.25);
* ``576-patch``: every patch projected, no discrete view, no selector (alpha 1): 576 positions per image.

Prefill = the time to the first generated token (tower, h_eos pass, selector, assembly, LLM over the prompt);
decode = tokens per second after it, with the KV cache and (recomputing the whole sequence each step)
without. Shapes are CPU-sized by default (a 768-wide LLM; CLIP at 336 px); ``--preset 7b`` takes the
Vicuna-7B / CLIP-L shapes for a GPU. Ratios are printed last; absolute numbers are labelled with the hardware.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from maven_dist.contract.vocab import IMAGE_PLACEHOLDER_ID, VocabLayout
from maven_dist.model.generation import MavenForConditionalGeneration
from maven_dist.model.maven import MavenModel
from maven_dist.model.spec import MavenSpec

try:  # run as a script, bench/ is on sys.path; imported from the repository root (tests), it is not
    from _hardware import hardware
except ModuleNotFoundError:
    from bench._hardware import hardware

ARMS = {"maven": (("discrete", "continuous"), 0.25), "576-patch": (("continuous",), 1.0)}


def build(args) -> tuple[MavenModel, VocabLayout]:
    torch.manual_seed(0)
    if args.preset == "7b":
        llm = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
        tower = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                 num_hidden_layers=24, num_attention_heads=16)  # fmt: skip
    else:
        llm = LlamaConfig(vocab_size=4000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                          num_hidden_layers=args.layers, num_attention_heads=12, num_key_value_heads=12,
                          max_position_embeddings=4096)  # fmt: skip
        tower = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    layout = VocabLayout.build(llm.vocab_size, 8192, 1024)
    spec = MavenSpec(selector_hidden_size=256, num_codes=32, eos_token_id=2, bos_token_id=1)
    model = MavenModel.from_configs(llm, tower, layout, spec).eval()
    return model.to(args.device, getattr(torch, args.dtype)), layout


def prompt(layout: VocabLayout, images: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(images)
    text = torch.randint(3, layout.text_size, (40,), generator=g).tolist()
    ids = torch.tensor([[1, *[IMAGE_PLACEHOLDER_ID] * images, *text]], device=device)
    pixels = torch.randn(images, 3, 336, 336, generator=g).to(device)
    codes = torch.randint(0, layout.codebook_size, (images, 32), generator=g).to(device)
    return ids, torch.ones_like(ids), pixels, codes


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(model: MavenModel, layout, views, alpha: float, images: int, args) -> dict[str, float]:
    model.spec = dataclasses.replace(model.spec, keep_ratio=alpha)
    generator = MavenForConditionalGeneration.wrap(model)
    inputs = prompt(layout, images, args.device)
    positions = generator.prompt_embeds(*inputs, views=views)[0].shape[1]

    def cached(new: int):
        return generator.generate(*inputs, views=views, max_new_tokens=new, min_new_tokens=new)

    def uncached():  # greedy, recomputing every position at every step (the reference decoder)
        return generator.generate(*inputs, views=views, max_new_tokens=args.new_tokens, use_cache=False)

    first = timed(lambda: cached(1), args.repeats)
    with_cache = timed(lambda: cached(args.new_tokens), args.repeats)
    steps_nocache = uncached().shape[1] - 1  # it may stop at EOS
    without_cache = timed(uncached, max(1, args.repeats // 2))
    return {
        "positions": positions,
        "prefill_s": first,
        "prefill_tok_s": positions / first,
        "decode_tok_s": (args.new_tokens - 1) / max(with_cache - first, 1e-9),
        "nocache_tok_s": steps_nocache / max(without_cache - first, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["cpu", "7b"], default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args()
    model, layout = build(args)
    print(
        f"# {hardware(args.device)}; {args.preset} shapes, {args.layers} LLM layers, {args.dtype}; {args.new_tokens} new tokens"
    )
    print(f"{'arm':>10} {'images':>6} {'positions':>9} {'prefill s':>9} {'prefill tok/s':>13} "
          f"{'decode tok/s':>12} {'no-cache tok/s':>14}")  # fmt: skip
    results = {}
    for images in (1, 4):
        for arm, (views, alpha) in ARMS.items():
            r = measure(model, layout, views, alpha, images, args)
            results[(arm, images)] = r
            print(f"{arm:>10} {images:>6} {r['positions']:>9} {r['prefill_s']:>9.3f} {r['prefill_tok_s']:>13.0f} "
                  f"{r['decode_tok_s']:>12.1f} {r['nocache_tok_s']:>14.1f}", flush=True)  # fmt: skip
    for images in (1, 4):
        m, p = results[("maven", images)], results[("576-patch", images)]
        print(f"ratio@{images}img prefill-time {p['prefill_s'] / m['prefill_s']:.2f}x  decode {m['decode_tok_s'] / p['decode_tok_s']:.2f}x  "
              f"kv-cache {m['decode_tok_s'] / m['nocache_tok_s']:.2f}x  (maven vs 576-patch; cache vs none)")  # fmt: skip


if __name__ == "__main__":
    main()
