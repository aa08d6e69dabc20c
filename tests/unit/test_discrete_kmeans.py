"""The small VQ tokenizer: k-means over pooled CLIP patch features (issue 8)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from maven_dist.offline.discrete import DiscreteTokenizer, load_discrete_tokenizer
from maven_dist.offline.discrete.kmeans import fit_kmeans, slot_layout, train_kmeans_tokenizer
from maven_dist.offline.synthetic import generate_synthetic


def save_tiny_tower(path, image_size: int = 112, seed: int = 0):
    """The tiny recipe's tower shape: random CLIP ViT, saved with its image processor."""
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        image_size=image_size,
        patch_size=14,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=128,
    )
    CLIPVisionModel(cfg).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("kmeans")
    data = generate_synthetic(root / "syn", num_images=160, seed=0)
    images = [Image.open(data.image_root / im.file_name).convert("RGB") for im in data.images]
    return root, data, images, save_tiny_tower(root / "tower")


def test_slot_layout():
    assert slot_layout(32) == (4, 8)
    assert slot_layout(16) == (4, 4)
    assert slot_layout(7) == (1, 7)


def test_fit_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    found = fit_kmeans(x, 3, seed=1)
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.1
    with pytest.raises(ValueError, match="at least"):
        fit_kmeans(x[:2], 3)


def test_images_sharing_an_object_share_more_codes_than_random_pairs(synthetic):
    root, data, images, tower = synthetic
    tok = train_kmeans_tokenizer(
        images, tower, root / "kmeans", codebook_size=256, num_codes=32, seed=0, device="cpu"
    )
    codes = tok.encode(images)
    assert codes.shape == (160, 32) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 256
    sets = [set(c.tolist()) for c in codes]
    kinds = [{(o.colour, o.shape) for o in im.objects} for im in data.images]
    shared, every = [], []
    for i, j in itertools.combinations(range(len(sets)), 2):
        overlap = len(sets[i] & sets[j])
        every.append(overlap)
        if kinds[i] & kinds[j]:
            shared.append(overlap)
    ratio = np.mean(shared) / np.mean(every)
    # Measured 1.17 with this tower and seed (3567 sharing pairs of 12720); the standard error of the
    # mean overlap is ~0.02 codes, so 1.1 is far outside noise and fails if the codes ignore content.
    assert ratio > 1.1, (
        f"pairs sharing an object share {np.mean(shared):.2f} codes, random pairs {np.mean(every):.2f}"
    )
    # Shuffling which image has which objects destroys the effect: the measurement is about content. One
    # shuffle selects pairs through a few images (those given many objects), so its mean is noisy (±0.1
    # measured); the mean over 20 shuffles is not.
    rng = np.random.default_rng(0)
    fake = []
    for _ in range(20):
        perm = rng.permutation(len(kinds))
        fake.append(
            np.mean(
                [
                    len(sets[i] & sets[j])
                    for i, j in itertools.combinations(range(len(sets)), 2)
                    if kinds[perm[i]] & kinds[perm[j]]
                ]
            )
        )
    assert abs(np.mean(fake) / np.mean(every) - 1) < 0.05, f"shuffled: {np.mean(fake) / np.mean(every):.3f}"


def test_saved_tokenizer_reloads_and_encodes_identically(synthetic, tmp_path):
    root, _, images, tower = synthetic
    tok = train_kmeans_tokenizer(
        images[:40], tower, tmp_path / "km", codebook_size=64, num_codes=32, seed=3, device="cpu"
    )
    again = load_discrete_tokenizer("kmeans", tmp_path / "km", device="cpu")
    assert isinstance(again, DiscreteTokenizer) and again.codebook_size == 64 and again.num_codes == 32
    torch.testing.assert_close(again.encode(images[:5]), tok.encode(images[:5]), rtol=0, atol=0)
    # Batching does not change an image's codes.
    torch.testing.assert_close(again.encode(images[:5])[2:3], again.encode([images[2]]), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="k-means tokenizer directory"):
        load_discrete_tokenizer("kmeans", tmp_path, device="cpu")
