"""The shard loader: round trip against direct decoding, exact resume (ranks, worker counts), stage views."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from maven_dist.config import Config
from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID, extend_tokenizer
from maven_dist.data.formats import DataError
from maven_dist.data.image_transform import ImageTransform
from maven_dist.data.loader import GROUP_STEPS, ShardIndex, build_loader, epoch_steps, is_held_out
from maven_dist.data.prepare import PrepareOptions, prepare
from maven_dist.data.shards import list_shards, read_shard, update_shard_columns
from maven_dist.data.templates import render
from maven_dist.offline.pseudo_labels.patch_labels import mask_to_patch_labels
from maven_dist.offline.synthetic import generate_synthetic
from maven_dist.offline.tokenizer_training import train_tokenizer

SIZE, PATCH, NUM_CODES, CODEBOOK = 32, 8, 8, 64
GRID = SIZE // PATCH


def _codes_for(data: bytes) -> list[int]:
    """Stand-in visual codes: a fixed function of the image, so tests can recompute them."""
    digest = hashlib.sha256(data).digest()
    return [b % CODEBOOK for b in digest[:NUM_CODES]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    synth = generate_synthetic(root / "synth", num_images=10, seed=1, image_size=48)  # 30 samples
    train_tokenizer(synth.captions_txt.read_text().splitlines(), root / "tok", vocab_size=400)
    masks = {img.file_name: synth.masks(i).any(0) for i, img in enumerate(synth.images)}
    dirs = {}
    for name, resize, image_format in (("raw", 0, "png"), ("resized", SIZE, "png"), ("ppm", SIZE, "ppm")):
        out = root / name
        options = PrepareOptions(
            image_root=synth.image_root, out_dir=out, tokenizer_dir=root / "tok", num_codes=NUM_CODES,
            num_patches=GRID * GRID, resize=resize, image_format=image_format, shard_size=8, num_workers=0,
            progress=False,
        )  # fmt: skip
        prepare([synth.captions_json, synth.conversations_json], options)
        for shard in list_shards(out):
            table = read_shard(shard)
            paths = table["image_paths"].to_pylist()
            originals = [[(synth.image_root / p).read_bytes() for p in row] for row in paths]
            codes = pa.array([[_codes_for(b) for b in row] for row in originals])
            labels = pa.array([[mask_to_patch_labels(masks[p], GRID).tolist() for p in row] for row in paths])
            del table
            update_shard_columns(
                shard, {"image_codes": lambda _t, c=codes: c, "patch_labels": lambda _t, v=labels: v}
            )
        dirs[name] = out
    records = json.loads(synth.captions_json.read_text()) + json.loads(synth.conversations_json.read_text())
    return {"synth": synth, "tok": root / "tok", "dirs": dirs, "records": {r["id"]: r for r in records}}


def _cfg(
    world,
    view="conversations",
    views=("discrete", "continuous"),
    data="raw",
    micro=5,
    workers=0,
    global_batch=None,
    keep_ratio=0.25,
    **data_kw,
):
    cfg = Config()
    cfg.model.selector.keep_ratio = keep_ratio
    cfg.seed = 7
    cfg.data.path = str(world["dirs"][data])
    cfg.data.format = view
    cfg.data.num_workers = workers
    for k, v in data_kw.items():
        setattr(cfg.data, k, v)
    cfg.stage.views = list(views)
    cfg.stage.micro_batch_size = micro
    cfg.stage.global_batch_size = global_batch or micro
    cfg.model.vision.image_size, cfg.model.vision.patch_size = SIZE, PATCH
    cfg.model.discrete.num_codes, cfg.model.discrete.codebook_size = NUM_CODES, CODEBOOK
    cfg.model.vocab.pad_to_multiple_of = 128
    return cfg


def _loader(world, dp_rank=0, dp_size=1, split="train", **kw):
    tokenizer = AutoTokenizer.from_pretrained(str(world["tok"]))
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    cfg = _cfg(world, **kw)
    return (
        build_loader(cfg, tokenizer, layout, dp_rank, dp_size, transform=ImageTransform(SIZE), split=split),
        tokenizer,
        layout,
    )


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _split(batch):
    """Per sample: (id, input_ids, labels, pixel tensors, codes), following the placeholder order."""
    out, image = [], 0
    for b, sample_id in enumerate(batch.sample_ids):
        if batch.segment_ids is None:
            mine = batch.attention_mask[b].bool()
            ids, labels = batch.input_ids[b][mine], batch.labels[b][mine]
        else:  # packed: sample b is where segment_ids says, samples numbered row-major
            mine = batch.segment_ids == b
            ids, labels = batch.input_ids[mine], batch.labels[mine]
        n = int((ids == IMAGE_PLACEHOLDER_ID).sum())
        out.append((sample_id, ids.tolist(), labels.tolist(), batch.pixel_values[image : image + n],
                    batch.image_codes[image : image + n]))  # fmt: skip
        image += n
    assert image == batch.num_images
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("data", ["raw", "resized", "ppm"])
def test_round_trip_equals_direct_decoding(world, data):
    loader, tokenizer, _ = _loader(world, data=data, workers=2)
    assert loader.batches_per_epoch == len(world["records"]) // 5 == 6
    transform = ImageTransform(SIZE)
    seen = set()
    for batch in _take(loader, loader.batches_per_epoch):
        assert batch.pixel_values.shape[1:] == (3, SIZE, SIZE)
        for sample_id, ids, labels, pixels, codes in _split(batch):
            record = world["records"][sample_id]
            direct = render(record["conversations"], "vicuna_v1", tokenizer)
            assert ids == direct.input_ids and labels == direct.labels
            paths = record.get("image", [])
            paths = [paths] if isinstance(paths, str) else paths
            expected = [transform(Image.open(world["synth"].image_root / p)) for p in paths]
            assert [_digest(p) for p in pixels] == [_digest(e) for e in expected]
            raw = [(world["synth"].image_root / p).read_bytes() for p in paths]
            assert codes.tolist() == [_codes_for(b) for b in raw]
            seen.add(sample_id)
    assert seen == set(world["records"])  # one epoch = every sample once
    assert loader.state_dict()["epoch"] == 1 and loader.num_skipped == 0


def _signature(batches):
    return [
        (
            b.sample_ids,
            b.input_ids.tolist(),
            _digest(b.pixel_values),
            b.image_codes.tolist(),
            None if b.segment_ids is None else b.segment_ids.tolist(),
        )  # fmt: skip
        for b in batches
    ]


PACKED = {"packing": True, "max_length": 420}
"""Packing on, with rows that take two samples of this data (164 to 207 positions each)."""


def _samples(planned) -> list[int]:
    """The sample indices of planned micro-batches (lists of samples, or of packed rows)."""
    return [i for batch in planned for item in batch for i in (item if isinstance(item, list) else [item])]


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_is_exact_with_other_worker_counts(world, dp_size, packing):
    micro = 3
    gb = micro * dp_size
    kw = PACKED if packing else {}
    for rank in range(dp_size):
        full, _, _ = _loader(
            world, dp_rank=rank, dp_size=dp_size, micro=micro, workers=2, global_batch=gb, **kw
        )
        per_epoch = full.batches_per_epoch
        if not packing:
            assert per_epoch == len(world["records"]) // (micro * dp_size)
        total = per_epoch + 3  # crosses an epoch boundary
        expected = _signature(_take(full, total))
        stop = per_epoch - 1
        first, _, _ = _loader(
            world, dp_rank=rank, dp_size=dp_size, micro=micro, workers=0, global_batch=gb, **kw
        )
        head = _signature(_take(first, stop))
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        second, _, _ = _loader(
            world, dp_rank=rank, dp_size=dp_size, micro=micro, workers=1, global_batch=gb, **kw
        )
        second.load_state_dict(state)
        tail = _signature(_take(second, total - stop))
        assert head + tail == expected
        assert second.state_dict()["epoch"] >= 1
    if dp_size == 2:  # ranks see disjoint halves of every epoch
        r0, _, _ = _loader(world, dp_rank=0, dp_size=2, micro=micro, global_batch=gb, **kw)
        r1, _, _ = _loader(world, dp_rank=1, dp_size=2, micro=micro, global_batch=gb, **kw)
        for epoch in range(2):
            a, b = _samples(r0.epoch_batches(epoch)), _samples(r1.epoch_batches(epoch))
            assert not set(a) & set(b) and len(set(a)) == len(a) and len(set(b)) == len(b)
            if not packing:  # packed micro-batches hold as many samples as fit
                assert len(a) == len(b) == r0.batches_per_epoch * micro
        assert r0.epoch_batches(0) != r0.epoch_batches(1)  # reshuffled per epoch
    other, _, _ = _loader(world, micro=micro, global_batch=2 * gb, **kw)
    with pytest.raises(ValueError, match="global_batch_size"):
        other.load_state_dict(state)
    flipped, _, _ = _loader(world, micro=micro, global_batch=gb, **({} if packing else PACKED))
    with pytest.raises(ValueError, match="packing"):
        flipped.load_state_dict(state)


@pytest.mark.parametrize("packing", [False, True])
def test_same_steps_on_any_dp_size_and_resume_across_dp_sizes(world, packing):
    """1 rank accumulating 2 micro-batches sees, per step, exactly the samples of 2 ranks x 1; a state
    saved on 1 rank resumes on 2 at the same step."""
    micro, gb = 3, 6
    kw = PACKED if packing else {}
    single, _, _ = _loader(world, micro=micro, global_batch=gb, **kw)
    reference = [b.sample_ids for b in _take(single, 6)]  # 3 steps x 2 micro-batches
    ranks = [_loader(world, dp_rank=r, dp_size=2, micro=micro, global_batch=gb, **kw)[0] for r in range(2)]
    per_rank = [[b.sample_ids for b in _take(loader, 3)] for loader in ranks]
    for step in range(3):
        assert per_rank[0][step] + per_rank[1][step] == reference[2 * step] + reference[2 * step + 1]
    head, _, _ = _loader(world, micro=micro, global_batch=gb, **kw)
    _take(head, 4)  # two full steps
    state = json.loads(json.dumps(head.state_dict()))
    for rank, loader in enumerate(
        _loader(world, dp_rank=r, dp_size=2, micro=micro, global_batch=gb, **kw)[0] for r in range(2)
    ):
        loader.load_state_dict(state)
        assert next(iter(loader)).sample_ids == reference[4 + rank]
    _take(head, 1)  # mid-step: cannot be split over 2 ranks
    mid = head.state_dict()
    late, _, _ = _loader(world, dp_rank=0, dp_size=2, micro=micro, global_batch=gb, **kw)
    with pytest.raises(ValueError, match="step boundary"):
        late.load_state_dict(mid)


def test_packed_batches_hold_each_sample_as_decoded_within_their_budgets(world):
    """Packed rows are the samples end to end, as the unpacked loader decodes them; no row is longer than
    data.max_length at the stage's positions per image, no micro-batch has more rows or images than allowed."""
    micro, images_allowed = 3, 6
    packed, _, _ = _loader(world, micro=micro, pack_max_images=images_allowed, **PACKED)
    plain, _, _ = _loader(world, micro=1, shuffle=False, group_by_length=False)
    decoded = {s[0]: s for b in _take(plain, plain.batches_per_epoch) for s in _split(b)}
    per_image = NUM_CODES + 2 + GRID * GRID // 4
    seen = []
    for batch in _take(packed, packed.batches_per_epoch):
        rows = batch.input_ids.shape[0]
        assert rows <= micro and batch.num_images <= images_allowed
        for r in range(rows):
            real = batch.attention_mask[r].bool()
            ids = batch.input_ids[r][real]
            assert (
                len(ids) + int((ids == IMAGE_PLACEHOLDER_ID).sum()) * (per_image - 1) <= PACKED["max_length"]
            )
        for got in _split(batch):
            want = decoded[got[0]]
            assert got[1:3] == want[1:3] and torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])
            seen.append(got[0])
    assert len(seen) == len(set(seen)) == len(_samples(packed.epoch_batches(0)))
    assert len(seen) > packed.batches_per_epoch * micro, "rows hold more than one sample"


def test_plan_groups_by_modality_and_length(world):
    index = ShardIndex(world["dirs"]["raw"])
    steps = epoch_steps(index, seed=0, epoch=0, step_size=2, shuffle=True, group_by_length=True)
    assert steps == epoch_steps(index, 0, 0, 2, True, True)
    flat = [i for s in steps for i in s]
    assert len(flat) == len(set(flat)) == len(index) // 2 * 2
    for step in steps:
        keys = [(index.num_images[i], -index.lengths[i]) for i in step]
        assert keys == sorted(keys)
    # Grouping pads less than a plain shuffle.
    plain = epoch_steps(index, 0, 0, 2, True, False)

    def padding(plan):
        return sum(max(index.lengths[s]) * len(s) - sum(index.lengths[s]) for s in plan)

    assert padding(steps) < padding(plain)
    assert GROUP_STEPS >= 1
    ordered = epoch_steps(index, 0, 0, 2, False, False)
    assert [i for s in ordered for i in s] == list(range(len(index) // 2 * 2))


def test_stage_views(world):
    # Stage 1: images, codes and patch labels, no text.
    loader, _, _ = _loader(world, view="patch_labels", data="resized", micro=4)
    batch = _take(loader, 1)[0]
    assert batch.input_ids is None
    assert batch.patch_labels.shape == (batch.num_images, GRID * GRID)
    assert batch.image_codes.shape == (batch.num_images, NUM_CODES)
    assert set(batch.patch_labels.unique().tolist()) <= {0.0, 1.0}

    # Stage 2: image -> caption, or caption -> <img> codes </img> as the only targets.
    loader, tokenizer, layout = _loader(
        world, view="discrete_alignment", views=("discrete",), micro=4, t2i_fraction=0.5
    )
    directions = []
    for batch in _take(loader, loader.batches_per_epoch):
        assert (
            (batch.input_ids == IMAGE_PLACEHOLDER_ID).sum() == batch.num_images == batch.image_codes.shape[0]
        )
        for sample_id, ids, labels, pixels, _codes in _split(batch):
            trained = [lab for lab in labels if lab != IGNORE_INDEX]
            if IMAGE_PLACEHOLDER_ID in ids:
                directions.append("i2t")
                assert tokenizer.decode(trained).endswith("\n")
            else:
                directions.append("t2i")
                record = world["records"][sample_id]
                raw = (world["synth"].image_root / record["image"]).read_bytes()
                codes = layout.code_to_token_id(torch.tensor(_codes_for(raw))).tolist()
                assert trained == [layout.img_start_id, *codes, layout.img_end_id]
                assert tokenizer.decode(ids[1 : -len(trained)]) == record["conversations"][1]["value"]
                assert len(pixels) == 0
    assert "t2i" in directions and "i2t" in directions
    again, _, _ = _loader(world, view="discrete_alignment", views=("discrete",), micro=4, t2i_fraction=0.5)
    assert _signature(_take(again, 2)) == _signature(
        _take(_loader(world, view="discrete_alignment", views=("discrete",), micro=4, t2i_fraction=0.5)[0], 2)
    )

    # Stage 3: plain captions of the first round, continuous view only (codes not needed).
    loader, tokenizer, _ = _loader(world, view="captions", views=("continuous",), micro=4)
    batch = _take(loader, 1)[0]
    for sample_id, ids, labels, _pixels, _codes in _split(batch):
        answer = world["records"][sample_id]["conversations"][1]["value"]
        assert tokenizer.decode([lab for lab in labels if lab != IGNORE_INDEX]) == answer + "\n"
        assert ids[0] == tokenizer.bos_token_id


def test_missing_columns_say_which_tool_to_run(world, tmp_path):
    bare = tmp_path / "bare"
    options = PrepareOptions(
        image_root=world["synth"].image_root, out_dir=bare, tokenizer_dir=world["tok"], num_codes=NUM_CODES,
        num_patches=GRID * GRID, shard_size=64, num_workers=0, progress=False,
    )  # fmt: skip
    prepare([world["synth"].captions_json], options)
    world = {**world, "dirs": {"bare": bare}}
    with pytest.raises(DataError, match="maven tokenize"):
        _loader(world, data="bare")
    with pytest.raises(DataError, match="maven labels"):
        _loader(world, data="bare", view="patch_labels")
    # The continuous view alone still needs the codes wherever the selector runs (h_eos comes from them) ...
    with pytest.raises(DataError, match=r"the selector computes h_eos from them\): run maven tokenize"):
        _loader(world, data="bare", view="captions", views=("continuous",), micro=4)
    # ... and only there: at alpha = 1 every patch is kept and no selector runs.
    loader, _, _ = _loader(
        world, data="bare", view="captions", views=("continuous",), micro=4, keep_ratio=1.0
    )
    assert _take(loader, 1)[0].image_codes.shape[1] == 0  # not needed, not required


def test_bad_samples_are_counted_and_skipped_or_stop_strict(world, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(world["dirs"]["raw"], broken)
    first = list_shards(broken)[0]

    def corrupt(table):
        images = table["images"].to_pylist()
        images[0] = [b"\x89PNG\r\n\x1a\n garbage"]
        return pa.array(images, pa.list_(pa.binary()))

    bad_id = read_shard(first)["id"][0].as_py()
    update_shard_columns(first, {"images": corrupt})
    world = {**world, "dirs": {"broken": broken}}
    loader, _, _ = _loader(
        world, data="broken", view="captions", views=("continuous",), micro=5, shuffle=False
    )
    seen = [i for b in _take(loader, loader.batches_per_epoch) for i in b.sample_ids]
    assert loader.num_skipped == 1 and bad_id not in seen and len(seen) == len(world["records"]) - 1
    strict, _, _ = _loader(world, data="broken", view="captions", views=("continuous",), micro=5, shuffle=False,
                           strict=True)  # fmt: skip
    with pytest.raises(DataError, match=f"shard-00000.arrow row 0 \\(id '{bad_id}'\\)"):
        _take(strict, strict.batches_per_epoch)


def test_shards_are_memory_mapped_not_read(world):
    shard = list_shards(world["dirs"]["raw"])[0]
    before = pa.total_allocated_bytes()
    table = read_shard(shard)
    assert table.nbytes > 10_000
    assert pa.total_allocated_bytes() - before < 1_000  # buffers point into the map, nothing copied
    assert np.asarray(table["num_tokens"]).size == table.num_rows


def test_an_epoch_without_a_usable_sample_is_an_error_not_an_endless_loop(world):
    loader, _, _ = _loader(
        world, max_length=16, allow_too_long=True
    )  # shorter than every sample of this view
    with pytest.raises(DataError, match="no usable sample"):
        _take(loader, 1)


def _split_loader(world, split, dp_rank=0, dp_size=1, **kw):
    return _loader(world, dp_rank, dp_size, split=split, **kw)[0]


def test_the_validation_split_is_held_out_by_id_and_read_once_per_pass(world):
    held = {i for i in world["records"] if is_held_out(i, 0.3)}
    assert 0 < len(held) < len(world["records"])
    assert held == {i for i in world["records"] if is_held_out(i, 0.3)}, "the split must be deterministic"

    train = _split_loader(world, "train", micro=2, val_fraction=0.3)
    trained = {i for b in _take(train, train.batches_per_epoch) for i in b.sample_ids}
    assert trained and not trained & held

    per_rank = [list(_split_loader(world, "val", r, 2, micro=2, val_fraction=0.3).one_pass()) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]), "every rank must evaluate as many micro-batches"
    seen = [i for batches in per_rank for b in batches for i in b.sample_ids]
    assert len(seen) == len(set(seen)), "a validation sample was read twice"
    assert set(seen) <= held and len(held) - len(seen) < 2 * 2, "only the last partial step may be left out"
    assert [b.sample_ids for b in per_rank[0]] == [
        b.sample_ids for b in _split_loader(world, "val", 0, 2, micro=2, val_fraction=0.3).one_pass()
    ], "every pass reads the same samples in the same order"


def test_a_validation_pass_leaves_the_training_order_alone(world):
    plain = _split_loader(world, "train", micro=2, val_fraction=0.3, workers=2)
    with_val = _split_loader(world, "train", micro=2, val_fraction=0.3, workers=2)
    val = _split_loader(world, "val", micro=2, val_fraction=0.3, workers=2)
    it_plain, it_val = iter(plain), iter(with_val)
    for _ in range(3):
        list(val.one_pass())
        a, b = next(it_plain), next(it_val)
        assert a.sample_ids == b.sample_ids and torch.equal(a.pixel_values, b.pixel_values)
    assert plain.state_dict() == with_val.state_dict()


def test_without_a_validation_set_there_is_no_validation_loader(world):
    assert _split_loader(world, "val") is None
    separate = _split_loader(world, "val", micro=2, val_path=str(world["dirs"]["resized"]))
    assert separate.index.paths == list_shards(world["dirs"]["resized"])


def test_a_keep_ratio_the_shards_do_not_fit_stops_before_training_unless_allowed(world):
    prepared = ShardIndex(world["dirs"]["raw"])
    longest = int(prepared.lengths.max())  # every sample fits at the prepared keep ratio (0.25) ...
    with pytest.raises(DataError) as err:  # ... but not all of them at 1.0: 16 instead of 4 patches per image
        _loader(world, micro=1, keep_ratio=1.0, max_length=longest)
    message = str(err.value)
    count = int(message.split(" of ")[0])
    grown = prepared.lengths + prepared.num_images * 12
    assert count == int((grown > longest).sum()) > 0
    assert "data.allow_too_long=true" in message and "maven prepare --keep-ratio" in message
    assert _loader(world, micro=1, keep_ratio=0.25, max_length=longest)[0].too_long == 0

    loader, _, _ = _loader(world, micro=1, keep_ratio=1.0, max_length=longest, allow_too_long=True)
    assert loader.too_long == count
    _take(loader, loader.batches_per_epoch - count)
    assert loader.num_skipped == count, "the estimate is exact for conversations in their prepared template"


def test_several_shard_directories_are_read_as_one_data_set(world, tmp_path):
    # Stage 1 trains on COCO and Visual Genome label shards together: data.path lists both directories.
    raw, resized = world["dirs"]["raw"], world["dirs"]["resized"]
    one = ShardIndex(raw)
    both = ShardIndex([raw, resized])
    assert both.paths == list_shards(raw) + list_shards(resized)
    assert len(both) == len(one) + len(ShardIndex(resized))
    assert both.dir_of.tolist() == [0] * len(one) + [1] * (len(both) - len(one))

    paths = [str(raw), str(resized)]
    loader, _, _ = _loader(
        world, view="patch_labels", path=paths, micro=4, shuffle=False, group_by_length=False
    )
    assert len(loader.index) == len(both)
    seen = [i for b in _take(loader, loader.batches_per_epoch) for i in b.sample_ids]
    # File order: all of the first directory, then the second (the same ids: both hold the same records).
    assert (
        seen
        == [r["id"] for d in (raw, resized) for p in list_shards(d) for r in read_shard(p).to_pylist()][
            : len(seen)
        ]
    )
    assert len(seen) == len(both) // 4 * 4

    # The fit check reads each directory's own manifest and counts over all of them.
    longest = int(one.lengths.max())
    with pytest.raises(DataError, match=r"samples in \[.*raw, .*resized\] no longer fit") as err:
        _loader(world, path=paths, micro=1, keep_ratio=1.0, max_length=longest)
    single = _loader(world, micro=1, keep_ratio=1.0, max_length=longest, allow_too_long=True)[0].too_long
    assert int(str(err.value).split(" of ")[0]) == 2 * single > 0

    bare = tmp_path / "bare"
    options = PrepareOptions(
        image_root=world["synth"].image_root, out_dir=bare, tokenizer_dir=world["tok"], num_codes=NUM_CODES,
        num_patches=GRID * GRID, shard_size=64, num_workers=0, progress=False,
    )  # fmt: skip
    prepare([world["synth"].captions_json], options)
    with pytest.raises(DataError, match="several data.path directories need the same columns"):
        ShardIndex([raw, bare])


def test_data_path_is_a_directory_or_a_list_of_them(tmp_path):
    from maven_dist.config import ConfigError, load_config

    assert load_config(None, ["data.path=a/shards"]).data.paths == ["a/shards"]
    cfg = load_config(None, ["data.path=[a/coco, b/vg]"])
    assert cfg.data.path == ["a/coco", "b/vg"] and cfg.data.paths == ["a/coco", "b/vg"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  path: [x/stage1_coco, x/stage1_vg]\n")
    assert load_config(recipe).data.paths == ["x/stage1_coco", "x/stage1_vg"]
    for bad, match in (
        ("[]", "non-empty list"),
        ("[a, a]", "lists a directory twice"),
        ("[a, 3]", r"data.path\[1\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"data.path={bad}"])
