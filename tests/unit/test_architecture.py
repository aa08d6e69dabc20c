"""The architecture stays as docs/architecture.md draws it: layers import one way, MaVEn is written once,
the trainer has one step path and a two-method checkpoint interface."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "maven_dist"

EXPECTED_LAYERS = [
    "maven_dist.cli",
    "maven_dist.sweep",
    "maven_dist.pipeline | maven_dist.launch",
    "maven_dist.eval",
    "maven_dist.inference",
    "maven_dist.train | maven_dist.offline | maven_dist.merge",
    "maven_dist.parallel",
    "maven_dist.data | maven_dist.model",
    "maven_dist.contract | maven_dist.config",
]


def test_import_contracts_are_declared_and_kept():
    """The layers contract is in pyproject.toml as written (removing or loosening it fails here), and
    import-linter finds no import that breaks it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    assert contract["layers"] == EXPECTED_LAYERS
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is not installed (it is in the dev extra)"
    result = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_maven_front_end_is_written_once():
    for name in ("embed_tokens", "discrete_ids", "visual_embeds", "eos_input_ids", "sequence_inputs"):
        hits = [
            str(path.relative_to(REPO))
            for path in PACKAGE.rglob("*.py")
            if re.search(rf"^\s*def {name}\(", path.read_text(), re.MULTILINE)
        ]
        assert hits == ["maven_dist/model/frontend.py"], (name, hits)


def test_the_trainer_has_one_step_path_and_two_checkpoint_calls():
    tree = ast.parse((PACKAGE / "train" / "trainer.py").read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    attributes = {(c.func.value.id, c.func.attr) for c in calls if _is_method_call(c)}
    assert {attr for owner, attr in attributes if owner == "checkpoints"} == {"load_latest", "maybe_save"}
    assert {attr for owner, attr in attributes if owner == "engine"} <= {
        "train_step",
        "evaluate",
        "export_state_dict",
        "artifacts",
        "prepare_h_eos",  # the engine contract's h_eos step before training (issue 23)
    }
    probes = [c for c in calls if isinstance(c.func, ast.Name) and c.func.id in ("hasattr", "getattr")]
    assert not probes, "engine kinds are not told apart by attribute probing"


def _is_method_call(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)


def test_megatron_core_is_imported_by_the_3d_backend_only():
    """ZeRO-3 training, inference and evaluation run without megatron-core being imported (its import warns
    about Transformer Engine and Apex, and pulls CUDA-only paths in)."""
    probe = (
        "import sys, maven_dist.train.trainer, maven_dist.parallel.zero3, maven_dist.inference, maven_dist.eval.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('megatron')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_importing_the_package_changes_nothing_in_the_process():
    """Warning filters, the exit-time heap freeze and the Auto-class registration are the entry points' and
    maven_dist.model's to do (maven_dist/entry_point.py), not an import side effect."""
    script = (
        "import atexit, os, sys, warnings\n"
        "before = (list(sys.meta_path), list(warnings.filters), dict(os.environ), atexit._ncallbacks())\n"
        "import maven_dist\n"
        "after = (list(sys.meta_path), list(warnings.filters), dict(os.environ), atexit._ncallbacks())\n"
        "print([name for name, a, b in zip(('meta_path', 'filters', 'environ', 'atexit'), before, after) if a != b])"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
