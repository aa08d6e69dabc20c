"""Pretrain the miniature world's vision tower on the objects its images are known to hold.

The real recipe starts from CLIP ViT-L/14-336, whose patch features already say what is where. A random
tower does not: on the synthetic shapes its features carry colour but not shape (a per-patch linear probe
finds colour at 0.78-0.95 and shape at chance, issue 22), so no amount of MaVEn training could answer
"what shape is the red object?". This module gives the tiny tower what CLIP brings to the real one.

**Supervised, not contrastive.** Every object of a synthetic image is known exactly, so each patch gets
three targets: the colour and the shape of the object covering most of it (or background), and whether
the object's centre lies in it (what counting needs: one centre per object, however many patches the
object spans). Cross-entropy on these trains in about a minute on two CPU cores and gives features from
which a linear probe reads all three; a CLIP-style contrastive objective would need a text encoder,
large batches and many more steps to learn the same binding of colour to shape at this size.

The heads read the features MaVEn uses (``select_layer``, LLaVA's penultimate layer, CLS dropped), so the
layers above it keep their random initialisation: nothing reads them. The heads are not saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from maven_dist.config import VisionConfig
from maven_dist.data.image_transform import ImageTransform
from maven_dist.offline.base_models import build_random_vision_tower
from maven_dist.offline.pseudo_labels.patch_labels import patch_coverage
from maven_dist.offline.synthetic_scene import COLOURS, SHAPES, Scene, draw_scene

MIN_COVERAGE = 0.25
"""A patch shows an object when the object covers at least this share of it (else: background)."""
BACKGROUND_WEIGHT = 0.2
"""Weight of the background class in the colour and shape losses (objects: 1)."""


@dataclass
class PatchTargets:
    """Per-patch targets of a set of images, [N, P] each (raster order, the tower's grid)."""

    colour: torch.Tensor
    """0 background, 1 + index in COLOURS."""
    shape: torch.Tensor
    """0 background, 1 + index in SHAPES."""
    centre: torch.Tensor
    """1.0 where an object's centre lies."""


def scene_targets(scene: Scene, grid: int) -> PatchTargets:
    """Targets [1, P] of one scene on a ``grid x grid`` patch lattice, through the letterbox the tower's
    transform applies (``offline/pseudo_labels/patch_labels.py`` computes the coverage)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    p = grid * grid
    out = PatchTargets(
        torch.zeros(1, p, dtype=torch.long), torch.zeros(1, p, dtype=torch.long), torch.zeros(1, p)
    )
    height, width = scene.pixels.shape[:2]
    coverage = np.stack([patch_coverage(mask, grid) for mask in scene.masks])  # [objects, P]
    best = coverage.argmax(0)
    shown = coverage.max(0) >= MIN_COVERAGE
    side = max(width, height)
    pad_left, pad_top = (side - width) // 2, (side - height) // 2
    for k, obj in enumerate(scene.objects):
        where = torch.from_numpy(shown & (best == k))
        out.colour[0][where] = 1 + colours.index(obj.colour)
        out.shape[0][where] = 1 + shapes.index(obj.shape)
        x, y, w, h = obj.bbox
        col = min(grid - 1, int((pad_left + x + w / 2) * grid / side))
        row = min(grid - 1, int((pad_top + y + h / 2) * grid / side))
        out.centre[0, row * grid + col] = 1.0
    return out


def draw_training_set(
    num_images: int, image_size: int, grid: int, seed: int
) -> tuple[torch.Tensor, PatchTargets]:
    """Fresh scenes (never the demo's data set: the tower, like CLIP, is trained on images of its own),
    as tower inputs [N, 3, S, S] and their patch targets. Every third scene is landscape, every third
    portrait, as in ``generate_synthetic``."""
    rng = np.random.default_rng(seed)
    transform = ImageTransform(image_size)
    pixels, targets = [], []
    for index in range(num_images):
        width = image_size * 3 // 4 if index % 3 == 2 else image_size
        height = image_size * 3 // 4 if index % 3 == 1 else image_size
        scene = draw_scene(rng, height, width)
        pixels.append(transform(Image.fromarray(scene.pixels, "RGB")))
        targets.append(scene_targets(scene, grid))
    return torch.stack(pixels), PatchTargets(
        *(torch.cat([getattr(t, name) for t in targets]) for name in ("colour", "shape", "centre"))
    )


class _PatchHeads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, 1 + len(COLOURS))
        self.shape = nn.Linear(width, 1 + len(SHAPES))
        self.centre = nn.Linear(width, 1)

    def loss(self, features: torch.Tensor, targets: PatchTargets) -> tuple[torch.Tensor, dict[str, float]]:
        colour, shape = self.colour(features), self.shape(features)
        centre = self.centre(features).squeeze(-1)
        # Most patches are background; weighting it down spends the capacity on the objects.
        weight = torch.tensor([BACKGROUND_WEIGHT], device=features.device)
        loss = (
            F.cross_entropy(
                colour.flatten(0, 1),
                targets.colour.flatten(),
                weight=torch.cat([weight, colour.new_ones(len(COLOURS))]),
            )
            + F.cross_entropy(
                shape.flatten(0, 1),
                targets.shape.flatten(),
                weight=torch.cat([weight, shape.new_ones(len(SHAPES))]),
            )
            + F.binary_cross_entropy_with_logits(centre, targets.centre)
        )
        with torch.no_grad():
            on = targets.shape > 0
            accuracy = {
                "colour": (colour.argmax(-1) == targets.colour)[on].float().mean().item(),
                "shape": (shape.argmax(-1) == targets.shape)[on].float().mean().item(),
                "centre": ((centre > 0).float() == targets.centre).float().mean().item(),
            }
        return loss, accuracy


def pretrain_vision_tower(
    cfg: VisionConfig,
    out_dir: Path,
    seed: int,
    num_images: int = 4000,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 5e-3,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Build the tower of `cfg` into `out_dir` (``build_random_vision_tower``), train it for `steps` steps on
    the patch targets of `num_images` fresh scenes, save it back; return the last steps' per-patch
    training accuracies."""
    from transformers import CLIPVisionModel

    out_dir = Path(out_dir)
    build_random_vision_tower(cfg, out_dir, seed)
    tower = CLIPVisionModel.from_pretrained(out_dir)
    grid = cfg.image_size // cfg.patch_size
    pixels, targets = draw_training_set(num_images, cfg.image_size, grid, seed)
    torch.manual_seed(seed)
    heads = _PatchHeads(cfg.hidden_size)
    params = [p for p in tower.parameters()] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    start, recent = time.perf_counter(), []
    for step in range(steps):
        index = torch.randint(num_images, (batch_size,), generator=generator)
        hidden = tower(pixels[index], output_hidden_states=True).hidden_states[cfg.select_layer][:, 1:]
        batch = PatchTargets(targets.colour[index], targets.shape[index], targets.centre[index])
        loss, accuracy = heads.loss(hidden, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [accuracy])[-20:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            shown = ", ".join(f"{k} {np.mean([r[k] for r in recent]):.3f}" for k in accuracy)
            log(f"vision tower step {step + 1}/{steps}: loss {loss.item():.3f}, patch accuracy {shown} "
                f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    tower.eval()
    tower.save_pretrained(out_dir)
    return {k: float(np.mean([r[k] for r in recent])) for k in recent[-1]}
