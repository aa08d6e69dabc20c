"""Generation: prefill logits equal training's, KV-cache decoding equals recomputing, the vocabulary mask,
transformers' Auto classes and the chat templates against the training templates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import extend_tokenizer
from maven_dist.data.templates import CHAT_TEMPLATES, TEMPLATES, render, render_prompt, tokenize_with_images
from maven_dist.model.generation import MavenForConditionalGeneration
from maven_dist.model.maven import MavenModel
from maven_dist.model.spec import MavenSpec
from tests.helpers.batches import make_batch
from tests.helpers.models import lm_logits

NUM_CODES, CODEBOOK = 8, 64
REPO = Path(__file__).resolve().parents[2]
VIEWS = ("discrete", "continuous")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    extend_tokenizer(tokenizer, CODEBOOK, 128)
    return tokenizer


@pytest.fixture(scope="module")
def generator(tiny_base, tokenizer) -> MavenForConditionalGeneration:
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    spec = MavenSpec(
        selector_hidden_size=16,
        num_codes=NUM_CODES,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = MavenModel.from_base(tiny_base.llm_dir, tiny_base.tower_dir, layout, spec, seed=0)
    with torch.no_grad():  # a selector and projector that matter, like a trained model's
        for p in (*model.selector.parameters(), *model.projector.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return MavenForConditionalGeneration.wrap(model.eval())


def prompts(generator: MavenForConditionalGeneration, seed: int = 0) -> Batch:
    """Two prompts from the helper batch: one image mid-text, and two images."""
    tower = generator.maven.vision_tower
    full = make_batch(generator.maven, NUM_CODES, tower.tower.config.image_size, tower.num_patches, seed)
    images = int((full.input_ids[:2] == -200).sum())
    return Batch(
        full.pixel_values[:images],
        full.image_codes[:images],
        full.input_ids[:2],
        None,
        full.attention_mask[:2],
    )


def test_prefill_logits_equal_the_training_forward(generator):
    batch = prompts(generator)
    train_batch = Batch(
        batch.pixel_values, batch.image_codes, batch.input_ids, batch.input_ids, batch.attention_mask
    )
    with torch.no_grad():
        reference, right = lm_logits(generator.maven, train_batch, VIEWS)  # right-padded, as in training
        embeds, mask = generator.prompt_embeds(
            batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_codes
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefill = generator(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    for row in range(2):
        n = int(right.attention_mask[row].sum())
        torch.testing.assert_close(prefill[row, -n:], reference[row, :n], rtol=0, atol=1e-5)


def until_eos(ids: torch.Tensor, eos: int) -> list[list[int]]:
    rows = []
    for row in ids.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_with_the_kv_cache_equals_greedy_without_it(generator, seed):
    """Single- and multi-image prompts, batched with left padding and one by one."""
    batch, steps, eos = prompts(generator, seed), 12, generator.maven.spec.eos_token_id
    cached = generator.generate(
        batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_codes, max_new_tokens=steps
    )
    uncached = generator.generate(
        batch.input_ids,
        batch.attention_mask,
        batch.pixel_values,
        batch.image_codes,
        max_new_tokens=steps,
        use_cache=False,
    )
    reference = until_eos(uncached, eos)
    assert until_eos(cached, eos) == reference
    image = 0
    for row in range(2):  # each prompt alone (no padding at all)
        n = int((batch.input_ids[row] == -200).sum())
        alone = Batch(
            batch.pixel_values[image : image + n],
            batch.image_codes[image : image + n],
            batch.input_ids[row : row + 1][:, batch.attention_mask[row].bool()],
            None,
            torch.ones(1, int(batch.attention_mask[row].sum()), dtype=torch.long),
        )
        image += n
        single = generator.generate(
            alone.input_ids, alone.attention_mask, alone.pixel_values, alone.image_codes, max_new_tokens=steps
        )
        assert until_eos(single, eos) == [reference[row]], f"prompt {row} alone differs from the batch"


def test_default_decoding_emits_text_only_and_the_visual_option_codes_in_range(generator):
    layout = generator.maven.layout
    batch = prompts(generator)
    torch.manual_seed(0)
    sampled = generator.generate(
        batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_codes,
        max_new_tokens=48, do_sample=True, temperature=2.0, top_k=0, eos_token_id=None,
    )  # fmt: skip
    assert sampled.shape[1] == 48 and int(sampled.max()) < layout.text_size
    torch.manual_seed(0)
    visual = generator.generate(
        batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_codes,
        max_new_tokens=48, do_sample=True, temperature=2.0, top_k=0, eos_token_id=None, allow_visual_codes=True,
    )  # fmt: skip
    codes = visual[visual >= layout.text_size]
    assert codes.numel() > 0, "the visual option never produced a visual token"
    assert int(codes.max()) < layout.code_offset + layout.codebook_size, "a padding row was produced"
    in_range = layout.token_id_to_code(codes[codes >= layout.code_offset])
    assert int(in_range.min()) >= 0 and int(in_range.max()) < layout.codebook_size


def test_beam_search_and_sampling_options_run(generator):
    batch = prompts(generator)
    beams = generator.generate(
        batch.input_ids,
        batch.attention_mask,
        batch.pixel_values,
        batch.image_codes,
        max_new_tokens=6,
        num_beams=3,
    )
    nucleus = generator.generate(
        batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_codes,
        max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9,
    )  # fmt: skip
    assert beams.shape[0] == nucleus.shape[0] == 2


def test_auto_classes_load_a_maven_directory(generator, tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModel

    directory = generator.maven.save_pretrained(tmp_path / "maven", tokenizer, template="vicuna_v1")
    config = AutoConfig.from_pretrained(directory)
    assert config.model_type == "maven" and config.template == "vicuna_v1"
    auto = AutoModel.from_pretrained(directory)
    assert isinstance(auto, MavenForConditionalGeneration)
    direct = MavenModel.from_pretrained(directory).eval()
    batch = prompts(generator)
    with torch.no_grad():
        ids = batch.input_ids.clamp(min=0)
        assert torch.equal(
            auto(input_ids=ids).logits,
            direct.logits(direct.llm.model(inputs_embeds=direct.embed_tokens(ids)).last_hidden_state).float(),
        )
        generated = auto.generate(
            batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_codes, max_new_tokens=5
        )
        again = direct.generate(
            batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_codes, max_new_tokens=5
        )
    assert torch.equal(generated, again)
    # A fresh process: `import maven_dist.model` is all it takes.
    script = (
        "import maven_dist.model\nfrom transformers import AutoConfig, AutoModel\n"
        f"print(AutoConfig.from_pretrained({str(directory)!r}).model_type, "
        f"type(AutoModel.from_pretrained({str(directory)!r})).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.stdout.split() == ["maven", "MavenForConditionalGeneration"], out.stderr[-2000:]


CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat colour is the circle ?"},
    {"from": "gpt", "value": "the circle is red ."},
    {"from": "human", "value": "and the square ?"},
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_templates_render_what_training_saw(tokenizer, template):
    """apply_chat_template's text, tokenised with the images cut out as training does, is the training
    template token for token: the generation prompt, and (but for `plain`, one round) a whole conversation."""
    tokenizer.chat_template = CHAT_TEMPLATES[template]
    turns = CONVERSATION if template != "plain" else [CONVERSATION[0]]
    messages = [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, image_placeholders=True)
    assert tokenize_with_images(text, tokenizer) == render_prompt(turns, template, tokenizer)
    answered = [*turns, {"from": "gpt", "value": "it is blue ."}]
    messages.append({"role": "assistant", "content": "it is blue ."})
    text = tokenizer.apply_chat_template(messages, tokenize=False, image_placeholders=True)
    assert tokenize_with_images(text, tokenizer) == render(answered, template, tokenizer).input_ids
