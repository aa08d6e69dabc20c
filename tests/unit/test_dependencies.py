"""The installed environment is consistent: `pip check` reports nothing but the requirements of lmms-eval
that are left out on purpose (installed with --no-deps: docs/evaluation.md, section lmms-eval)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LEFT_OUT = re.compile(r"^lmms-eval \S+ requires [\w.-]+, which is not installed\.$")


def test_pip_check_is_clean_apart_from_lmms_evals_left_out_requirements():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    lines = [
        line for line in out.stdout.splitlines() if line.strip() and line != "No broken requirements found."
    ]
    unexpected = [line for line in lines if not LEFT_OUT.match(line)]
    assert not unexpected, "\n".join(unexpected)


def test_every_constraint_is_an_exact_pin_and_torch_is_left_to_make_setup():
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and line[0] != "#"]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+!-]+", p) for p in pins), pins
    assert not [p for p in pins if p.lower().startswith(("torch==", "maven-dist==", "maven_dist=="))]
