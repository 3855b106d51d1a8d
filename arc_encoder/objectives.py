"""Pure-torch metrics for a compressor + frozen decoder (no Lightning).

* ``batch_loss``: the training loss of a batch (its task decides the target and marker).
* ``continuation_loss`` with ``context`` = "compressed" (our vectors), "none" (closed-book
  lower bound) or "full" (the context's decoder tokens; the open-book upper bound).
* ``reconstruction_accuracy``: teacher-forced next-token accuracy of decoding the context
  back from its compressed form, and the share of rows reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .model import IGNORE_INDEX, ARCModel, CompressedContext, DecoderInputs
from .tasks import Batch

ContextMode = Literal["compressed", "none", "full"]


def _empty_context(batch: Batch, width: int, decoder: str, like: torch.Tensor) -> CompressedContext:
    return CompressedContext(
        like.new_zeros(len(batch), 0, width),
        torch.zeros(len(batch), dtype=torch.long),
        decoder,
    )


def decoder_inputs(
    model: ARCModel,
    decoder: PreTrainedModel,
    batch: Batch,
    context: ContextMode = "compressed",
    targets: Literal["task", "continuation", "reconstruction"] = "task",
) -> DecoderInputs:
    """The decoder input for ``batch`` with the chosen context and targets."""
    emb = decoder.get_input_embeddings()
    if targets == "task":
        target_ids, marker = batch.target_ids, batch.marker
    elif targets == "reconstruction":
        target_ids, marker = batch.context_ids, "reconstruction"
    else:
        target_ids, marker = batch.continuation_ids, "continuation"
    if context == "compressed":
        ctx = model.compress(batch.encoder_ids, batch.decoder, batch.pooling_factors)
        return model.build_decoder_inputs(emb, ctx, batch.prompt_ids, target_ids, marker, batch.prefix_ids)
    if context not in ("none", "full"):
        raise ValueError(f"context must be 'compressed', 'none' or 'full', got {context!r}")
    empty = _empty_context(batch, emb.weight.shape[1], batch.decoder, emb.weight)
    prefix = batch.prefix_ids
    if context == "full":
        prefix = [p + c for p, c in zip(batch.prefix_ids, batch.context_ids)]
    return model.build_decoder_inputs(emb, empty, batch.prompt_ids, target_ids, None, prefix)


def batch_loss(model: ARCModel, decoder: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens, from the compressed context."""
    return ARCModel.decoder_loss(decoder, decoder_inputs(model, decoder, batch))


@torch.no_grad()
def continuation_loss(
    model: ARCModel, decoder: PreTrainedModel, batch: Batch, context: ContextMode = "compressed"
) -> float:
    """Continuation (or QA answer) loss with compressed, no, or full-text context."""
    inputs = decoder_inputs(model, decoder, batch, context, targets="continuation")
    return float(ARCModel.decoder_loss(decoder, inputs))


@dataclass
class ReconstructionScore:
    token_accuracy: float  # share of context tokens predicted exactly (teacher forcing)
    exact_match: float  # share of rows whose every token was predicted exactly
    loss: float


@torch.no_grad()
def reconstruction_accuracy(model: ARCModel, decoder: PreTrainedModel, batch: Batch) -> ReconstructionScore:
    """How well the decoder reads the context back out of its compressed form."""
    inputs = decoder_inputs(model, decoder, batch, "compressed", targets="reconstruction")
    logits = decoder(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    pred = logits[:, :-1].argmax(-1)  # [b, seq-1]
    labels = inputs.labels[:, 1:]
    on = labels != IGNORE_INDEX
    right = (pred == labels) & on
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    rows_exact = (right.sum(-1) == on.sum(-1)).float().mean()
    return ReconstructionScore(
        token_accuracy=float(right.sum() / on.sum().clamp(min=1)),
        exact_match=float(rows_exact),
        loss=float(loss),
    )


@torch.no_grad()
def evaluate_batch(model: ARCModel, decoder: PreTrainedModel, batch: Batch) -> dict[str, float]:
    """Every validation metric for one batch (keys are stable metric names)."""
    out = {
        "loss_compressed": continuation_loss(model, decoder, batch, "compressed"),
        "loss_none": continuation_loss(model, decoder, batch, "none"),
        "loss_full": continuation_loss(model, decoder, batch, "full"),
    }
    if batch.task != "qa":
        score = reconstruction_accuracy(model, decoder, batch)
        out.update(recon_acc=score.token_accuracy, recon_exact=score.exact_match, recon_loss=score.loss)
    return out
