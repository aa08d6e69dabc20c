"""`maven prepare-demo` interrupted while it pretrains a base model: the rerun must pretrain it again, not
take the random model the pretraining starts from for a finished one."""

from __future__ import annotations

import pytest

import maven_dist.offline.pretrain_llm as pretrain_llm_module
from maven_dist.config import load_config
from maven_dist.offline.base_models import build_random_llm
from maven_dist.offline.demo import prepare_demo

WORLD = [
    "demo.num_images=16",
    "demo.heldout_images=8",
    "demo.heldout_per_kind=2",
    "demo.benchmark_questions=4",
]


class Interrupted(Exception):
    pass


def test_an_interrupted_llm_pretraining_leaves_no_model_behind(tmp_path, monkeypatch):
    def killed_midway(cfg, tokenizer, samples, out_dir, seed, **kwargs):
        build_random_llm(cfg, tokenizer, out_dir, seed)  # where the real pretraining starts from
        raise Interrupted

    monkeypatch.setattr(pretrain_llm_module, "pretrain_llm", killed_midway)
    cfg = load_config(
        "tests/recipes/tiny/stage4.yaml", [f"run_dir={tmp_path}", "model.llm.init=synthetic", *WORLD]
    )
    with pytest.raises(Interrupted):
        prepare_demo(cfg)
    llm_dir = cfg.resolve_path(cfg.model.llm.path)
    assert not (llm_dir / "config.json").exists(), "a rerun would skip the pretraining of a random LLM"
    assert not list(llm_dir.parent.glob(f".{llm_dir.name}.tmp-*"))
