"""Project-wide fixtures: tiny random base models saved to disk and loaded back like real ones."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as maven_dist sets it; tests import mlflow first


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
LONGEST_FIRST = ("integration/test_slurm.py", "integration/", "distributed/")
"""Where the suite's longest files are, longest first (test_slurm.py runs ~10 minutes in one worker)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first: tests/run_all.sh hands two pytest-xdist workers whole files in this order
    (--no-loadscope-reorder), so a long file never starts last while the other worker idles."""

    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next(
            (i for i, part in enumerate(LONGEST_FIRST) if f"/tests/{part}" in path), len(LONGEST_FIRST)
        )

    items.sort(key=rank)  # stable: the order within a group stays pytest's


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """A test that trains in-process installs the trainer's preemption handlers; the next test in that
    process (a pytest-xdist worker runs many) gets the default ones back, as a fresh process would."""
    saved = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@dataclass(frozen=True)
class TinyBase:
    llm_dir: Path
    tower_dir: Path


TEXTS = [
    "a red circle and a blue square on a striped background",
    "which image has more green triangles ?",
    "two yellow squares above a purple circle",
    "USER: what colour is the circle ? ASSISTANT: the circle is red .",
] * 20


def build_tiny_base(root: Path, image_size: int = 56, vocab_size: int = 320) -> TinyBase:
    from maven_dist.config import LLMConfig, VisionConfig
    from maven_dist.offline.base_models import build_random_llm, build_random_vision_tower
    from maven_dist.offline.tokenizer_training import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, root / "llm", vocab_size=vocab_size)
    llm = LLMConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
    )
    vision = VisionConfig(
        image_size=image_size, patch_size=14, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    build_random_llm(llm, tokenizer, root / "llm", seed=0)
    build_random_vision_tower(vision, root / "tower", seed=0)
    return TinyBase(root / "llm", root / "tower")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> TinyBase:
    """A tokenizer, a 2-layer LLaMA and a 2-layer CLIP tower (56 px, 4x4 patches) on disk."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@dataclass(frozen=True)
class TinyAssets:
    """The demo assets (synthetic shards with labels and codes, tokenizer, base models), built once."""

    root: Path

    def link_into(self, run_dir: Path) -> Path:
        """Link the assets into ``run_dir`` as its own ``base/`` and ``data/`` (a tiny recipe's demo step then
        finds them built, with the settings they were built from); returns ``run_dir``."""
        run_dir.mkdir(parents=True, exist_ok=True)
        for part in ("base", "data"):
            (run_dir / part).symlink_to(self.root / part, target_is_directory=True)
        return run_dir

    def overrides(self, run_dir: Path, data: str = "captions") -> list[str]:
        """--set overrides that point a tiny recipe at these assets instead of rebuilding them."""
        return [
            f"run_dir={run_dir}",
            "demo.enabled=false",
            f"model.llm.path={self.root}/base/llm",
            f"model.vision.path={self.root}/base/vision_tower",
            f"model.discrete.path={self.root}/base/kmeans_tokenizer",
            f"data.path={self.root}/data/{data}",
        ]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    from maven_dist.config import load_config
    from maven_dist.offline.demo import prepare_demo

    root = tmp_path_factory.mktemp("tiny_assets")
    prepare_demo(load_config("tests/recipes/tiny/stage1.yaml", [f"run_dir={root}"]))
    return TinyAssets(root)
