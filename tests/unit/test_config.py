"""Config: merge order, YAML inheritance, and one failing config per validation rule."""

from __future__ import annotations

import pytest

from maven_dist.config import ConfigError, load_config, save_config

TINY = "recipes/tiny/stage4.yaml"


def test_merge_order_defaults_recipe_overrides():
    cfg = load_config(TINY, ["stage.max_steps=3", "run_dir=/tmp/somewhere", "stage.optimizer.lr=5e-4"])
    assert cfg.stage.max_steps == 3 and cfg.run_dir == "/tmp/somewhere"
    assert cfg.stage.optimizer.lr == 5e-4  # `5e-4` is a string to PyYAML; the float field coerces it
    assert cfg.model.llm.hidden_size == 128  # from recipes/tiny/common.yaml (inherited)
    assert cfg.stage.optimizer.eps == 1e-8  # dataclass default


def test_every_recipe_loads_and_validates():
    for family in ("tiny", "maven-7b", "maven-13b"):
        for stage in range(1, 5):
            cfg = load_config(f"recipes/{family}/stage{stage}.yaml")
            assert cfg.stage.name == f"stage{stage}"


def test_paper_settings_in_the_7b_and_13b_recipes():
    for family, width in (("maven-7b", 4096), ("maven-13b", 5120)):
        s3 = load_config(f"recipes/{family}/stage3.yaml")
        s4 = load_config(f"recipes/{family}/stage4.yaml")
        assert s4.model.llm.hidden_size == width
        assert (s3.stage.optimizer.lr, s3.stage.global_batch_size) == (1e-3, 256)
        assert (s4.stage.optimizer.lr, s4.stage.global_batch_size, s4.stage.epochs) == (2e-5, 256, 1.0)
        assert s4.stage.schedule.kind == "cosine" and s4.stage.schedule.warmup_ratio == 0.03
        assert s4.stage.optimizer.weight_decay == 0.0 and s4.data.max_length == 2048
        assert s4.stage.dtype == "bf16" and s4.stage.gradient_checkpointing
        assert s4.model.vision.select_layer == -2 and s4.model.vision.image_size == 336
        assert (s4.model.discrete.codebook_size, s4.model.discrete.num_codes) == (8192, 32)
        assert s4.model.selector.keep_ratio == 0.25


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["stage.max_steps=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and again.fingerprint() == cfg.fingerprint()


def test_fingerprint_ignores_where_and_how_often_but_not_what():
    base = load_config(TINY)
    assert (
        load_config(
            TINY,
            ["run_dir=/elsewhere", "checkpoint.every_steps=3", "stage.eval_every=3", "eval.enabled=false"],
        ).fingerprint()
        == base.fingerprint()
    )
    assert load_config(TINY, ["stage.optimizer.lr=0.5"]).fingerprint() != base.fingerprint()
    # the held-out fraction decides which samples train
    assert load_config(TINY, ["data.val_fraction=0.3"]).fingerprint() != base.fingerprint()


BAD = [
    (["nope=1"], "unknown key 'nope'"),
    (["stage.bogus=1"], "unknown key 'stage.bogus'"),
    (["stage.max_steps=ten"], "stage.max_steps='ten' must be an integer"),
    (["stage.optimizer.lr=fast"], "must be a number"),
    (["stage.gradient_checkpointing=maybe"], "must be true or false"),
    (["parallel.backend=fsdp"], "choose one of ['zero3', '3d']"),
    (["stage.trainable=[llm, brain]"], "stage.trainable[1]='brain' is not allowed"),
    (["stage.views=discrete"], "must be a list"),
    (["model=3"], "model must be a mapping"),
    (["stage.max_steps"], "not of the form key.path=value"),
    (["model.llm.num_kv_heads=3"], "not a multiple of model.llm.num_kv_heads"),
    (["model.llm.num_heads=3", "model.llm.num_kv_heads=3"], "not divisible by model.llm.num_heads"),
    (["model.vision.patch_size=15"], "not a multiple of model.vision.patch_size"),
    (["model.vision.select_layer=0"], "model.vision.select_layer=0"),
    (["model.discrete.num_codes=0"], "model.discrete.num_codes=0 must be >= 1"),
    (["model.selector.keep_ratio=0"], "keep_ratio=0.0 must be in (0, 1]"),
    (["model.selector.keep_ratio=1.5"], "keep_ratio=1.5 must be in (0, 1]"),
    (["model.vocab.pad_to_multiple_of=100"], "positive multiple of 128"),
    (["data.max_length=8"], "data.max_length=8 must be >= 16"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.t2i_fraction=2"], "data.t2i_fraction=2.0"),
    (["stage.optimizer.lr=0"], "stage.optimizer.lr=0.0 must be > 0"),
    (["stage.optimizer.betas=[0.9]"], "stage.optimizer.betas"),
    (["stage.optimizer.part_lr={brain: 1.0}"], "unknown part 'brain'"),
    (["stage.optimizer.part_lr={projector: -1}"], "part_lr.projector=-1.0 must be > 0"),
    (["stage.schedule.warmup_ratio=1"], "warmup_ratio=1.0 must be in [0, 1)"),
    (["stage.schedule.min_lr_ratio=2"], "min_lr_ratio=2.0"),
    (["stage.trainable=[]"], "stage.trainable is empty"),
    (["stage.views=[]"], "stage.views is empty"),
    (["stage.trainable=[vision_tower]"], "keeps the CLIP tower frozen"),
    (["stage.loss=selector_bce"], "set stage.trainable=[selector]"),
    (["stage.trainable=[selector, llm]", "stage.loss=lm"], "use stage.loss=selector_bce"),
    # the loss, stage.views and data.format must agree (issue 12): one case per rule
    (["stage.loss=selector_bce", "stage.trainable=[selector]"], "the selector loss trains on patch labels"),
    (["data.format=patch_labels"], "the selector loss trains on patch labels"),
    (
        [
            "stage.loss=selector_bce",
            "stage.trainable=[selector]",
            "data.format=patch_labels",
            "stage.views=[continuous]",
        ],
        "scores the continuous view's patches against the discrete view's h_eos",
    ),
    (["data.format=discrete_alignment"], "feeds images as their codes only; set stage.views=[discrete]"),
    (["model.vocab.embed_init=zeros"], "choose one of ['text_distribution', 'mean']"),
    (["stage.micro_batch_size=0"], "micro_batch_size=0 must be >= 1"),
    (["stage.global_batch_size=10", "stage.micro_batch_size=4"], "not a multiple of"),
    (["stage.max_steps=0", "stage.epochs=0"], "set max_steps > 0 or epochs > 0"),
    (["stage.max_steps=-1"], "stage.max_steps=-1"),
    (["stage.log_every=0"], "stage.log_every=0"),
    (["parallel.tp=0"], "parallel.tp=0 must be >= 1"),
    (["parallel.tp=2"], "ZeRO-3 is pure data parallel"),
    (["parallel.backend=3d", "parallel.tp=4"], "multiple of 128*parallel.tp=512"),
    (["checkpoint.every_steps=0"], "checkpoint.every_steps=0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last=0"),
    (["tracking.flush_interval_s=0"], "tracking.flush_interval_s=0.0 must be > 0"),
    (["tracking.system_metrics_interval_s=-1"], "tracking.system_metrics_interval_s=-1.0 must be >= 0"),
    (["tracking.experiment=' '"], "tracking.experiment is empty"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0 must be in [0, 1)"),
    (["data.val_fraction=0.1", "data.val_path=val"], "choose one validation set"),
    (["stage.eval_every=-1"], "stage.eval_every=-1 must be >= 0"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be >= 1"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_key_value_and_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    cyc = tmp_path / "a.yaml"
    cyc.write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)
