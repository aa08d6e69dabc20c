"""What a stage reads, checked before anything is queued: model directories and their files, shard
directories and the columns the stage needs, the shards' tokenizer against the LLM's, the tracking URI.

Each problem names the recipe key, the path and the command that makes it. A demo recipe (the tiny one)
is skipped: its inputs are built by ``maven prepare-demo`` at the start of the job. A stage that starts
from another stage's export (``stage.init_from: stage3``) has no base models to check, and its export
may not exist yet (the chain makes it); an explicit ``init_from`` path must be a MaVEn directory.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlparse

from maven_dist.config import STAGE_NAMES, Config
from maven_dist.data.formats import DataError
from maven_dist.data.loader import stage_sample_format
from maven_dist.data.prepare import tokenizer_hash
from maven_dist.data.shards import list_shards, read_shard_schema

DOCS = "docs/data_preparation.md"
TRACKING_SCHEMES = {"sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks"}


def input_problems(cfg: Config) -> list[str]:
    """Every problem with the stage's inputs (empty: all there)."""
    if cfg.demo.enabled:
        return []
    problems = _model_problems(cfg)
    for path in cfg.data.paths:
        problems += _shard_problems(cfg, "data.path", cfg.resolve_path(path))
    if cfg.data.val_path:
        problems += _shard_problems(cfg, "data.val_path", cfg.resolve_path(cfg.data.val_path))
    problems += _tracking_problems(cfg)
    return problems


def _model_problems(cfg: Config) -> list[str]:
    init = cfg.stage.init_from
    if init in STAGE_NAMES:
        return []
    if init:
        if not (Path(init) / "config.json").is_file():
            return [
                f"stage.init_from={init} is not a MaVEn directory (no config.json): a stage export or a `maven merge` output"
            ]
        return []
    problems = []
    needs = {
        "model.llm.path": ("config.json", "tokenizer_config.json"),
        "model.vision.path": ("config.json", "preprocessor_config.json"),
    }
    for key, files in needs.items():
        path = cfg.resolve_path(cfg.model.llm.path if key == "model.llm.path" else cfg.model.vision.path)
        missing = [f for f in files if not (path / f).is_file()]
        if not path.is_dir():
            problems.append(f"{key}={path} does not exist: place the model there ({DOCS}, the model table)")
        elif missing:
            problems.append(
                f"{key}={path} lacks {missing}: a HF model directory saved with save_pretrained ({DOCS})"
            )
    return problems


def _shard_problems(cfg: Config, key: str, path: Path) -> list[str]:
    prepare = f"`maven prepare SOURCE.json --image-root IMAGES --tokenizer LLM_DIR --out {path}` ({DOCS})"
    if not path.is_dir() or not list_shards(path):
        return [f"{key}={path} holds no shards (shard-*.arrow): make them with {prepare}"]
    problems = []
    columns = read_shard_schema(list_shards(path)[0]).names
    try:
        stage_sample_format(cfg, cfg.model.vision.image_size).check_columns(columns, f"{key}={path}")
    except DataError as exc:
        problems.append(str(exc))
    manifest = path / "manifest.json"
    tokenizer_dir = cfg.resolve_path(cfg.model.tokenizer_path or cfg.model.llm.path)
    if manifest.is_file() and not cfg.stage.init_from and (tokenizer_dir / "tokenizer_config.json").is_file():
        prepared = json.loads(manifest.read_text()).get("options", {}).get("tokenizer")
        if prepared and prepared != tokenizer_hash(tokenizer_dir):
            problems.append(
                f"{key}={path} was tokenised with another tokenizer than {tokenizer_dir} (hash {prepared}): re-run "
                f"{prepare} with --tokenizer {tokenizer_dir}"
            )
    return problems


def _tracking_problems(cfg: Config) -> list[str]:
    from maven_dist.train.tracking import resolve_tracking_uri

    if not cfg.tracking.enabled:
        return []
    uri = resolve_tracking_uri(cfg)
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        return [
            f"tracking.uri={uri}: unknown scheme {parsed.scheme!r} (sqlite:///PATH, http://HOST:PORT, ...)"
        ]
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            return [f"tracking.uri={uri}: {folder} cannot be created"]
    if scheme in ("http", "https") and not _reachable(parsed.hostname or "", parsed.port or 80):
        print(
            f"[launch] warning: tracking server {uri} does not answer now; jobs keep their metrics in "
            "their run directories and send them when it is back (start it: slurm/mlflow_server.sh)",
            flush=True,
        )
    return []


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False
