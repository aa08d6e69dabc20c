"""The miniature world's LLM comes pretrained on the world's text, as Vicuna comes pretrained (issue 22).

(The tower's pretraining is measured where it runs, in `make demo`'s log: per-patch shape accuracy 0.90 after
1,000 steps; a test-sized run does not get past a random tower's 0.40 in the seconds a unit test has.)
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from maven_dist.config import LLMConfig
from maven_dist.contract.vocab import IGNORE_INDEX, IMAGE_PLACEHOLDER
from maven_dist.offline.pretrain_llm import describe_images, pretrain_llm, training_rows
from maven_dist.offline.tokenizer_training import train_tokenizer


def test_images_become_their_captions_in_order():
    turns = [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\nWhich has more?"},
        {"from": "gpt", "value": "first"},
    ]
    captions = {"a.png": "Two red circles.", "b.png": "One blue square."}
    out = describe_images(turns, ["a.png", "b.png"], captions)
    assert out[0]["value"] == "Two red circles.\nOne blue square.\nWhich has more?"
    assert out[1] == turns[1]


def test_the_pretrained_llm_has_learned_the_worlds_text(tmp_path):
    texts = [
        f"{n} red circles on a {b} background." for n in ("One", "Two", "Three") for b in ("grey", "striped")
    ]
    tokenizer = train_tokenizer(texts * 20, tmp_path / "tok", vocab_size=300)
    samples = [
        ([{"from": "human", "value": "Describe."}, {"from": "gpt", "value": t}], "plain") for t in texts
    ]
    ids, labels = training_rows(samples[:1], tokenizer)
    assert ids[-1] == tokenizer.eos_token_id and labels == ids  # a plain sample: every token learned
    llm = LLMConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    out = tmp_path / "llm"
    last = pretrain_llm(
        llm, tokenizer, samples * 20, out, seed=0, steps=60, batch_size=8, block=32, log=lambda _: None
    )
    model = LlamaForCausalLM.from_pretrained(out)
    row = torch.tensor([ids])
    with torch.no_grad():
        loss = model(input_ids=row, labels=row).loss.item()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    assert loss < 0.5 * np.log(len(tokenizer)) and last < 0.5 * np.log(len(tokenizer)), (loss, last)


def test_conversations_are_learned_on_their_answers_only(tmp_path):
    """The captions are text to model; a conversation, with its image written as the caption, is learned on
    its answers, as instruction tuning learns it: the LLM is taught to answer from what it is told."""
    caption = "Two red circles on a grey background."
    tokenizer = train_tokenizer(
        [caption, "What colour are the circles? red"] * 20, tmp_path / "tok", vocab_size=300
    )
    turns = describe_images(
        [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nWhat colour are the circles?"},
            {"from": "gpt", "value": "red"},
        ],
        ["a.png"],
        {"a.png": caption},
    )
    ids, labels = training_rows([(turns, "vicuna_v1")], tokenizer)
    learned = tokenizer.decode([i for i, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX])
    assert learned.replace(" ", "") == "red</s>"
    assert "grey" in tokenizer.decode(ids)  # the caption is in the context, not learned
