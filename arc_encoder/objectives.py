"""The one token-scoring core: the frozen decoder's next-token predictions, scored.

Training (``ARCModel.forward``), validation (``arc_encoder.metrics``), ``arc_encoder.info`` and
``arc_encoder.adaptive`` all score text the same way: ``next_token_logits`` runs the decoder
once (``use_cache=False``: scoring needs no KV cache, and HF builds one by default, even in
training) and shifts logits against labels; ``mean_loss`` / ``token_nll`` / ``target_scores``
turn them into a loss, per-token NLL, or per-row sums. Only labelled tokens count
(``IGNORE_INDEX`` elsewhere). Below the model: it scores decoder inputs, whoever laid them out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .layout import IGNORE_INDEX, DecoderInputs

ContextMode = Literal["compressed", "none", "full"]
Targets = Literal["task", "continuation", "reconstruction"]


# ---------------------------------------------------------------------------- the core
def next_token_logits(
    decoder: PreTrainedModel,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decoder once; return float32 logits [b, k, vocab] and the labels [b, k] they predict.

    Only the k positions that predict a label in some row get logits (HF's ``logits_to_keep``):
    a pretraining window's context and padding need none, and a 262k-token vocabulary (Gemma 3)
    would otherwise materialise tens of GB of logits it never scores. Unlabelled entries in the
    kept columns are ``IGNORE_INDEX`` as before; a decoder without ``logits_to_keep`` gets all
    s-1 positions.
    """
    shifted = labels[:, 1:]  # position p predicts label p + 1
    kwargs = {}
    wanted = (shifted != IGNORE_INDEX).any(0)  # [s-1]
    if _keeps_logits(decoder) and not bool(wanted.all()):
        keep = wanted.nonzero().squeeze(1)
        kwargs["logits_to_keep"] = keep
        shifted = shifted[:, keep]
    logits = decoder(
        input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, **kwargs
    ).logits
    if "logits_to_keep" not in kwargs:
        logits = logits[:, :-1]
    return logits.float(), shifted


_KEEPS_LOGITS: dict[type, bool] = {}


def _keeps_logits(decoder: PreTrainedModel) -> bool:
    """Whether the decoder's forward takes ``logits_to_keep`` (every HF causal LM of transformers >= 4.50)."""
    cls = type(decoder)
    if cls not in _KEEPS_LOGITS:
        import inspect

        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return _KEEPS_LOGITS[cls]


def predict(decoder: PreTrainedModel, inputs: DecoderInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``next_token_logits`` for decoder inputs laid out by ``arc_encoder.layout``."""
    if inputs.labels is None:
        raise ValueError("scoring needs labels (pass target_ids)")
    return next_token_logits(decoder, inputs.labels, inputs.attention_mask, inputs_embeds=inputs.inputs_embeds)


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (the training loss)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats [b, s], exactly 0 off the labelled tokens."""
    on = labels != IGNORE_INDEX
    return F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * on


def decoder_loss(decoder: PreTrainedModel, inputs: DecoderInputs) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens of ``inputs``."""
    return mean_loss(*predict(decoder, inputs))


@dataclass
class RowScores:
    """Per-row sums over target tokens (nats), so any set of rows can be pooled exactly."""

    nll: list[float]
    tokens: list[int]
    correct: list[int]
    prefix_exact: list[bool]  # the first k targets all predicted (greedy reproduces them)
    # The first half (ceil) of each row's targets alone: lets a benchmark choose on one half
    # of the tokens and measure on the other (no selection on the scored labels).
    nll_head: list[float] = dataclasses.field(default_factory=list)
    tokens_head: list[int] = dataclasses.field(default_factory=list)

    def tail(self) -> RowScores:
        """The second half of each row's targets (what ``nll_head`` did not see)."""
        return RowScores([a - b for a, b in zip(self.nll, self.nll_head)],
                         [a - b for a, b in zip(self.tokens, self.tokens_head)], [], [])


@torch.no_grad()
def target_scores(decoder: PreTrainedModel, inputs: DecoderInputs, em_k: int = 4) -> RowScores:
    """Per-row NLL, token count, argmax hits and k-prefix exact match over the labelled tokens."""
    if inputs.labels is None:
        raise ValueError("target_scores needs labels")
    logits, labels = predict(decoder, inputs)
    on = labels != IGNORE_INDEX
    nll = token_nll(logits, labels)
    hit = (logits.argmax(-1) == labels) & on
    # The first k labelled positions of each row: rank labelled positions left to right.
    rank = on.long().cumsum(-1)
    first_k = on & (rank <= em_k)
    prefix_exact = (hit & first_k).sum(-1) == first_k.sum(-1)
    head = on & (rank <= (on.sum(-1, keepdim=True) + 1) // 2)
    stacked = torch.stack([nll.sum(-1), on.sum(-1).float(), hit.sum(-1).float(), prefix_exact.float(),
                           (nll * head).sum(-1), head.sum(-1).float()]).cpu()
    return RowScores(stacked[0].tolist(), [int(x) for x in stacked[1]], [int(x) for x in stacked[2]],
                     [bool(x) for x in stacked[3]], stacked[4].tolist(), [int(x) for x in stacked[5]])
