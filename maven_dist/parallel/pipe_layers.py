"""MaVEn cut into DeepSpeed pipeline layers: input stage, LLaMA blocks, output stage.

Layer list (DeepSpeed assigns contiguous runs of it to pipeline stages, balancing decoder blocks)::

    0        InputStage   vision tower, selector, projector, unified vocabulary embedding -> sequence
    1 .. L   TPDecoderLayer x L
    L + 1    OutputStage  final norm, vocabulary-parallel head, vocab_parallel_cross_entropy -> loss

The unified vocabulary stays split as in ``MavenModel``: text rows (`llm` part) and new rows
(`vocab_new_rows` part) are two ``VocabParallelEmbedding`` / two column-parallel heads, so stage 2 trains
exactly the new rows and the text rows carry no optimizer state. Each tp rank holds a contiguous
1/tp of the text rows and of the new rows (text_size and the padded new-row count are multiples of
tp: the padding rule makes the padded size a multiple of 128·tp); the cross-entropy sees the
per-rank concatenation [text shard, new shard], and targets are renumbered into that order
(softmax is permutation invariant, so the loss is the same).

**h_eos (the selector's discrete summary) under pipeline parallelism.** h_eos is the final-norm LLM
state at `<EOS>` after an image's discrete block, so stage 0 cannot assemble its sequence before
the whole LLM has run. We run a *forward-only pipeline pass* (:func:`pipeline_eos_states`) once per
optimizer step over all images of the step's micro-batches, before DeepSpeed's training schedule:
stage 0 embeds ``<img> codes </img> <EOS>``, each stage applies its blocks and sends the activations
on (blocking p2p on the pipe group), the last stage applies the final norm and broadcasts the
``<EOS>`` states back to the pipe group. Semantics are exactly MavenModel's (h_eos from the current
weights, no gradient): in stage 4 the LLM trains, so precomputing selections after stage 1 would
give stale selections; that alternative is only exact for stage 3 (LLM frozen). Cost: one extra
forward over N·(K+3) tokens per step (K codes), no backward, run without pipelining; the stage-4
sequence is ~(K+2+m)·N + text tokens with a forward *and* backward, so the pass adds roughly
(K+3)/(3·(K+2+m+text/N)) of the step's LLM FLOPs (7B, K=32, m=144, ~120 text tokens per image:
~4%), plus pp−1 idle bubbles of one small forward each. Measured on the tiny CPU model in
``docs/parallel_3d.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from maven_dist.contract.batch import Batch
from maven_dist.contract.vocab import VocabLayout
from maven_dist.model.frontend import MavenFrontEnd, eos_input_length, precomputed_eos_states
from maven_dist.model.lm_loss import LOSS_CHUNK_ROWS, chunked_token_losses, labelled_rows
from maven_dist.model.maven import maybe_skip_hf_init
from maven_dist.model.spec import MavenSpec
from maven_dist.parallel.megatron_llama import LlamaShape, PipeTuple, RMSNorm, _no_init

StageInputs = tuple[torch.Tensor, ...]
"""(pixel_values, image_codes, h_eos, input_ids, labels, attention_mask): one micro-batch for stage 0."""


def _check_vocab_tp(layout: VocabLayout, tp: int) -> None:
    for what, n in (("text rows", layout.text_size), ("new rows (padded - text)", layout.num_new_rows)):
        if n % tp:
            raise ValueError(
                f"3d backend: the vocabulary's {what} = {n} is not a multiple of parallel.tp={tp}; "
                "set model.vocab.pad_to_multiple_of to a multiple of 128 * tp"
            )


class InputStage(MavenFrontEnd):
    """Stage-0 layer: the MaVEn front end with the unified vocabulary's two row sets vocabulary-parallel."""

    def __init__(
        self,
        shape: LlamaShape,
        layout: VocabLayout,
        spec: MavenSpec,
        tower_config: CLIPVisionConfig,
        views: Sequence[str],
        config: ModelParallelConfig,
    ):
        _check_vocab_tp(layout, config.tensor_model_parallel_size)
        with maybe_skip_hf_init(True):  # weights are loaded next
            tower = CLIPVisionModel(tower_config)
        super().__init__(tower, layout, spec, shape.hidden_size)
        self.views = tuple(views)
        d = shape.hidden_size
        self.embed_text = VocabParallelEmbedding(layout.text_size, d, init_method=_no_init, config=config)
        self.embed_new = VocabParallelEmbedding(layout.num_new_rows, d, init_method=_no_init, config=config)

    def text_embedding(self) -> nn.Module:
        return self.embed_text

    def new_row_embedding(self) -> nn.Module:
        return self.embed_new

    def forward(self, inputs: StageInputs) -> PipeTuple:
        pixel_values, image_codes, h_eos, input_ids, labels, attention_mask = inputs
        batch = Batch(pixel_values, image_codes, input_ids, labels, attention_mask)

        # h_eos came from the engine's pipeline pass (ThreeDEngine.stage_inputs).
        inputs = self.sequence_inputs(batch, self.views, precomputed_eos_states(h_eos))
        return inputs.embeds, inputs.attention_mask, inputs.labels


class OutputStage(nn.Module):
    """Final norm, vocabulary-parallel head, mean cross-entropy over the micro-batch's labelled tokens
    (computed on the labelled rows only, in checkpointed chunks)."""

    def __init__(self, shape: LlamaShape, layout: VocabLayout, config: ModelParallelConfig):
        super().__init__()
        _check_vocab_tp(layout, config.tensor_model_parallel_size)
        self.layout = layout
        self.tp = config.tensor_model_parallel_size
        self.chunk_rows = LOSS_CHUNK_ROWS
        d = shape.hidden_size
        head = dict(config=config, init_method=_no_init, bias=False, gather_output=False, skip_bias_add=True)
        self.norm = RMSNorm(d, shape.rms_norm_eps)
        self.head_text = ColumnParallelLinear(d, layout.text_size, **head)
        self.head_new = ColumnParallelLinear(d, layout.num_new_rows, **head)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[*, d] -> this rank's vocabulary shard [*, padded/tp]: [text shard, new-row shard]."""
        return torch.cat([self.head_text(hidden)[0], self.head_new(hidden)[0]], dim=-1)

    def sharded_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids -> positions in the tp ranks' concatenated [text shard, new shard] order."""
        t, n = self.layout.text_size // self.tp, self.layout.num_new_rows // self.tp
        is_text = targets < self.layout.text_size
        new = targets - self.layout.text_size
        text_pos = (targets // t) * (t + n) + targets % t
        new_pos = (new // n) * (t + n) + t + new % n
        return torch.where(is_text, text_pos, new_pos)

    def token_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token CE [N] of the labelled positions (row-major), as ``MavenModel``'s loss: only
        labelled rows reach the head, a chunk at a time (``maven_dist/model/lm_loss.py``). Every tp
        rank of a pipeline stage holds the same micro-batch, so all run the same chunks and collectives."""
        rows, targets = labelled_rows(hidden, labels)

        def chunk_loss(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = self.local_logits(self.norm(r)).float()
            # megatron takes [s, b, v/tp]: each labelled row is a sequence of one.
            return vocab_parallel_cross_entropy(
                logits.unsqueeze(1), self.sharded_targets(t).unsqueeze(1)
            ).squeeze(1)

        return chunked_token_losses(rows, targets, chunk_loss, self.chunk_rows)

    def forward(self, inputs: PipeTuple) -> torch.Tensor:
        hidden, _, labels = inputs
        losses = self.token_losses(hidden, labels)
        return losses.sum() / max(losses.shape[0], 1)


@torch.no_grad()
def pipeline_eos_states(
    layers: dict[int, nn.Module],
    num_layers: int,
    image_codes: torch.Tensor,
    spec: MavenSpec,
    pipe_ranks: list[int],
    stage: int,
    hidden_size: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """h_eos [N, d] on every rank of the pipe group: the forward-only pass described in the module doc.

    `layers` maps this stage's global layer indices to modules (0: InputStage, 1..L: blocks, L+1:
    OutputStage); `pipe_ranks` are the global ranks of this rank's pipe `group`, in stage order. The
    activations travel in the weights' dtype (bf16 in a bf16 stage: every stage's layers are cast together),
    so each receive and broadcast buffer is allocated in it: a buffer of another dtype would take the
    sender's bytes as other numbers, or hang NCCL on a size mismatch.
    """
    pp = len(pipe_ranks)
    weight = next(p for layer in layers.values() for p in layer.parameters())
    device, dtype = weight.device, weight.dtype
    n, length = image_codes.shape[0], eos_input_length(spec)
    if stage == 0:
        inp: InputStage = layers[0]
        hidden = inp.embed_tokens(inp.eos_input_ids(image_codes.to(device)))
    else:
        hidden = torch.empty(n, length, hidden_size, dtype=dtype, device=device)
        dist.recv(hidden, src=pipe_ranks[stage - 1])
    mask = torch.ones(n, length, dtype=torch.long, device=device)
    for index in sorted(layers):
        if 1 <= index <= num_layers:
            hidden = layers[index].block(hidden, mask)
    if stage < pp - 1:
        dist.send(hidden.contiguous(), dst=pipe_ranks[stage + 1])
        h_eos = torch.empty(n, hidden_size, dtype=dtype, device=device)
    else:
        h_eos = layers[num_layers + 1].norm(hidden[:, -1]).contiguous()
    if pp > 1:
        dist.broadcast(h_eos, src=pipe_ranks[-1], group=group)
    return h_eos
