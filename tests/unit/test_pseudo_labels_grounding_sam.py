"""Grounding SAM plumbing on tiny random Grounding DINO and SAM models saved to disk (issue 8).

The labels are meaningless with random weights; what is tested is loading from local directories,
per-image prompts, batching (a batch gives the same masks as one image at a time), shapes, and the
shard writer end to end.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SamConfig,
    SamImageProcessor,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
)

from maven_dist.data.shards import BASE_SCHEMA, read_shard, shard_name, write_shard_atomic
from maven_dist.offline.pseudo_labels.grounding_sam import GroundingSam, GroundingSamConfig
from maven_dist.offline.pseudo_labels.make_labels import make_patch_labels
from maven_dist.offline.pseudo_labels.sources import MaskFailure, MaskRequest

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    ".",
    "a",
    "the",
    "red",
    "blue",
    "circle",
    "square",
    "on",
    "grass",
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gsam")
    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    dino_cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(WORDS),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=12,
        num_feature_levels=3,
        max_text_len=32,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    dino_dir = root / "grounding_dino"
    GroundingDinoForObjectDetection(dino_cfg).save_pretrained(dino_dir)
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer,
    ).save_pretrained(dino_dir)
    sam_cfg = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=64,
            image_size=64,
            patch_size=16,
            output_channels=16,
            global_attn_indexes=[1],
            window_size=2,
            num_pos_feats=8,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_embedding_size=4, image_size=64, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16, num_hidden_layers=2
        ),
    )
    sam_dir = root / "sam"
    SamModel(sam_cfg).save_pretrained(sam_dir)
    SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
    ).save_pretrained(sam_dir)
    return dino_dir, sam_dir


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _source(model_dirs, **kw) -> GroundingSam:
    dino_dir, sam_dir = model_dirs
    # Thresholds 0 keep every box: a random model's scores are meaningless, the plumbing is not.
    return GroundingSam(
        GroundingSamConfig(
            str(dino_dir), str(sam_dir), box_threshold=0.0, text_threshold=0.0, device="cpu", **kw
        )
    )


def test_batched_masks_match_one_at_a_time_and_have_image_shapes(model_dirs):
    source = _source(model_dirs, max_boxes=3)
    requests = [
        MaskRequest("a.png", 60, 40, "A red circle on the grass.", _png(60, 40, 0)),
        MaskRequest("b.png", 30, 50, "the blue square", _png(30, 50, 1)),
        MaskRequest("c.png", 45, 45, "Is it?", _png(45, 45, 2)),
        MaskRequest("d.png", 60, 40, "a blue circle . a red square", _png(60, 40, 3)),
        MaskRequest("e.png", 30, 50, "red circle", _png(30, 50, 4)),
    ]
    batched = source.masks(requests)
    assert isinstance(batched[2], MaskFailure) and "noun phrase" in batched[2].reason
    for req, mask in zip(requests, batched, strict=True):
        if req.key == "c.png":
            continue
        assert mask.dtype == bool and mask.shape == (req.height, req.width)
        (alone,) = source.masks([req])
        np.testing.assert_array_equal(mask, alone, err_msg=req.key)
    boxes = source.detect([requests[0].load_image()], ["red circle . grass ."])
    assert boxes[0].shape == (3, 4)  # max_boxes of the 12 queries


def test_no_box_above_threshold_is_a_recorded_failure(model_dirs):
    dino_dir, sam_dir = model_dirs
    strict = GroundingSam(GroundingSamConfig(str(dino_dir), str(sam_dir), box_threshold=1.0, device="cpu"))
    (result,) = strict.masks([MaskRequest("a.png", 60, 40, "red circle", _png(60, 40, 0))])
    assert isinstance(result, MaskFailure) and "no box" in result.reason


def test_missing_model_directory_is_named(tmp_path, model_dirs):
    with pytest.raises(FileNotFoundError, match="Grounding DINO directory"):
        GroundingSam(GroundingSamConfig(str(tmp_path / "nope"), str(model_dirs[1])))


def test_make_patch_labels_with_grounding_sam(tmp_path, model_dirs):
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [
        {
            "id": f"s{i}",
            "source": "x.json",
            "source_index": i,
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nCompare."},
                {"from": "gpt", "value": text},
            ],
            "image_paths": [f"{i}a.png", f"{i}b.png"],
            "images": [_png(40, 30, i), b"not an image"],
            "image_sizes": [[40, 30], [10, 10]],
            "num_tokens": 8,
        }
        for i, text in enumerate(["the red circle", "a blue square on the grass", "red"])
    ]
    write_shard_atomic(pa.Table.from_pylist(rows, schema=BASE_SCHEMA), shards / shard_name(0))
    dino_dir, sam_dir = model_dirs
    cfg = GroundingSamConfig(str(dino_dir), str(sam_dir), box_threshold=0.0, text_threshold=0.0, device="cpu")
    report = make_patch_labels(shards, "grounding_sam", grounding=cfg, grid=4, batch_size=4, progress=False)
    labels = read_shard(shards / shard_name(0))["patch_labels"].to_pylist()
    assert report.images == 6 and report.rejected == 3  # the undecodable second image of every sample
    for sample in labels:
        assert len(sample) == 2 and sample[1] is None
        assert len(sample[0]) == 16 and set(sample[0]) <= {0, 1}
