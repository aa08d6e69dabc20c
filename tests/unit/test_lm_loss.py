"""The LM loss on labelled rows only, in checkpointed chunks, against the former all-positions loss."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoTokenizer

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import IGNORE_INDEX, extend_tokenizer
from maven_dist.model.lm_loss import UnifiedHeadLoss, chunked_token_losses, labelled_rows
from maven_dist.model.maven import MavenModel
from maven_dist.model.spec import MavenSpec
from tests.helpers.batches import make_batch

NUM_CODES, CODEBOOK = 8, 64
VIEWS = ("discrete", "continuous")


@pytest.fixture(scope="module")
def model(tiny_base) -> MavenModel:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base.llm_dir)
    layout = extend_tokenizer(tokenizer, CODEBOOK, 128)
    spec = MavenSpec(
        keep_ratio=0.25, selector_hidden_size=16, num_codes=NUM_CODES, eos_token_id=tokenizer.eos_token_id
    )
    return MavenModel.from_base(tiny_base.llm_dir, tiny_base.tower_dir, layout, spec, seed=0)


def batch_of(model: MavenModel, seed: int = 0) -> Batch:
    tower = model.vision_tower
    return make_batch(model, NUM_CODES, tower.tower.config.image_size, tower.num_patches, seed)


def reference_lm_loss(model: MavenModel, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss as it was before issue 16: fp32 logits of every position, ignore_index cross-entropy,
    the sum over labelled tokens divided by their number; the split metrics from the same logits."""
    inputs = model.sequence_inputs(batch, VIEWS, model.eos_states)
    hidden = model.llm.model(
        inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, use_cache=False
    ).last_hidden_state
    all_logits = torch.cat([model.llm.lm_head(hidden), model.vocab_new_rows.head(hidden)], dim=-1).float()
    logits, targets = all_logits[:, :-1], inputs.labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    labelled = targets != IGNORE_INDEX
    loss = token_loss.sum() / max(int(labelled.sum()), 1)
    is_visual = targets >= model.layout.text_size
    metrics = {}
    for name, sel in (("lm_text", labelled & ~is_visual), ("lm_visual_codes", labelled & is_visual)):
        if sel.any():
            metrics[f"loss/{name}"] = token_loss[sel].mean().detach()
    return loss, metrics


def grads_of(model: MavenModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("chunk_rows", [4096, 7, 1])
def test_loss_metrics_and_every_gradient_equal_the_all_positions_loss(model, chunk_rows):
    batch = batch_of(model)
    ref_loss, ref_metrics = reference_lm_loss(model, batch)
    ref_grads = grads_of(model, ref_loss)
    model.lm_loss.chunk_rows = chunk_rows
    try:
        out = model(batch, views=VIEWS, loss="lm")
        grads = grads_of(model, out.loss)
    finally:
        model.lm_loss.chunk_rows = 4096
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert {"loss/lm_text", "loss/lm_visual_codes"} <= set(out.metrics)
    for key, want in ref_metrics.items():
        torch.testing.assert_close(out.metrics[key], want, rtol=1e-6, atol=1e-6)
    assert out.num_tokens == int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    assert set(grads) == set(ref_grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_a_micro_batch_without_labels_has_loss_zero_and_zero_gradients_everywhere(model):
    batch = batch_of(model, seed=1)
    batch = Batch(
        batch.pixel_values,
        batch.image_codes,
        batch.input_ids,
        torch.full_like(batch.labels, IGNORE_INDEX),
        batch.attention_mask,
    )
    ref_loss, _ = reference_lm_loss(model, batch)
    ref_grads = grads_of(model, ref_loss)
    out = model(batch, views=VIEWS, loss="lm")
    grads = grads_of(model, out.loss)
    assert float(out.loss.detach()) == float(ref_loss.detach()) == 0.0 and out.num_tokens == 0
    assert "loss/lm_text" not in out.metrics and "loss/lm_visual_codes" not in out.metrics
    assert set(grads) == set(ref_grads)
    for name, want in ref_grads.items():
        assert torch.equal(grads[name], want) and not grads[name].any(), name


def test_without_autograd_the_loss_is_the_same(model):
    batch = batch_of(model, seed=2)
    with torch.no_grad():
        ref_loss, ref_metrics = reference_lm_loss(model, batch)
        out = model(batch, views=VIEWS, loss="lm")
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-6)
    for key, want in ref_metrics.items():
        torch.testing.assert_close(out.metrics[key], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("way", ["fused", "checkpointed"])
def test_autograd_keeps_no_logits_for_backward(way):
    """What the chunked losses save for backward: rows, targets and weights, nothing vocabulary-sized;
    and their gradients are those of the plain cross-entropy (the 3D output stage uses the checkpointed
    chunks, MavenModel the fused function)."""
    torch.manual_seed(0)
    n, d, vocab = 50, 8, 1000
    rows = torch.randn(n, d, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    weights = [torch.randn(vocab - 300, d, requires_grad=True), torch.randn(300, d, requires_grad=True)]
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    def chunk_loss(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.cat([F.linear(r, w) for w in weights], dim=-1), t, reduction="none")

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if way == "fused":
            losses = UnifiedHeadLoss(chunk_rows=16)(rows, targets, lambda: weights)
        else:
            losses = chunked_token_losses(rows, targets, chunk_loss, chunk_rows=16)
    assert saved and all(vocab not in shape for shape in saved), saved
    upstream = torch.rand(n)
    (losses * upstream).sum().backward()
    reference = (chunk_loss(rows, targets) * upstream).sum()
    torch.testing.assert_close(losses.detach(), chunk_loss(rows, targets).detach(), rtol=1e-6, atol=1e-6)
    for got, want in zip((rows, *weights), torch.autograd.grad(reference, (rows, *weights)), strict=True):
        torch.testing.assert_close(got.grad, want, rtol=1e-6, atol=1e-6)


def test_labelled_rows_are_the_positions_before_each_label_in_row_major_order():
    hidden = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, 6], [IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]])
    rows, targets = labelled_rows(hidden, labels)
    assert rows.flatten().tolist() == [0.0, 2.0, 5.0] and targets.tolist() == [5, 6, 7]


def test_in_bf16_the_fused_loss_casts_where_the_former_one_did():
    """bf16 head: logits in bf16 cast to fp32, the fp32 softmax gradient cast back to bf16 for the
    matmuls, weight gradients in bf16 (summed over chunks): the former autograd arithmetic."""
    torch.manual_seed(0)
    n, d, vocab = 50, 16, 700
    rows = torch.randn(n, d).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    weights = [
        torch.randn(500, d).bfloat16().requires_grad_(),
        torch.randn(200, d).bfloat16().requires_grad_(),
    ]
    losses = UnifiedHeadLoss(chunk_rows=16)(rows, targets, lambda: weights)
    losses.sum().backward()
    ref_losses = F.cross_entropy(
        torch.cat([F.linear(rows, w) for w in weights], dim=-1).float(), targets, reduction="none"
    )
    ref_grads = torch.autograd.grad(ref_losses.sum(), (rows, *weights))
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses.detach(), ref_losses.detach(), rtol=1e-6, atol=1e-6)
    for got, want in zip((rows, *weights), ref_grads, strict=True):
        assert got.grad.dtype == torch.bfloat16
        assert (got.grad.float() - want.float()).norm() <= 1e-2 * want.float().norm()
