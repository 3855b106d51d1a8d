"""Validation metrics: how well a decoder reads compressed context, next to no context and the full text.

Above the model: each metric lays out a ``Batch`` with ``ARCModel.decoder_inputs`` and scores it
with the token-scoring core (``arc_encoder.objectives``). Every context mode scores the same tokens
(``decoder_inputs(..., comparable=True)``: a pretraining window has no BOS, so without context
nothing precedes its first target token, which no mode then scores):

* ``continuation_loss`` with ``context`` = "compressed" (our vectors), "none" (closed-book
  lower bound) or "full" (the context's decoder tokens; the open-book upper bound);
* ``reconstruction_accuracy``: teacher-forced next-token accuracy of decoding the context
  back from its compressed form, and the share of rows reproduced exactly;
* ``gap_closed``: the share of the closed- to open-book gap that the compressed context closes.

``evaluate_batch`` is what the training module logs at every validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .model import ARCModel
from .objectives import IGNORE_INDEX, ContextMode, decoder_loss, mean_loss, predict
from .samples import Batch

# Under this open-book gain (nats/token: closed-book minus open-book loss) a decoder barely uses its
# context, and the share of that gap a compressed context closes is a ratio of noise.
MIN_GAIN_FOR_GAP = 0.2


@torch.no_grad()
def continuation_loss(
    model: ARCModel, decoder: PreTrainedModel, batch: Batch, context: ContextMode = "compressed"
) -> float:
    """Continuation (or QA answer) loss with compressed, no, or full-text context."""
    return float(decoder_loss(decoder, model.decoder_inputs(decoder, batch, context, "continuation", comparable=True)))


@dataclass
class ReconstructionScore:
    token_accuracy: float  # share of context tokens predicted exactly (teacher forcing)
    exact_match: float  # share of rows whose every token was predicted exactly
    loss: float


@torch.no_grad()
def reconstruction_accuracy(model: ARCModel, decoder: PreTrainedModel, batch: Batch) -> ReconstructionScore:
    """How well the decoder reads the context back out of its compressed form."""
    inputs = model.decoder_inputs(decoder, batch, "compressed", "reconstruction", comparable=True)
    logits, labels = predict(decoder, inputs)
    on = labels != IGNORE_INDEX
    right = (logits.argmax(-1) == labels) & on
    rows_exact = (right.sum(-1) == on.sum(-1)).float().mean()
    return ReconstructionScore(
        token_accuracy=float(right.sum() / on.sum().clamp(min=1)),
        exact_match=float(rows_exact),
        loss=float(mean_loss(logits, labels)),
    )


def gap_closed(loss_none: float, loss_full: float, loss_compressed: float,
               min_gain: float = MIN_GAIN_FOR_GAP) -> float | None:
    """Share of the closed- to open-book loss gap that the compressed context closes,
    (none - compressed) / (none - full); None when the open-book gain (none - full) is under
    ``min_gain`` nats/token: report the absolute losses then, not a ratio of noise."""
    gain = loss_none - loss_full
    if not gain >= min_gain:  # also NaN
        return None
    return (loss_none - loss_compressed) / gain


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
