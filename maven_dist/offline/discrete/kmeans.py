"""A small VQ tokenizer trained on the fly: k-means over pooled CLIP patch features.

For the tiny recipe and for users without SEED weights. It keeps SEED's interface and shape: a
fixed number of codes per image (``num_codes`` "query slots") from one shared codebook of
``codebook_size`` entries, nearest code by L2 distance.

How an image becomes codes:

1. the frozen CLIP tower (the one the continuous view uses) gives patch features from
   ``select_layer`` (CLS dropped), on the same :class:`ImageTransform` input as training;
2. the ``g x g`` patch grid is average-pooled to a ``rows x cols`` slot layout with
   ``rows * cols = num_codes`` (32 -> 4 x 8), codes in raster order like SEED's causal queries;
3. each slot feature has the image's mean slot subtracted and is L2-normalised, then assigned to
   the nearest of ``codebook_size`` k-means centroids (spherical k-means, fitted on the data).

Step 3 is a measured choice: on the synthetic shapes set with the tiny random tower, centring and
normalising raised the shared-code ratio of image pairs with a common object over random pairs
from about 1.11 to about 1.2 (4 x 8 slots, 256 codes); the image mean is mostly background and tint, which
say little about objects. ``tests/unit/test_discrete_kmeans.py`` asserts the effect.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from maven_dist.data.image_transform import ImageTransform

if TYPE_CHECKING:
    from transformers import CLIPVisionModel

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "codebook.safetensors"


def slot_layout(num_codes: int) -> tuple[int, int]:
    """rows x cols = num_codes with rows <= cols as close to square as possible (32 -> 4 x 8)."""
    rows = max(r for r in range(1, math.isqrt(num_codes) + 1) if num_codes % r == 0)
    return rows, num_codes // rows


class SlotFeatures(torch.nn.Module):
    """CLIP tower -> ``num_codes`` centred, L2-normalised slot features per image."""

    def __init__(
        self, tower: CLIPVisionModel, transform: ImageTransform, num_codes: int, select_layer: int = -2
    ):
        super().__init__()
        self.tower = tower.eval()
        self.transform = transform
        self.num_codes = num_codes
        self.select_layer = select_layer
        self.layout = slot_layout(num_codes)

    @property
    def device(self) -> torch.device:
        return next(self.tower.parameters()).device

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        """-> float32 [n, num_codes, hidden]."""
        dtype = next(self.tower.parameters()).dtype
        pixels = torch.stack([self.transform(im) for im in images]).to(self.device, dtype)
        patches = (
            self.tower(pixels, output_hidden_states=True).hidden_states[self.select_layer][:, 1:].float()
        )
        n, p, d = patches.shape
        grid = math.isqrt(p)
        slots = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(n, d, grid, grid), self.layout)
        slots = slots.flatten(2).transpose(1, 2)  # [n, rows*cols, d], raster order
        return F.normalize(slots - slots.mean(dim=1, keepdim=True), dim=-1)


def fit_kmeans(
    x: torch.Tensor, k: int, *, iters: int = 25, seed: int = 0, chunk: int = 65536
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; deterministic for a seed. -> centroids [k, d]."""
    if len(x) < k:
        raise ValueError(
            f"k-means needs at least codebook_size={k} slot vectors, got {len(x)}: use more images"
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if k > 1024:  # k-means++ costs k passes over the data; a random sample seeds large codebooks
        centroids = x[torch.randperm(len(x), generator=gen)[:k].to(x.device)].clone()
    else:
        centroids = _kmeans_plus_plus(x, k, gen)
    for _ in range(iters):
        assign = assign_codes(x, centroids, chunk)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
    return centroids


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Each next centre is drawn with probability proportional to its squared distance to the chosen."""
    centroids = x[torch.randint(len(x), (1,), generator=gen).to(x.device)].clone()
    nearest = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:  # fewer distinct points than k: any point will do
            pick = torch.randint(len(x), (1,), generator=gen)
        else:
            pick = torch.multinomial((nearest / total).cpu(), 1, generator=gen)
        centroids = torch.cat([centroids, x[pick.to(x.device)]])
        nearest = torch.minimum(nearest, torch.cdist(x, centroids[-1:]).squeeze(1) ** 2)
    return centroids


def assign_codes(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the L2-nearest codebook row for every row of `x` (chunked to bound memory)."""
    return torch.cat([torch.cdist(part, codebook).argmin(dim=1) for part in x.split(chunk)])


class KMeansTokenizer:
    """Slot features of a CLIP tower, quantised by a k-means codebook; a :class:`DiscreteTokenizer`."""

    def __init__(self, features: SlotFeatures, codebook: torch.Tensor, batch_size: int = 32):
        self.features = features
        self.codebook = codebook.float().to(features.device)
        self.num_codes = features.num_codes
        self.codebook_size = codebook.shape[0]
        self.batch_size = batch_size

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            slots = self.features(images[start : start + self.batch_size])
            out.append(assign_codes(slots.flatten(0, 1), self.codebook).view(len(slots), self.num_codes))
        return torch.cat(out).long().cpu() if out else torch.zeros(0, self.num_codes, dtype=torch.long)

    def save_pretrained(self, out_dir: str | Path, tower_path: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"codebook": self.codebook.cpu().contiguous()}, str(out / WEIGHTS_NAME))
        cfg = {
            "kind": "kmeans",
            "tower_path": str(tower_path),
            "select_layer": self.features.select_layer,
            "num_codes": self.num_codes,
            "codebook_size": self.codebook_size,
            "slot_layout": list(self.features.layout),
            "feature_dim": int(self.codebook.shape[1]),
        }
        (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        tower_path: str | Path | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KMeansTokenizer:
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is not a k-means tokenizer directory ({CONFIG_NAME} + {WEIGHTS_NAME}); "
                "train one with maven tokenize --train-kmeans"
            )
        cfg = json.loads((path / CONFIG_NAME).read_text())
        codebook = load_file(str(path / WEIGHTS_NAME))["codebook"]
        if tuple(codebook.shape) != (cfg["codebook_size"], cfg["feature_dim"]):
            raise ValueError(
                f"{path / WEIGHTS_NAME}: codebook shape {list(codebook.shape)} disagrees with {CONFIG_NAME}"
            )
        features = build_slot_features(
            tower_path or cfg["tower_path"], cfg["num_codes"], cfg["select_layer"], device, dtype
        )
        return cls(features, codebook)


def build_slot_features(
    tower_path: str | Path,
    num_codes: int,
    select_layer: int = -2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SlotFeatures:
    # Imported here: transformers takes seconds to import, and `maven tokenize --dry-run` (the check
    # slurm/tokenize_array.sh runs before queueing) and the SEED path never need CLIP.
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(str(tower_path), local_files_only=True, torch_dtype=dtype).to(
        device
    )
    return SlotFeatures(tower, ImageTransform.from_pretrained(tower_path), num_codes, select_layer)


def train_kmeans_tokenizer(
    images: Iterable[Image.Image] | str | Path,
    tower_dir: str | Path,
    out_dir: str | Path,
    *,
    codebook_size: int = 256,
    num_codes: int = 32,
    seed: int = 0,
    select_layer: int = -2,
    max_images: int = 20000,
    batch_size: int = 32,
    iters: int = 25,
    device: str = "",
    progress: bool = False,
) -> KMeansTokenizer:
    """Fit the codebook on `images` (PIL images, or a shards directory to read them from), save it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    features = build_slot_features(tower_dir, num_codes, select_layer, device)
    if isinstance(images, (str, Path)):
        images = _shard_images(images)
    slots, batch = [], []
    from tqdm import tqdm

    for image in tqdm(images, desc="kmeans features", unit="img", disable=not progress, total=None):
        batch.append(image)
        if len(batch) == batch_size:
            slots.append(features(batch).flatten(0, 1))
            batch = []
        if sum(len(s) for s in slots) >= max_images * num_codes:
            break
    if batch:
        slots.append(features(batch).flatten(0, 1))
    if not slots:
        raise ValueError("no images to fit the k-means tokenizer on")
    codebook = fit_kmeans(torch.cat(slots), codebook_size, iters=iters, seed=seed)
    tokenizer = KMeansTokenizer(features, codebook, batch_size=batch_size)
    tokenizer.save_pretrained(out_dir, tower_dir)
    return tokenizer


def _shard_images(shards_dir: str | Path) -> Iterable[Image.Image]:
    """Every image of every shard, decoded (original bytes when the shard kept them)."""
    import io

    from maven_dist.data.shards import list_shards, read_shard

    for shard in list_shards(shards_dir):
        table = read_shard(shard)
        stored = table["images"].to_pylist()
        originals = table["original_images"].to_pylist() if "original_images" in table.column_names else None
        for row, sample in enumerate(stored):
            for j, data in enumerate(sample):
                data = (originals[row] or sample)[j] if originals else data
                yield Image.open(io.BytesIO(data)).convert("RGB")
