"""tools/make_pseudo_labels.py and tools/tokenize_images.py on shards, and stage 1 training from them (issue 8)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from maven_dist.data.shards import BASE_SCHEMA, list_shards, read_shard, shard_name, write_shard_atomic
from maven_dist.offline.shard_jobs import read_rejects, tokenize_shards

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    """The command behind `maven labels` / `maven tokenize` (tools/*.py are aliases of them)."""
    return importlib.import_module(
        {"make_pseudo_labels": "maven_dist.cli.labels", "tokenize_images": "maven_dist.cli.tokenize"}[name]
    )


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_tokenize_shards_with_a_seed_tokenizer_records_undecodable_images(tmp_path):
    from maven_dist.offline.discrete.seed import build_seed_tokenizer
    from tests.unit.test_discrete_seed import TINY

    torch.manual_seed(0)
    seed = build_seed_tokenizer(TINY)
    rows = [
        {
            "id": f"s{i}",
            "source": "x.json",
            "source_index": i,
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "a cat"}],
            "image_paths": [f"{i}.png", f"{i}b.png"],
            "images": [_png(30 + i, 20, i), b"broken" if i == 1 else _png(20, 20, 9)],
            "image_sizes": [[30 + i, 20], [20, 20]],
            "num_tokens": 8,
        }
        for i in range(3)
    ]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard_atomic(pa.Table.from_pylist(rows[:2], schema=BASE_SCHEMA), shards / shard_name(0))
    write_shard_atomic(pa.Table.from_pylist(rows[2:], schema=BASE_SCHEMA), shards / shard_name(1))
    report = tokenize_shards(shards, seed, batch_size=4, progress=False)
    codes = [c for s in list_shards(shards) for c in read_shard(s)["image_codes"].to_pylist()]
    assert report.images == 6 and report.rejected == 1
    assert codes[1][1] is None
    expected = seed.encode([Image.open(io.BytesIO(rows[0]["images"][0]))])[0].tolist()
    assert codes[0][0] == expected  # batched in the job == alone
    for sample in codes:
        for c in sample:
            assert c is None or (len(c) == 6 and all(0 <= x < 50 for x in c))
    (reject,) = read_rejects(shards, "image_codes")
    assert (reject["shard"], reject["row"], reject["id"], reject["image"]) == (
        "shard-00000.arrow",
        1,
        "s1",
        1,
    )
    # Done shards are skipped without even loading the tokenizer (the path here does not exist).
    again = tokenize_shards(shards, "seed", tmp_path / "no_such_file.pt", progress=False)
    assert again.shards_done == [] and len(again.shards_skipped) == 2


def test_tool_arguments_are_checked(tmp_path):
    tool = _tool("make_pseudo_labels")
    with pytest.raises(SystemExit):
        tool.main([str(tmp_path), "--source", "coco", "--grid", "24"])  # no --annotations
    with pytest.raises(SystemExit):
        tool.main(
            [str(tmp_path), "--source", "grounding_sam", "--grid", "24", "--dino", str(tmp_path)]
        )  # no --sam
    with pytest.raises(SystemExit):
        _tool("tokenize_images").main([str(tmp_path), "--tokenizer", "seed", "--path", "x", "--train-kmeans"])


def test_stage1_trains_from_labels_written_by_the_tools(tmp_path):
    """The tiny recipe's data, labels and codes rewritten by the two CLIs, then stage 1 trains on them."""
    from maven_dist.config import load_config
    from maven_dist.offline.demo import prepare_demo
    from maven_dist.parallel.distributed import destroy
    from maven_dist.train.trainer import run_stage

    run = tmp_path / "run"
    cfg = load_config(
        ROOT / "tests/recipes/tiny/stage1.yaml",
        [
            f"run_dir={run}",
            "demo.num_images=24",
            "data.val_fraction=0",  # 24 images: every sample trains
            "stage.max_steps=4",
            "tracking.enabled=false",
            "data.num_workers=0",
        ],
    )
    prepare_demo(cfg)
    captions = run / "data" / "captions"
    labels_tool, codes_tool = _tool("make_pseudo_labels"), _tool("tokenize_images")
    for shard in list_shards(captions):  # drop what the demo set-up wrote, so only the tools' output is used
        table = read_shard(shard)
        write_shard_atomic(table.drop_columns(["patch_labels", "image_codes"]), shard)
        del table
    synthetic = run / "data" / "synthetic"
    assert (
        labels_tool.main(
            [
                str(captions),
                "--source",
                "coco",
                "--annotations",
                str(synthetic / "instances.json"),
                "--tower",
                str(run / "base" / "vision_tower"),
            ]
        )
        == 0
    )
    assert (
        codes_tool.main(
            [str(captions), "--tokenizer", "kmeans", "--path", str(run / "base" / "kmeans_tokenizer")]
        )
        == 0
    )
    labels = [
        lab
        for s in list_shards(captions)
        for sample in read_shard(s)["patch_labels"].to_pylist()
        for lab in sample
    ]
    assert len(labels) == 24 and all(len(lab) == 64 for lab in labels)  # 112 / 14 = 8 -> 8 x 8 patches
    ones = np.mean([np.mean(lab) for lab in labels])
    assert 0.05 < ones < 0.95  # objects are labelled, background is not
    try:
        result = run_stage(cfg)
    finally:
        destroy()
    assert result.steps == 4 and np.isfinite(result.final_loss)
    assert result.final_loss < 0.69  # BCE starts at ~ln 2 and falls on these labels
