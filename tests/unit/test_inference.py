"""Inference from a model directory: images preprocessed and tokenised as training did, and bad input
(through `maven chat`) refused with what is wrong."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from maven_dist.config import load_config
from maven_dist.contract.lengths import num_kept_patches
from maven_dist.contract.vocab import extend_tokenizer
from maven_dist.data.loader import build_loader
from maven_dist.data.shards import list_shards, read_shard
from maven_dist.data.templates import render_prompt
from maven_dist.inference import MavenProcessor
from maven_dist.inference.chat import main as chat
from maven_dist.model import hf_layout
from maven_dist.model.maven import MavenModel
from maven_dist.train.builders import model_spec
from tests.helpers.models import lm_logits


def export_like(tiny_assets, out, discrete: bool = True):
    """A MaVEn directory as a stage export writes it: base weights, template, discrete tokenizer."""
    cfg = load_config(
        "tests/recipes/tiny/stage4.yaml", tiny_assets.overrides(out.parent / "run", "conversations")
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.resolve_path(cfg.model.llm.path))
    layout = extend_tokenizer(tokenizer, cfg.model.discrete.codebook_size, cfg.model.vocab.pad_to_multiple_of)
    model = MavenModel.from_base(
        cfg.resolve_path(cfg.model.llm.path),
        cfg.resolve_path(cfg.model.vision.path),
        layout,
        model_spec(cfg, tokenizer),
    )
    files = (
        hf_layout.DiscreteTokenizerFiles("kmeans", cfg.resolve_path(cfg.model.discrete.path))
        if discrete
        else None
    )
    return cfg, model.save_pretrained(out, tokenizer, template="vicuna_v1", discrete=files)


@pytest.fixture(scope="module")
def exported(tiny_assets, tmp_path_factory):
    return export_like(tiny_assets, tmp_path_factory.mktemp("inference") / "export")


def test_images_are_preprocessed_and_tokenised_as_training_did(exported, tiny_assets):
    """The loader's pixels and the shards' codes (written by `maven tokenize`) for the same samples."""
    cfg, model_dir = exported
    processor = MavenProcessor.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg.data.shuffle, cfg.data.num_workers = False, 0
    layout = extend_tokenizer(tokenizer, cfg.model.discrete.codebook_size, cfg.model.vocab.pad_to_multiple_of)
    loader = build_loader(cfg, tokenizer, layout)
    batch = next(iter(loader))
    shards = list_shards(cfg.resolve_path(cfg.data.path))
    rows = {r["id"]: r for shard in shards for r in read_shard(shard).to_pylist()}
    image_root = tiny_assets.root / "data" / "synthetic" / "images"
    paths = [[image_root / p for p in rows[i]["image_paths"]] for i in batch.sample_ids]
    questions = [[rows[i]["conversations"][0]] for i in batch.sample_ids]
    ours = processor(questions, paths)
    torch.testing.assert_close(ours.pixel_values, batch.pixel_values, rtol=0, atol=0)
    assert torch.equal(ours.image_codes, batch.image_codes)
    for row, sample in enumerate(batch.sample_ids):  # the prompt is the training template up to the answer
        ids = render_prompt(questions[row], "vicuna_v1", processor.tokenizer)
        assert ours.input_ids[row, ours.attention_mask[row].bool()].tolist() == ids, sample


def test_maven_chat_prints_what_the_generator_answers(exported, tiny_assets, capsys):
    from maven_dist.inference import MavenGenerator

    _, model_dir = exported
    image = tiny_assets.root / "data" / "synthetic" / "images" / "00000.png"
    expected = MavenGenerator.from_pretrained(model_dir).generate(
        ["what is it ?"], [[image]], max_new_tokens=6
    )
    code = chat(
        [str(model_dir), "--image", str(image), "--max-new-tokens", "6", "--no-stream", "what is it ?"]
    )
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out == expected[0].text + "\n"


def _refused(args: list[str], capsys) -> str:
    code = chat(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_an_unreadable_image_is_refused(exported, tmp_path, capsys):
    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    err = _refused([str(exported[1]), "--image", str(bad), "what is it ?"], capsys)
    assert f"image {bad} is not an image in an accepted format" in err


def test_more_placeholders_than_images_is_refused(exported, tiny_assets, capsys):
    image = tiny_assets.root / "data" / "synthetic" / "images" / "00000.png"
    err = _refused(
        [str(exported[1]), "--image", str(image), "<image> and <image>: which is larger ?"], capsys
    )
    assert "has 2 <image> placeholder(s) but 1 image(s) were given" in err


def test_a_prompt_longer_than_the_context_is_refused(exported, capsys):
    context = MavenModel.from_pretrained(exported[1]).llm.config.max_position_embeddings
    err = _refused([str(exported[1]), "--max-new-tokens", str(context), "what is it ?"], capsys)
    assert f"exceeds the model's context of {context}" in err


def test_a_model_directory_without_its_discrete_tokenizer_is_refused(tiny_assets, tmp_path, capsys):
    _, bare = export_like(tiny_assets, tmp_path / "bare", discrete=False)
    err = _refused([str(bare), "what is it ?"], capsys)
    assert "does not record its discrete tokenizer" in err
    err = _refused([str(tmp_path / "nowhere"), "what is it ?"], capsys)
    assert "is not a directory" in err


def test_a_changed_seed_file_is_refused_by_hash(tmp_path):
    quantizer = tmp_path / "seed_quantizer.pt"
    quantizer.write_bytes(b"weights")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    entry = hf_layout.attach_discrete_tokenizer(
        model_dir, hf_layout.DiscreteTokenizerFiles("seed", quantizer)
    )
    (model_dir / "config.json").write_text(
        '{"model_type": "maven", "spec": {}, "vocab": {}, "discrete_tokenizer": '
        + __import__("json").dumps(entry)
        + "}"
    )
    assert hf_layout.discrete_tokenizer_files(model_dir).path == quantizer.resolve()
    quantizer.write_bytes(b"other weights")
    with pytest.raises(ValueError, match="has changed since the model was trained"):
        hf_layout.discrete_tokenizer_files(model_dir)


def test_option_loglikelihood_equals_the_training_forward(exported, tiny_assets):
    """loglikelihood(prompt, continuation) is the training path's log-probability of the answer tokens
    (text rows only), and is_greedy says whether greedy decoding gives exactly them."""
    from maven_dist.contract.batch import Batch
    from maven_dist.inference import MavenGenerator

    _, model_dir = exported
    generator = MavenGenerator.from_pretrained(model_dir)
    image = tiny_assets.root / "data" / "synthetic" / "images" / "00002.png"
    question, answer = "<image>\nwhat colour is the square ?", "the square is blue ."
    ((score, greedy),) = generator.loglikelihood([question], [answer], images=[[image]])
    processor, maven = generator.processor, generator.model.maven
    prompt = processor([question], [[image]])
    target = processor.tokenizer.encode(answer, add_special_tokens=False)
    ids = torch.tensor([prompt.input_ids[0].tolist() + target])
    batch = Batch(prompt.pixel_values, prompt.image_codes, ids, ids, torch.ones_like(ids))
    with torch.no_grad():
        logits, inputs = lm_logits(maven, batch, ("discrete", "continuous"))
    logits[..., processor.layout.text_size :] = float("-inf")
    logprobs = torch.log_softmax(logits[0], dim=-1)
    n = inputs.embeds.shape[1]
    expected = sum(float(logprobs[n - len(target) - 1 + j, t]) for j, t in enumerate(target))
    assert score == pytest.approx(expected, abs=1e-4)
    argmax = [int(logprobs[n - len(target) - 1 + j].argmax()) for j in range(len(target))]
    assert greedy == (argmax == target)
    greedy_answer = generator.generate([question], [[image]], max_new_tokens=len(target))[0].token_ids
    ((_, is_greedy),) = generator.loglikelihood(
        [question], [processor.tokenizer.decode(greedy_answer)], [[image]]
    )
    assert (
        is_greedy
        or processor.tokenizer.encode(processor.tokenizer.decode(greedy_answer), add_special_tokens=False)
        != greedy_answer
    )


def test_a_model_feeds_images_with_the_views_it_was_trained_with(exported, tiny_assets, tmp_path):
    """A discrete-only model (the views ablation) records its views; inference then sends no patches."""
    import json
    import shutil

    cfg, model_dir = exported
    only = tmp_path / "discrete_only"
    shutil.copytree(model_dir, only)
    config = json.loads((only / "config.json").read_text())
    config["views"] = ["discrete"]
    (only / "config.json").write_text(json.dumps(config))
    image = tiny_assets.root / "data" / "synthetic" / "images" / "00000.png"
    both, discrete = (MavenProcessor.from_pretrained(d) for d in (model_dir, only))
    assert both.views == ("discrete", "continuous") and discrete.views == ("discrete",)
    a, b = (p(["<image>\nwhat is it ?"], [[image]]) for p in (both, discrete))
    kept = num_kept_patches(both.num_patches, cfg.model.selector.keep_ratio)
    assert a.positions[0] - b.positions[0] == kept
