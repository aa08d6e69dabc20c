"""Run one training stage in this process, on one intra-op thread, optionally with every image cut off
from the model (the convergence test's test of the test, tests/integration/test_convergence.py)::

    python -m tests.helpers.stage_run RECIPE [--blind] [--set key=value ...]

``--blind`` replaces each image's visual codes by code 0 and multiplies the projector's output by 0 before
the LLM sees them: the model trains on exactly the sequences it would otherwise, with nothing of the image
in them.
"""

from __future__ import annotations

import argparse

import torch


def cut_off_images() -> None:
    from maven_dist.model.frontend import MavenFrontEnd

    visual_embeds = MavenFrontEnd.visual_embeds

    def blind(self, pixel_values, image_codes, h_eos, views):
        out = visual_embeds(self, pixel_values, torch.zeros_like(image_codes), h_eos, views)
        codes = self.spec.num_codes + 2 if "discrete" in views else 0
        return torch.cat([out[:, :codes], out[:, codes:] * 0], dim=1)

    MavenFrontEnd.visual_embeds = blind


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--blind", action="store_true")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)  # the two runs of the test share the machine's cores
    from maven_dist.config import load_config
    from maven_dist.entry_point import prepare_process
    from maven_dist.train.trainer import run_stage

    prepare_process()
    if args.blind:
        cut_off_images()
    run_stage(load_config(args.recipe, args.set))


if __name__ == "__main__":
    main()
