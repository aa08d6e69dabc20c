"""MaVEn through lmms-eval's own evaluator: two local YAML tasks (generation with exact match, and multiple
choice scored by log-likelihood) over a 4-row JSON file and the demo's images, run by ``simple_evaluate``
with the model as an instance, by its registered name and by the ``lmms-eval`` command; each score must equal
what the same MavenGenerator predictions give when scored by hand.

Skipped where lmms-eval is not installed (``make eval-setup``; docs/evaluation.md, section "lmms-eval")."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed: `make eval-setup` (docs/evaluation.md, section lmms-eval)",
)

from PIL import Image  # noqa: E402

from tests.unit.test_inference import export_like  # noqa: E402

CHOICES = ["red", "blue", "green"]
POST_PROMPT = " answer in one word ."
UNTIL = ["\n", "e"]  # "e" is frequent enough in the random model's text to cut answers short
MAX_NEW_TOKENS = 6
GEN_TASK, MC_TASK = "maven_local_gen", "maven_local_mc"

UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(p).convert("RGB") for p in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("pre_prompt", "") + doc["question"] + kw.get("post_prompt", "")


def process_results(doc, results):
    return {"em": float(results[0] == doc["answer"])}
"""

GEN_YAML = f"""
task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
  cache_dir: {{cache}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  until: {json.dumps(UNTIL)}
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: em
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{POST_PROMPT}"
"""

MC_YAML = f"""
task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
  cache_dir: {{cache}}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: {json.dumps(CHOICES)}
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{POST_PROMPT}"
"""


@dataclass
class LocalTasks:
    model_dir: Path
    include_path: Path
    predictions: list[str]
    """Each row's answer from MavenGenerator, cut at the first `until` string: lmms-eval must see these."""
    em: float
    acc: float
    acc_norm: float


@pytest.fixture(scope="module", autouse=True)
def offline_hf(tmp_path_factory):
    """No hub, no ~/.cache: lmms-eval and datasets read these when they load a task."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        yield home


@pytest.fixture(scope="module")
def local_tasks(tiny_assets, tmp_path_factory) -> LocalTasks:
    """Rows whose gold answers are set from the generator's own predictions (three right, one wrong), so
    the expected scores are known and differ from what a wrong prompt, image order or sign would give."""
    from maven_dist.inference import MavenGenerator

    root = tmp_path_factory.mktemp("lmms_eval")
    _, model_dir = export_like(tiny_assets, root / "export")
    images = sorted((tiny_assets.root / "data" / "synthetic" / "images").glob("*.png"))[:5]
    rows = [  # no placeholder (images go first, as lmms-eval's llava writes it), two images, a placeholder
        {"id": 0, "images": [str(images[0])], "question": "what colour is the circle ?"},
        {"id": 1, "images": [str(images[1]), str(images[2])], "question": "which image has more circles ?"},
        {"id": 2, "images": [str(images[3])], "question": "what is it ? <image>"},
        {"id": 3, "images": [str(images[4])], "question": "is it red ?"},
    ]
    generator = MavenGenerator.from_pretrained(model_dir, device="cpu")
    predictions, best, best_norm = [], [], []
    for row in rows:  # one prompt at a time, written out by hand
        pictures = [Image.open(p).convert("RGB") for p in row["images"]]
        question = row["question"] + POST_PROMPT
        prompt = (
            question if "<image>" in question else " ".join(["<image>"] * len(pictures)) + "\n" + question
        )
        (out,) = generator.generate([prompt], images=[pictures], max_new_tokens=MAX_NEW_TOKENS, stop=UNTIL)
        predictions.append(re.split("|".join(map(re.escape, UNTIL)), out.text)[0])
        scores = generator.loglikelihood([prompt] * len(CHOICES), CHOICES, images=[pictures] * len(CHOICES))
        logprobs = [lp for lp, _ in scores]
        best.append(max(range(len(CHOICES)), key=lambda k: logprobs[k]))
        best_norm.append(max(range(len(CHOICES)), key=lambda k: logprobs[k] / len(CHOICES[k])))
    for k, row in enumerate(rows):
        row["answer"] = predictions[k] if k < 3 else predictions[k] + " (not what the model says)"
        row["label"] = best[k] if k < 3 else (best[k] + 1) % len(CHOICES)
    em = sum(p == r["answer"] for p, r in zip(predictions, rows, strict=True)) / len(rows)
    acc = sum(b == r["label"] for b, r in zip(best, rows, strict=True)) / len(rows)
    acc_norm = sum(b == r["label"] for b, r in zip(best_norm, rows, strict=True)) / len(rows)
    assert em == 0.75 and acc == 0.75, "the rows are built so that three of four are right"

    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "rows.json"
    data.write_text(json.dumps(rows))
    (tasks / "utils.py").write_text(UTILS)
    for name, text in ((GEN_TASK, GEN_YAML), (MC_TASK, MC_YAML)):
        (tasks / f"{name}.yaml").write_text(text.format(data=data, cache=root / "datasets_cache"))
    return LocalTasks(model_dir, tasks, predictions, em, acc, acc_norm)


def _evaluate(model, tasks, local: LocalTasks, **kwargs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(local.include_path), include_defaults=False)
    return simple_evaluate(
        model=model, tasks=tasks, task_manager=manager, bootstrap_iters=0, log_samples=True, **kwargs
    )


@pytest.fixture(scope="module")
def model(local_tasks):
    from maven_dist.eval.lmms_adapter import MavenLmms

    return MavenLmms(pretrained=str(local_tasks.model_dir), device="cpu", batch_size=3)


def test_scores_through_simple_evaluate_equal_the_generators_scored_by_hand(model, local_tasks):
    results = _evaluate(model, [GEN_TASK, MC_TASK], local_tasks)
    answers = [
        s["filtered_resps"][0] for s in sorted(results["samples"][GEN_TASK], key=lambda s: s["doc_id"])
    ]
    assert answers == local_tasks.predictions
    assert results["results"][GEN_TASK]["em,none"] == local_tasks.em
    assert results["results"][MC_TASK]["acc,none"] == local_tasks.acc
    assert results["results"][MC_TASK]["acc_norm,none"] == local_tasks.acc_norm


def test_images_go_first_as_lmms_evals_llava_writes_them(model):
    """No placeholder: one ``<image>`` per image in front, space-separated, then a newline; a placeholder in
    the context stays where it is."""
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    docs = [{"images": [red, blue]}, {"images": [red]}, {"images": []}]
    model.task_dict = {"t": {"test": docs}}
    args = [
        (ctx, {}, lambda doc: doc["images"], k, "t", "test")
        for k, ctx in enumerate(["a ?", "b <image> ?", "c ?"])
    ]
    prompts, images = model._prompts(args)
    assert prompts == ["<image> <image>\na ?", "b <image> ?", "c ?"]
    assert images == [[red, blue], [red], []]


@pytest.mark.parametrize("control", ["blank", "swap", "none"])
def test_the_control_option_takes_the_images_away_as_maven_eval_does(model, control):
    from maven_dist.eval.controls import blank_image

    red, blue, green = (Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green"))
    docs = [{"images": [red, blue]}, {"images": [red]}, {"images": [green]}]
    model.task_dict = {"t": {"test": docs}}
    args = [
        (ctx, {}, lambda doc: doc["images"], k, "t", "test")
        for k, ctx in enumerate(["a ?", "b ?", "<image>\nc ?"])
    ]
    model.control = control
    try:
        prompts, images = model._prompts(args)
    finally:
        model.control = ""
    if control == "blank":
        assert [len(i) for i in images] == [2, 1, 1]
        assert all(p.tobytes() == blank_image().tobytes() for i in images for p in i)
        assert prompts == ["<image> <image>\na ?", "<image>\nb ?", "<image>\nc ?"]
    elif control == "swap":  # the next document with as many images; a two-image document has no other
        assert images == [[red, blue], [green], [red]]
    else:
        assert images == [[], [], []] and prompts == ["a ?", "b ?", "c ?"]


def test_the_registered_name_is_the_same_model(local_tasks):
    from lmms_eval.models import MODEL_REGISTRY_V2

    if "maven" not in MODEL_REGISTRY_V2.list_model_names():
        pytest.skip(
            "the lmms_eval.models entry point is not installed: reinstall the package (make eval-setup)"
        )
    results = _evaluate("maven", [GEN_TASK], local_tasks, model_args=f"pretrained={local_tasks.model_dir}")
    assert results["results"][GEN_TASK]["em,none"] == local_tasks.em


@pytest.mark.slow
def test_the_lmms_eval_command_runs_the_model_by_name(local_tasks, tmp_path):
    command = shutil.which("lmms-eval", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("the lmms-eval command is not installed next to this Python")
    from lmms_eval.models import MODEL_REGISTRY_V2

    if "maven" not in MODEL_REGISTRY_V2.list_model_names():
        pytest.skip(
            "the lmms_eval.models entry point is not installed: reinstall the package (make eval-setup)"
        )
    out = tmp_path / "out"
    args = [command, "--model", "maven", "--model_args", f"pretrained={local_tasks.model_dir},device=cpu"]
    args += ["--tasks", GEN_TASK, "--include_path", str(local_tasks.include_path), "--output_path", str(out)]
    args += ["--batch_size", "2"]
    # The command logs an exception and still exits 0 unless verbosity is DEBUG: the results file decides.
    run = subprocess.run(
        args, capture_output=True, text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    found = sorted(out.rglob("*_results.json"))
    assert run.returncode == 0 and found, run.stdout[-3000:] + run.stderr[-3000:]
    score = json.loads(found[-1].read_text())["results"][GEN_TASK]["em,none"]
    assert math.isclose(score, local_tasks.em)


def test_generation_kwargs_map_to_generator_options():
    from maven_dist.eval.lmms_adapter import generation_options

    assert generation_options({}, 64) == {
        "max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "num_beams": 1, "stop": None,
    }  # fmt: skip
    opts = generation_options({"until": "\n\n", "max_new_tokens": 8, "temperature": 0.7, "top_p": None}, 64)
    assert opts == {"max_new_tokens": 8, "temperature": 0.7, "top_p": 1.0, "num_beams": 1, "stop": ["\n\n"]}
    assert generation_options({"do_sample": False, "temperature": 0.7}, 64)["temperature"] == 0.0
    assert generation_options({"do_sample": True}, 64)["temperature"] == 1.0
    assert generation_options({"do_sample": True, "temperature": 0.2, "top_p": 0.9}, 64)["top_p"] == 0.9
    assert generation_options({"max_gen_toks": 5, "num_beams": 3, "until": ["", "</s>"]}, 64) == {
        "max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "num_beams": 3, "stop": ["</s>"],
    }  # fmt: skip
