"""``maven chat DIR [--image A.jpg ...] ["question"]``: talk to a trained MaVEn (also ``python -m maven_dist.chat``).

With a question it answers once and exits; without, it reads questions from stdin, one per line, and keeps
the conversation (``/reset`` starts over, ``/quit`` or end of input stops). The images belong to the first
question: each ``<image>`` in it marks where one goes (without any, they come first). Tokens are printed as
they are generated. DIR is a stage export (``RUN_DIR/stage4/export``) or a ``maven merge`` output.

Exit codes: 0 answered, 2 bad input (an unreadable image, more ``<image>`` than images, a prompt longer
than the context, a model directory without its discrete tokenizer), 1 anything else.
"""

from __future__ import annotations

import argparse
import sys

from transformers import TextStreamer

from maven_dist.contract.command_line import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="maven chat",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("model_dir", help="a MaVEn directory: a stage export or a `maven merge` output")
    p.add_argument(
        "question", nargs="?", help="answer this once and exit (default: read questions from stdin)"
    )
    p.add_argument("--image", action="append", default=[], help="an image of the first question (repeatable)")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, auto, ... (default and auto: cuda when present)"
    )
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="model precision")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (greedy only)")
    p.add_argument("--no-stream", action="store_true", help="print each answer whole, not token by token")
    return p


def main(argv: list[str] | None = None) -> int:
    # intermixed: `maven chat DIR --image a.png "question"` puts the question after the options
    args = build_parser().parse_intermixed_args(argv)
    from transformers.utils import logging as hf_logging

    from maven_dist.inference import InputError, MavenGenerator

    hf_logging.disable_progress_bar()  # weight-loading bars would interleave with the answers

    try:
        generator = MavenGenerator.from_pretrained(args.model_dir, device=args.device, dtype=args.dtype)
    except InputError as err:
        print(f"maven chat: error: {err}", file=sys.stderr)
        return 2
    tokenizer = generator.processor.tokenizer
    history: list[dict] = []

    def answer(question: str) -> bool:
        # The whole conversation is the prompt; its images stay with its first question.
        turns = [*history, {"role": "user", "content": question}]
        streamer = (
            None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        )
        try:
            (result,) = generator.generate(
                [turns],
                images=[args.image] if args.image else None,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                num_beams=args.num_beams,
                streamer=streamer,
            )
        except InputError as err:
            print(f"maven chat: error: {err}", file=sys.stderr)
            return False
        if streamer is None:
            print(result.text, flush=True)
        history.extend([turns[-1], {"role": "assistant", "content": result.text}])
        return True

    if args.question is not None:
        return 0 if answer(args.question) else 2
    print("maven chat: type a question (/reset, /quit)", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history.clear()
            continue
        if line and not answer(line):
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
