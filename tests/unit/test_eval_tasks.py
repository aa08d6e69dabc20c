"""Benchmark readers against tiny hand-written benchmarks in the official layouts, and the synthetic set.

Each reader test writes a few records the way the official release lays them out, checks the
Questions it yields, and scores hand-made predictions whose metric is worked out in the comments.
The synthetic set is scored with an oracle (the maximum) and with a constant prediction (what the
reference distribution implies, computed here independently of the scorers).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from maven_dist.contract.prompts import CHOICE_LETTER, SHORT_ANSWER
from maven_dist.eval.tasks.base import BenchmarkError, Prediction, Question
from maven_dist.eval.tasks.mme import MmeTask
from maven_dist.eval.tasks.multi_image import MultiImageTask
from maven_dist.eval.tasks.multiple_choice import MMBenchTask, SeedBenchTask
from maven_dist.eval.tasks.registry import TASK_FORMATS, find_tasks, load_task
from maven_dist.eval.tasks.vqa import VqaTask
from maven_dist.offline.synthetic_benchmarks import write_synthetic_benchmarks

# ----------------------------------------------------------------------------------------- helpers


def _png(path: Path, size: tuple[int, int] = (4, 4), colour: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_b64(size: tuple[int, int] = (4, 4)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "blue").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _preds(
    answers: dict[str, str], scores: dict[str, tuple[float, ...]] | None = None
) -> dict[str, Prediction]:
    scores = scores or {}
    ids = set(answers) | set(scores)
    return {i: Prediction(i, answers.get(i, ""), scores.get(i, ())) for i in ids}


def _raises(*parts: str) -> pytest.RaisesExc:
    """BenchmarkError whose message holds every part (file names, record ids), in that order."""
    return pytest.raises(BenchmarkError, match=".*".join(re.escape(p) for p in parts))


# --------------------------------------------------------------------------------------------- VQA


def _vqa_dir(
    root: Path, questions: list, answers: list, images: tuple[str, ...] = ("a.png", "b.png")
) -> Path:
    for name in images:
        _png(root / "images" / name)
    _jsonl(root / "questions.jsonl", questions)
    _jsonl(root / "answers.jsonl", answers)
    return root


def test_vqav2_reader_and_leave_one_out_accuracy(tmp_path: Path) -> None:
    root = _vqa_dir(
        tmp_path / "vqav2",
        [
            {"question_id": 1, "image": "a.png", "text": "What colour is the car?", "category": "default"},
            {"question_id": 2, "image": "b.png", "text": f"How many cars?\n{SHORT_ANSWER}"},
            {"question_id": "q3", "image": "a.png", "text": "Is it sunny?"},
        ],
        [
            {"question_id": 1, "answers": ["red"] * 3 + ["dark red"] * 7},
            {
                "question_id": 2,
                "answers": [{"answer": "2", "answer_confidence": "yes"}] * 10,
            },  # VQA's own form
            {"question_id": "q3", "answers": ["yes"] + ["no"] * 9},
            {"question_id": 99, "answers": ["x"] * 10},  # not asked: unused
        ],
    )
    task = VqaTask(root, "vqav2")
    questions = task.questions()
    assert [q.id for q in questions] == ["1", "2", "q3"]
    assert questions[0].prompt == f"<image>\nWhat colour is the car?\n{SHORT_ANSWER}"
    assert questions[1].prompt == f"<image>\nHow many cars?\n{SHORT_ANSWER}"  # not appended twice
    assert questions[0].images == ((root / "images" / "a.png").resolve(),)
    assert questions[0].mode == "generate" and questions[1].reference == ("2",) * 10
    assert task.format == "vqa" and task.skipped == []
    # q1 "Red." -> "red": 3 humans -> 0.9; q2 "two" -> "2": 10 humans -> 1.0; q3 "yes": 1 human -> 0.3.
    # accuracy = 100 * (0.9 + 1.0 + 0.3) / 3 = 73.33...
    scores = task.score(_preds({"1": "Red.", "2": "two", "q3": "yes"}))
    assert scores == {"accuracy": pytest.approx(100 * 2.2 / 3)}
    with pytest.raises(ValueError, match="no prediction: q3"):
        task.score(_preds({"1": "red", "2": "2"}))


def test_textvqa_uses_the_m4c_normalisation(tmp_path: Path) -> None:
    root = _vqa_dir(
        tmp_path / "textvqa",
        [{"question_id": 5, "image": "a.png", "text": "What is written?"}],
        [{"question_id": 5, "answers": ["redblue"] * 3 + ["x"] * 7}],
    )
    predictions = _preds({"5": "red,blue"})
    # m4c deletes the comma: "redblue", 3 humans -> 0.9; VQA v2 blanks it: "red blue", 0 humans -> 0.
    assert VqaTask(root, "textvqa").score(predictions) == {"accuracy": pytest.approx(90.0)}
    assert VqaTask(root, "vqav2", name="textvqa_as_vqav2").score(predictions) == {"accuracy": 0.0}


def test_gqa_exact_match(tmp_path: Path) -> None:
    root = _vqa_dir(
        tmp_path / "gqa",
        [
            {"question_id": "201", "image": "a.png", "text": f"Is it overcast?\n{SHORT_ANSWER}"},
            {"question_id": "202", "image": "b.png", "text": "What is on the table?"},
        ],
        [{"question_id": "201", "answer": "yes"}, {"question_id": "202", "answer": "laptop"}],
    )
    task = VqaTask(root, "gqa")
    assert [q.reference for q in task.questions()] == ["yes", "laptop"]
    # "Yes." -> "yes" matches; "a laptop" keeps its article in GQA: no match. 100 * 1 / 2 = 50.
    assert task.score(_preds({"201": "Yes.", "202": "a laptop"})) == {"accuracy": 50.0}


QUESTION = {"question_id": 7, "image": "a.png", "text": "Q?"}
ANSWER = {"question_id": 7, "answers": ["a"] * 10}


@pytest.mark.parametrize(
    ("questions", "answers", "parts"),
    [
        (
            [{**QUESTION, "image": "missing.png"}],
            [ANSWER],
            ("questions.jsonl", "record 7", "missing.png", "not found"),
        ),
        ([QUESTION, QUESTION], [ANSWER], ("questions.jsonl:2", "7", "twice")),
        ([QUESTION], [ANSWER, ANSWER], ("answers.jsonl:2", "7", "twice")),
        ([QUESTION], [{"question_id": 8, "answers": ["a"] * 10}], ("questions.jsonl:1", "7", "no answer")),
        ([QUESTION], [{"question_id": 7, "answers": ["a"] * 9}], ("answers.jsonl:1", "7", "9 human answers")),
        ([QUESTION, "{not json"], [ANSWER], ("questions.jsonl:2", "not valid JSON")),
        (
            [{**QUESTION, "image": "../../outside.png"}],
            [ANSWER],
            ("questions.jsonl", "record 7", "leads outside"),
        ),
        ([{**QUESTION, "image": "link.png"}], [ANSWER], ("questions.jsonl", "record 7", "leads outside")),
        ([{**QUESTION, "question_id": None}], [ANSWER], ("questions.jsonl:1", "question_id None")),
    ],
)
def test_vqa_bad_input(tmp_path: Path, questions: list, answers: list, parts: tuple[str, ...]) -> None:
    _png(tmp_path / "outside.png")  # exists, so only the escape can be the error
    root = _vqa_dir(tmp_path / "vqav2", questions, answers)
    (root / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    with _raises(*parts):
        VqaTask(root, "vqav2")


def test_vqa_absolute_image_path_and_data_file_symlink(tmp_path: Path) -> None:
    outside = _png(tmp_path / "outside.png")
    root = _vqa_dir(tmp_path / "vqav2", [{**QUESTION, "image": str(outside)}], [ANSWER])
    with _raises("questions.jsonl", "record 7", "absolute"):
        VqaTask(root, "vqav2")
    other = _jsonl(tmp_path / "elsewhere.jsonl", [QUESTION])
    (root / "questions.jsonl").unlink()
    (root / "questions.jsonl").symlink_to(other)
    with _raises("questions.jsonl", "leads outside"):
        VqaTask(root, "vqav2")


# --------------------------------------------------------------------------------------------- MME


def _mme_dir(root: Path) -> Path:
    existence = root / "existence"  # flat: image and .txt side by side
    _png(existence / "a.png")
    (existence / "a.txt").write_text(
        "Is there a dog in the image? Please answer yes or no.\tYes\n"
        "Is there a cat in the image?  Please answer yes or no.\tNo\n\n"  # two spaces, a blank line: both official
    )
    _png(existence / "b.jpg")
    (existence / "b.txt").write_text(
        "Is there a car? Please answer yes or no.\tYes\nIs there a bus? Please answer yes or no.\tNo\n"
    )
    artwork = root / "artwork"  # split: images/ + questions_answers_YN/
    _png(artwork / "images" / "c.png")
    (artwork / "questions_answers_YN").mkdir()
    (artwork / "questions_answers_YN" / "c.txt").write_text(
        "Is this a painting? Please answer yes or no.\tYes\nIs this a statue? Please answer yes or no.\tNo\n"
    )
    (root / "eval_tool").mkdir()
    (root / "eval_tool" / "readme.txt").write_text("not a subtask\n")
    return root


def test_mme_reader_and_scores(tmp_path: Path) -> None:
    task = MmeTask(_mme_dir(tmp_path / "mme"))
    questions = {q.id: q for q in task.questions()}
    assert list(questions) == [
        "existence/a#1",
        "existence/a#2",
        "existence/b#1",
        "existence/b#2",
        "artwork/c#1",
        "artwork/c#2",
    ]
    assert questions["existence/a#2"].prompt == f"<image>\nIs there a cat in the image?\n{SHORT_ANSWER}"
    assert questions["existence/a#2"].reference == "No"
    assert questions["artwork/c#1"].images == ((tmp_path / "mme" / "artwork" / "images" / "c.png").resolve(),)
    assert questions["existence/b#1"].meta == {
        "subtask": "existence",
        "image_id": "b",
        "question": "Is there a car? Please answer yes or no.",
    }
    assert len(task.skipped) == 1 and "eval_tool" in task.skipped[0]
    assert "artwork" not in task.missing_subtasks and len(task.missing_subtasks) == 12
    official = MmeTask(tmp_path / "mme", prompt_style="official")
    assert official.questions()[0].prompt == "<image>\nIs there a dog in the image? Please answer yes or no."

    predictions = _preds(
        {
            "existence/a#1": "Yes",
            "existence/a#2": "No",  # image a: both right
            "existence/b#1": "yes",
            "existence/b#2": "yes",  # image b: one right
            "artwork/c#1": "no",
            "artwork/c#2": "No, it is not",  # image c: one right
        }
    )
    # existence: acc = 3/4, acc+ = 1/2 -> 75 + 50 = 125; artwork: acc = 1/2, acc+ = 0 -> 50.
    # Both are perception subtasks: perception = 175, cognition = 0, total = 175.
    assert task.score(predictions) == {
        "existence": 125.0,
        "artwork": 50.0,
        "perception": 175.0,
        "cognition": 0.0,
        "total": 175.0,
    }


@pytest.mark.parametrize(
    ("case", "parts"),
    [
        ("no_image", ("existence", "a.txt", "existence/a", "no image")),
        ("three_lines", ("a.txt", "existence/a", "3 questions")),
        ("no_tab", ("a.txt:1", "question<TAB>Yes")),
        ("twice", ("a.txt:2", "appears twice")),
        ("image_link_out", ("a.txt", "existence/a", "leads outside")),
        ("txt_link_out", ("a.txt", "leads outside")),
    ],
)
def test_mme_bad_input(tmp_path: Path, case: str, parts: tuple[str, ...]) -> None:
    folder = tmp_path / "mme" / "existence"
    _png(folder / "a.png")
    good = "Is there a dog? Please answer yes or no.\tYes\nIs there a cat? Please answer yes or no.\tNo\n"
    (folder / "a.txt").write_text(good)
    outside = _png(tmp_path / "outside.png")
    if case == "no_image":
        (folder / "a.png").unlink()
    elif case == "three_lines":
        (folder / "a.txt").write_text(good + "Is there a cow? Please answer yes or no.\tNo\n")
    elif case == "no_tab":
        (folder / "a.txt").write_text("Is there a dog? Yes\nIs there a cat?\tNo\n")
    elif case == "twice":
        (folder / "a.txt").write_text("Is there a dog?\tYes\nIs there a dog?\tNo\n")
    elif case == "image_link_out":
        (folder / "a.png").unlink()
        (folder / "a.png").symlink_to(outside)
    else:
        (tmp_path / "elsewhere.txt").write_text(good)
        (folder / "a.txt").unlink()
        (folder / "a.txt").symlink_to(tmp_path / "elsewhere.txt")
    with _raises(*parts):
        MmeTask(tmp_path / "mme")


# ----------------------------------------------------------------------------------------- MMBench

MMBENCH_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "l2-category",
    "image",
]


def _tsv(path: Path, rows: list[list], header: list[str] = MMBENCH_HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _mmbench_rows(image: str) -> list[list]:
    return [
        [
            10,
            "Which colour is the car?",
            "Look closely.",
            "red",
            "green",
            "blue",
            "",
            "B",
            "attr",
            "perception",
            image,
        ],
        # hint "nan" as pandas writes a missing one; the image refers to row 10's.
        [11, "How many cars?", "nan", "1", "2", "3", "4", "D", "count", "perception", "10"],
    ]


def test_mmbench_reader_rotations_and_circular_scores(tmp_path: Path) -> None:
    _tsv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", _mmbench_rows(_png_b64()))
    cache = tmp_path / "cache"
    task = MMBenchTask(tmp_path / "mmbench", cache)
    questions = {q.id: q for q in task.questions()}
    # Row 10 has 3 options -> 3 rotations, row 11 has 4 -> 4; each asked #gen and #ll: 14 questions.
    assert list(questions)[:4] == ["10/0#gen", "10/0#ll", "10/1#gen", "10/1#ll"]
    assert len(questions) == 14
    assert questions["10/0#gen"].prompt == (
        f"<image>\nLook closely.\nWhich colour is the car?\nA. red\nB. green\nC. blue\n{CHOICE_LETTER}"
    )
    ll = questions["10/1#ll"]
    assert (ll.mode, ll.prompt, ll.options, ll.reference) == (
        "choice",
        "<image>\nLook closely.\nWhich colour is the car?",
        ("green", "blue", "red"),  # rotation 1: options shift left, green (was B) is now A
        "A",
    )
    assert questions["11/0#gen"].prompt.startswith("<image>\nHow many cars?\nA. 1\n")  # "nan" hint dropped
    assert [questions[f"11/{k}#gen"].reference for k in range(4)] == ["D", "C", "B", "A"]
    image = questions["10/0#gen"].images[0]
    assert image.parent == cache and questions["11/3#ll"].images == (image,)  # decoded once, shared
    assert Image.open(image).size == (4, 4)

    answers = {
        # Row 10 by generation: B; "The answer is A."; "green" is option C of rotation 2 -> all right.
        "10/0#gen": "B",
        "10/1#gen": "The answer is A.",
        "10/2#gen": "green",
        # Row 11: rotations 0, 1, 3 right, rotation 2 answered A instead of B -> circular miss.
        "11/0#gen": "D",
        "11/1#gen": "C",
        "11/2#gen": "A",
        "11/3#gen": "A",
        # Row 11 by likelihood: letters given; rotation 0 wrong (A, not D).
        "11/0#ll": "A",
        "11/1#ll": "C",
        "11/2#ll": "B",
        "11/3#ll": "A",
    }
    # Row 10 by likelihood: only scores; green scores highest in every rotation -> all right.
    scores = {"10/0#ll": (-3.0, -1.0, -2.0), "10/1#ll": (-1.0, -2.0, -3.0), "10/2#ll": (-2.0, -3.0, -1.0)}
    # gen: circular 1 of 2 rows = 50, vanilla (rotation 0) 2 of 2 = 100;
    # ll: circular 1 of 2 = 50, vanilla: row 10 right, row 11 wrong = 50.
    assert task.score(_preds(answers, scores)) == {
        "circular_gen": 50.0,
        "vanilla_gen": 100.0,
        "circular_ll": 50.0,
        "vanilla_ll": 50.0,
    }


@pytest.mark.parametrize(
    ("case", "parts"),
    [
        ("twice", ("mmbench.tsv:3", "index 10", "twice")),
        ("no_answer", ("mmbench.tsv:2", "index 10", "no answer")),
        ("not_offered", ("mmbench.tsv:2", "index 10", "answer 'D'")),
        ("bad_base64", ("mmbench.tsv:2", "index 10", "not valid base64")),
        ("not_an_image", ("mmbench.tsv:2", "index 10", "cannot be decoded")),
        ("too_many_bytes", ("mmbench.tsv:2", "index 10", "exceeds 100 bytes")),
        ("too_many_pixels", ("mmbench.tsv:2", "index 10", "exceeds 1000")),
        ("gap", ("mmbench.tsv:2", "index 10", "option C given after the empty option B")),
        ("no_answer_column", ("mmbench.tsv:1", "answer", "use dev")),
    ],
)
def test_mmbench_bad_input(tmp_path: Path, case: str, parts: tuple[str, ...]) -> None:
    image = _png_b64()
    row = [10, "Q?", "", "x", "y", "z", "", "B", "c", "l2", image]
    rows, header, caps = [row], MMBENCH_HEADER, {}
    if case == "twice":
        rows = [row, row]
    elif case == "no_answer":
        row[7] = ""
    elif case == "not_offered":
        row[7] = "D"
    elif case == "bad_base64":
        row[10] = "@@@" * 30
    elif case == "not_an_image":
        row[10] = base64.b64encode(b"not an image at all, just bytes" * 3).decode()
    elif case == "too_many_bytes":
        caps = {"max_image_bytes": 100}
        row[10] = _png_b64((64, 64)) + "A" * 200
    elif case == "too_many_pixels":
        caps = {"max_image_pixels": 1000}
        row[10] = _png_b64((100, 100))
    elif case == "gap":
        row[4] = ""
    else:
        header = [h for h in MMBENCH_HEADER if h != "answer"]
        rows = [row[:7] + row[8:]]
    _tsv(tmp_path / "mmbench" / "mmbench.tsv", rows, header)
    with _raises(*parts):
        MMBenchTask(tmp_path / "mmbench", tmp_path / "cache", **caps)


# -------------------------------------------------------------------------------------- SEED-Bench


def _seed_question(qid: str, answer: str, data_type: str = "image", data_id: str = "img1", **extra) -> dict:
    return {
        "question_id": qid,
        "question": f"Question {qid}?",
        "choice_a": "one",
        "choice_b": "two",
        "choice_c": "three",
        "choice_d": "four",
        "answer": answer,
        "data_type": data_type,
        "data_id": data_id,
        "question_type_id": 10 if data_type == "video" else 5,
        **extra,
    }


def _seed_dir(root: Path, questions: list[dict]) -> Path:
    _png(root / "SEED-Bench-image" / "img1.jpg")  # data_id "img1" has no suffix, as released
    _png(root / "SEED-Bench-image" / "img2.png")
    frames = root / "SEED-Bench-video-image" / "task10" / "ssv2_8_frame" / "v1"
    for name in ("2.png", "10.png", "1.png"):
        _png(frames / name)
    _png(root / "frames" / "v2" / "a.png")
    _png(root / "frames" / "v2" / "b.png")
    root.mkdir(parents=True, exist_ok=True)
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": questions, "question_type": {}}, indent=1))
    return root


def test_seedbench_reader_and_accuracies(tmp_path: Path) -> None:
    root = _seed_dir(
        tmp_path / "seedbench",
        [
            _seed_question("101", "A"),
            _seed_question("102", "B", data_id="img2.png"),
            _seed_question("v1", "D", "video", "94328.webm"),
            _seed_question("v2", "B", "video", "x.webm", frames=["frames/v2/a.png", "frames/v2/b.png"]),
        ],
    )
    task = SeedBenchTask(root)
    questions = {q.id: q for q in task.questions()}
    assert list(questions) == ["101#gen", "101#ll", "102#gen", "102#ll", "v1#gen", "v1#ll", "v2#gen", "v2#ll"]
    assert questions["101#gen"].images == ((root / "SEED-Bench-image" / "img1.jpg").resolve(),)
    assert questions["101#gen"].prompt == (
        f"<image>\nQuestion 101?\nA. one\nB. two\nC. three\nD. four\n{CHOICE_LETTER}"
    )
    frames = root / "SEED-Bench-video-image" / "task10" / "ssv2_8_frame" / "v1"
    video = questions["v1#ll"]
    assert video.images == tuple(
        (frames / n).resolve() for n in ("1.png", "2.png", "10.png")
    )  # by frame number
    assert (video.prompt, video.mode, video.options) == (
        "<image>\n<image>\n<image>\nQuestion v1?",
        "choice",
        ("one", "two", "three", "four"),
    )
    assert len(questions["v2#gen"].images) == 2 and questions["v2#gen"].meta["data_type"] == "video"

    answers = {"101#gen": " A\n", "102#gen": "C", "v1#gen": "The answer is D", "v2#gen": "B", "v1#ll": "A"}
    scores = {
        "101#ll": (-1.0, -2.0, -3.0, -4.0),  # A: right
        "102#ll": (-2.0, -1.0, -1.0, -3.0),  # tie B/C goes to B: right
        "v2#ll": (-1.0, -1.0, -5.0, -5.0),  # tie A/B goes to A: wrong (B)
    }
    # gen, LLaVA's convert_seed_for_submission.py (the stripped text must be the letter): 101 right,
    # 102 wrong, v1 wrong ("The answer is D" is not "D"), v2 right -> 2/4 = 50; image 50; video 50.
    # ll: 101 right, 102 right, v1 wrong (letter A), v2 wrong -> 2/4 = 50; image 100; video 0.
    assert task.score(_preds(answers, scores)) == {
        "accuracy_gen": 50.0,
        "accuracy_gen/image": 50.0,
        "accuracy_gen/video": 50.0,
        "accuracy_ll": 50.0,
        "accuracy_ll/image": 100.0,
        "accuracy_ll/video": 0.0,
    }


@pytest.mark.parametrize(
    ("questions", "parts"),
    [
        (
            [_seed_question("101", "A", data_id="nope")],
            ("SEED-Bench.json", "question_id 101", "'nope' not found"),
        ),
        (
            [_seed_question("101", "A"), _seed_question("101", "B")],
            ("SEED-Bench.json", "questions[1]", "101", "twice"),
        ),
        ([_seed_question("101", "E")], ("SEED-Bench.json", "question_id 101", "answer 'E'")),
        (
            [_seed_question("101", "A", data_id="../../outside.png")],
            ("SEED-Bench.json", "question_id 101", "leads outside"),
        ),
        ([_seed_question("v9", "A", "video")], ("SEED-Bench.json", "question_id v9", "no frame folder")),
        ([_seed_question("101", "A", "Single Image")], ("SEED-Bench.json", "question_id 101", "data_type")),
    ],
)
def test_seedbench_bad_input(tmp_path: Path, questions: list[dict], parts: tuple[str, ...]) -> None:
    _png(tmp_path / "seedbench" / "outside.png")
    root = _seed_dir(tmp_path / "seedbench" / "inner", questions)
    with _raises(*parts):
        SeedBenchTask(root)


def test_seedbench_invalid_json_names_the_line(tmp_path: Path) -> None:
    root = tmp_path / "seedbench"
    root.mkdir()
    (root / "SEED-Bench.json").write_text('{"questions": [\n  {"question_id": 1,}\n]}')
    with _raises("SEED-Bench.json:2", "not valid JSON"):
        SeedBenchTask(root)


# ---------------------------------------------------------------------------------------- DEMON


def _demon_task(folder: Path, metric: str, instances: list, instruction: str | None = None) -> Path:
    for name in ("x.png", "y.png"):
        _png(folder / "images" / name)
    descriptor = {"name": folder.name, "metric": metric} | (
        {"instruction": instruction} if instruction else {}
    )
    (folder / "task.json").write_text(json.dumps(descriptor))
    _jsonl(folder / "instances.jsonl", instances)
    return folder


PAIR = ["images/x.png", "images/y.png"]


def test_demon_single_task_accuracy(tmp_path: Path) -> None:
    root = _demon_task(
        tmp_path / "demon",
        "accuracy",
        [
            {
                "id": "a",
                "prompt": "<image> vs <image>: which is bigger?",
                "images": PAIR,
                "answer": "the first",
            },
            {
                "id": "b",
                "prompt": "<image><image> Where?",
                "images": PAIR,
                "answer": "right image",
                "choices": ["left image", "right image"],
            },
            {"id": "c", "prompt": "<image> <image> How many?", "images": PAIR, "answer": "2 cats"},
        ],
        instruction="Compare the images.",
    )
    task = MultiImageTask(root)
    questions = task.questions()
    assert [q.id for q in questions] == ["a", "b", "c"]
    assert questions[0].prompt == "Compare the images.\n<image> vs <image>: which is bigger?"
    assert questions[0].images == tuple((root / p).resolve() for p in PAIR)
    assert questions[1].meta["choices"] == ("left image", "right image")
    # a: "The first." normalises to "the first": hit. b: "right" is TF-IDF-nearest to "right image": hit.
    # c: "two cats" is not "2 cats" (DEMON does not map number words): miss. 100 * 2 / 3.
    scores = task.score(_preds({"a": "The first.", "b": "right", "c": "two cats"}))
    assert scores == {"accuracy": pytest.approx(200 / 3)}


def test_demon_several_tasks_rouge_l(tmp_path: Path) -> None:
    root = tmp_path / "demon"
    _demon_task(
        root / "cmp", "accuracy", [{"id": "0", "prompt": "<image><image>?", "images": PAIR, "answer": "same"}]
    )
    _demon_task(
        root / "desc",
        "rouge_l",
        [
            {
                "id": "0",
                "prompt": "<image> <image> Describe.",
                "images": PAIR,
                "answer": "a red circle on the left",
            }
        ],
    )
    task = MultiImageTask(root)
    assert [q.id for q in task.questions()] == ["cmp/0", "desc/0"]
    # desc: reference words {a, red, circle, on, the, left} (6), prediction {a, red, circle} (3), LCS 3:
    # R = 3/6, P = 3/3, F = 2 * 0.5 * 1 / 1.5 = 2/3.
    scores = task.score(_preds({"cmp/0": "same", "desc/0": "a red circle"}))
    assert scores == {"cmp/accuracy": 100.0, "desc/rouge_l": pytest.approx(200 / 3)}


IMAGE_CHOICES = ["Image A", "Image B", "Image C", "Image D"]


def _image_choice_instances(answers: list[str], choices: list[str] | None) -> list[dict]:
    extra = {"choices": choices} if choices else {}
    return [
        {"id": str(i), "prompt": "<image> <image> Which?", "images": PAIR, "answer": answer, **extra}
        for i, answer in enumerate(answers)
    ]


def test_demon_image_choice_tasks_use_the_official_rule(tmp_path: Path) -> None:
    # DEMON evaluate.py scores these three by evaluate_multi_choice_image (first 7 characters, 0 when
    # several images are named), with or without a choice list; any case of the name selects it.
    root = tmp_path / "demon"
    answers = ["Image B", "Image C", "Image A", "Image D"]
    for name, choices in (
        ("RecipeQA_VisualCloze", IMAGE_CHOICES),
        ("comics_panel", None),
        ("RecipeQA_ImageCoherence", None),
    ):
        _demon_task(root / name, "accuracy", _image_choice_instances(answers, choices))
    task = MultiImageTask(root)
    assert {q.meta["rule"] for q in task.questions()} == {"image_choice"}
    # 0: hit; 1: "image c" starts it: hit; 2: two images named: miss; 3: not at the start: miss.
    guesses = ["Image B", "Image C: the last one", "Image A or Image C", "I choose Image D"]
    predictions = _preds(
        {
            f"{name}/{i}": guess
            for name in ("RecipeQA_VisualCloze", "comics_panel", "RecipeQA_ImageCoherence")
            for i, guess in enumerate(guesses)
        }
    )
    assert task.score(predictions) == {
        "RecipeQA_VisualCloze/accuracy": 50.0,
        "comics_panel/accuracy": 50.0,
        "RecipeQA_ImageCoherence/accuracy": 50.0,
    }


def test_demon_rules_by_instance(tmp_path: Path) -> None:
    root = tmp_path / "demon"
    _demon_task(
        root / "pick",
        "accuracy",
        [
            {"id": "0", "prompt": "<image><image>", "images": PAIR, "answer": "b", "choices": ["a", "b"]},
            {"id": "1", "prompt": "<image><image>", "images": PAIR, "answer": "two cats"},
            {
                "id": "2",
                "prompt": "<image><image>",
                "images": PAIR,
                "answer": "blue cup",
                "choices": ["red bowl", "blue cup"],
            },
        ],
    )
    _demon_task(
        root / "COMICS_Panel",
        "rouge_l",  # DEMON picks by question type first: an open-ended task is ROUGE-L whatever its name
        [{"id": "0", "prompt": "<image><image>", "images": PAIR, "answer": "Image B"}],
    )
    rules = {q.id: q.meta["rule"] for q in MultiImageTask(root).questions()}
    assert rules == {
        "pick/0": "tfidf_choice",
        "pick/1": "exact",
        "pick/2": "tfidf_choice",
        "COMICS_Panel/0": "rouge_l",
    }


@pytest.mark.parametrize(
    ("name", "instances", "parts"),
    [
        (
            "my_cloze",  # not one of DEMON's image-choice names: TF-IDF would read every answer as "Image A"
            _image_choice_instances(["Image B"], IMAGE_CHOICES),
            ("instances.jsonl:1", "record 0", "choices", "RecipeQA_VisualCloze"),
        ),
        (
            "COMICS_Panel",
            _image_choice_instances(["B"], None),
            ("instances.jsonl:1", "record 0", "answer 'B'", "Image A"),
        ),
    ],
)
def test_demon_image_choice_bad_input(
    tmp_path: Path, name: str, instances: list, parts: tuple[str, ...]
) -> None:
    with _raises(*parts):
        MultiImageTask(_demon_task(tmp_path / "demon" / name, "accuracy", instances))


@pytest.mark.parametrize(
    ("instances", "parts"),
    [
        (
            [{"id": "0", "prompt": "<image> only one", "images": PAIR, "answer": "x"}],
            ("instances.jsonl:1", "record 0", "1 <image> but 2 images"),
        ),
        (
            [{"id": "0", "prompt": "<image><image>", "images": PAIR}],
            ("instances.jsonl:1", "record 0", "'answer'"),
        ),
        (
            [{"id": "0", "prompt": "<image><image>", "images": PAIR, "answer": "x"}] * 2,
            ("instances.jsonl:2", "id 0", "twice"),
        ),
        (
            [{"id": "0", "prompt": "<image><image>", "images": ["../outside.png", PAIR[1]], "answer": "x"}],
            ("instances.jsonl", "record 0", "leads outside"),
        ),
        (
            [{"id": "0", "prompt": "<image><image>", "images": ["images/z.png", PAIR[1]], "answer": "x"}],
            ("instances.jsonl", "record 0", "not found"),
        ),
        (
            [{"id": "0", "prompt": "<image><image>", "images": PAIR, "answer": "x", "choices": ["y", "z"]}],
            ("instances.jsonl:1", "record 0", "not among"),
        ),
    ],
)
def test_demon_bad_input(tmp_path: Path, instances: list, parts: tuple[str, ...]) -> None:
    _png(tmp_path / "outside.png")
    with _raises(*parts):
        MultiImageTask(_demon_task(tmp_path / "demon", "accuracy", instances))


def test_demon_unknown_metric(tmp_path: Path) -> None:
    root = _demon_task(tmp_path / "demon", "bleu", [])
    with _raises("task.json", "metric 'bleu'"):
        MultiImageTask(root)


# ------------------------------------------------------------------------------------------ registry


def test_registry_loads_by_name_and_finds_tasks(tmp_path: Path) -> None:
    _vqa_dir(
        tmp_path / "gqa",
        [{"question_id": "1", "image": "a.png", "text": "Q?"}],
        [{"question_id": "1", "answer": "a"}],
    )
    _mme_dir(tmp_path / "mme")
    (tmp_path / "unrelated").mkdir()
    assert find_tasks(tmp_path) == ["gqa", "mme"]
    gqa = load_task("gqa", tmp_path, tmp_path / "cache")
    assert (gqa.name, gqa.format) == ("gqa", "vqa")
    assert load_task("mme", tmp_path, tmp_path / "cache").format == TASK_FORMATS["mme"]
    assert (
        load_task("mme", tmp_path / "mme", tmp_path / "cache").root == (tmp_path / "mme").resolve()
    )  # the folder
    with pytest.raises(KeyError, match="unknown benchmark 'pope'"):
        load_task("pope", tmp_path, tmp_path / "cache")
    with _raises("vqav2", "not found"):
        load_task("vqav2", tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from maven_dist.offline.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    images = generate_synthetic(root / "set", num_images=12, seed=3, image_size=48)
    assert write_synthetic_benchmarks(root / "bench", images, seed=5) == list(TASK_FORMATS)
    return root


def _load(root: Path, name: str):
    return load_task(name, root / "bench", root / "cache")


def _oracle(question: Question) -> str:
    """The right answer's text: the most common human answer, the Yes/No, the letter, the reference."""
    reference = question.reference
    return Counter(reference).most_common(1)[0][0] if isinstance(reference, tuple) else reference


def test_synthetic_is_deterministic_and_read_back_from_its_directory(
    synthetic_bench: Path, tmp_path: Path
) -> None:
    # Written again from the set's directory (not the object), with the same seed: the same bytes.
    write_synthetic_benchmarks(tmp_path / "again", synthetic_bench / "set", seed=5)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(tmp_path / "again") == files(synthetic_bench / "bench")
    write_synthetic_benchmarks(
        tmp_path / "again", synthetic_bench / "set", seed=6
    )  # its own folders: replaced
    assert files(tmp_path / "again") != files(synthetic_bench / "bench")
    (tmp_path / "foreign" / "mme").mkdir(parents=True)
    (tmp_path / "foreign" / "mme" / "keep.txt").write_text("someone's data")
    with pytest.raises(FileExistsError, match="not replaced"):
        write_synthetic_benchmarks(tmp_path / "foreign", synthetic_bench / "set", seed=5)
    assert (tmp_path / "foreign" / "mme" / "keep.txt").exists()


def test_synthetic_sizes_and_answers_are_true(synthetic_bench: Path) -> None:
    for name in TASK_FORMATS:
        task = _load(synthetic_bench, name)
        assert task.skipped == [] and task.questions()
        for q in task.questions():
            assert all(p.is_file() for p in q.images) and q.prompt.count("<image>") == len(q.images)
    vqav2 = _load(synthetic_bench, "vqav2").questions()
    assert 10 <= len(vqav2) <= 20 and all(len(q.reference) == 10 for q in vqav2)
    seed = _load(synthetic_bench, "seedbench").questions()
    assert {len(q.images) for q in seed if q.meta["data_type"] == "video"} == {2}
    # A counting question's most common human answer is the true count of the image it was asked of.
    from maven_dist.offline.synthetic import SHAPES

    counting = [q for q in vqav2 if q.prompt.startswith("<image>\nHow many ")]
    assert counting
    for q in counting:
        *colour, shape = q.prompt.split("How many ")[1].split(" are")[0].split()  # "red circles", "circles"
        stem = q.images[0].name
        instances = json.loads((synthetic_bench / "set" / "instances.json").read_text())
        image_id = next(i["id"] for i in instances["images"] if i["file_name"] == stem)
        truth = sum(
            a["image_id"] == image_id
            and a["colour"] in (colour or [a["colour"]])
            and SHAPES[a["category_id"] - 1] == shape[:-1]
            for a in instances["annotations"]
        )
        assert _oracle(q) == str(truth)


def test_synthetic_oracle_scores_the_maximum(synthetic_bench: Path) -> None:
    for name in TASK_FORMATS:
        task = _load(synthetic_bench, name)
        metrics = task.score({q.id: Prediction(q.id, _oracle(q)) for q in task.questions()})
        if name == "mme":
            subtasks = {q.meta["subtask"] for q in task.questions()}
            assert metrics["total"] == 200.0 * len(subtasks) == metrics["perception"] + metrics["cognition"]
            assert all(metrics[s] == 200.0 for s in subtasks)
        else:
            assert metrics and all(value == pytest.approx(100.0) for value in metrics.values()), (
                name,
                metrics,
            )


def _loo(k: int, n: int = 10) -> float:
    """VQA accuracy with k of n humans agreeing: the mean over leave-one-out subsets of min(1, matches / 3)."""
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n


def test_synthetic_constant_predictions_score_the_answer_distribution(synthetic_bench: Path) -> None:
    def constant(name: str, text: str) -> tuple[list[Question], dict[str, float]]:
        task = _load(synthetic_bench, name)
        return task.questions(), task.score({q.id: Prediction(q.id, text) for q in task.questions()})

    for name in ("vqav2", "textvqa"):
        questions, metrics = constant(name, "2")
        # Humans agreeing with "2": those who wrote "2" or "two" (the only spellings the set uses).
        expected = (
            100 * sum(_loo(sum(h in ("2", "two") for h in q.reference)) for q in questions) / len(questions)
        )
        assert metrics == {"accuracy": pytest.approx(expected)}

    questions, metrics = constant("gqa", "yes")
    assert metrics == {
        "accuracy": pytest.approx(100 * sum(q.reference == "yes" for q in questions) / len(questions))
    }

    questions, metrics = constant("mme", "yes")
    by_image: dict[tuple[str, str], list[str]] = defaultdict(list)
    for q in questions:
        by_image[(q.meta["subtask"], q.meta["image_id"])].append(q.reference)
    for subtask in {s for s, _ in by_image}:
        pairs = [refs for (s, _), refs in by_image.items() if s == subtask]
        acc = sum(r == "Yes" for refs in pairs for r in refs) / (2 * len(pairs))
        acc_plus = sum(refs == ["Yes", "Yes"] for refs in pairs) / len(pairs)
        assert metrics[subtask] == pytest.approx(100 * acc + 100 * acc_plus)
        assert metrics[subtask] == pytest.approx(50.0)  # one Yes and one No per image, by construction

    questions, metrics = constant("mmbench", "A")
    rotations: dict[str, dict[int, str]] = defaultdict(dict)
    for q in questions:
        rotations[q.meta["source_id"]][q.meta["rotation"]] = q.reference
    vanilla = 100 * sum(r[0] == "A" for r in rotations.values()) / len(rotations)
    circular = 100 * sum(all(a == "A" for a in r.values()) for r in rotations.values()) / len(rotations)
    assert circular == 0.0  # the answer moves with the rotation, "A" cannot be right every time
    assert metrics == {
        "circular_gen": circular,
        "vanilla_gen": pytest.approx(vanilla),
        "circular_ll": circular,
        "vanilla_ll": pytest.approx(vanilla),
    }

    questions, metrics = constant("seedbench", "A")
    for way in ("gen", "ll"):
        for data_type in (None, "image", "video"):
            asked = [
                q for q in questions if q.meta["way"] == way and data_type in (None, q.meta["data_type"])
            ]
            key = f"accuracy_{way}" + (f"/{data_type}" if data_type else "")
            assert metrics[key] == pytest.approx(100 * sum(q.reference == "A" for q in asked) / len(asked))

    task = _load(synthetic_bench, "demon")
    questions = task.questions()
    # "first" is one of the comparison choices; "zebra" shares no word with any description.
    predictions = {
        q.id: Prediction(q.id, "first" if q.meta["metric"] == "accuracy" else "zebra") for q in questions
    }
    comparison = [q for q in questions if q.meta["metric"] == "accuracy"]
    assert task.score(predictions) == {
        "comparison/accuracy": pytest.approx(
            100 * sum(q.reference == "first" for q in comparison) / len(comparison)
        ),
        "description/rouge_l": 0.0,
    }
