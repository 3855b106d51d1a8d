"""Next-token scores at labelled positions only: the LM head never sees a position nobody scores.

A causal LM's forward pass returns logits for every position: ``[batch, seq, vocab]`` float.
With a large vocabulary that tensor, not the model, is what fills memory and time: Gemma 3's
262,144-token head turns a 16 x 513 probe batch into 8.6 GB of float32 logits, and its head
costs more FLOPs per token (2 x 640 x 262,144) than its 18 layers. Scoring needs logits only
where a label is, so ``labelled_logits`` / ``labelled_nll`` run the decoder's BODY to hidden
states, pick the positions that predict a labelled token, and apply the head there, in chunks
of positions (``chunk_size``; default: at most 256 MiB of float32 logits per chunk).

Labels follow ``objectives.next_token_logits``: ``labels[b, j]`` is the token at position j
(``IGNORE_INDEX`` where nothing is scored), predicted from position ``j - 1``; ``labels[:, 0]``
is never scored.

The head is the model's own output embedding applied to the body's last hidden state (which,
for Hugging Face causal LMs, is after the final norm), followed by the transform that the
model's ``forward`` applies to its logits: ``final_logit_softcapping`` (Gemma 2/3:
``cap * tanh(logits / cap)``), ``logit_scale`` (Cohere: times it) or ``logits_scaling``
(Granite: divided by it). ``logit_head`` finds these; ``LogitHead.matches`` checks them
against the model's own forward pass on a few tokens, so a model family with yet another
transform is caught (the probe then falls back to the full forward pass). Modules that are not
Hugging Face causal LMs with a separate body and head (test oracles) always take the full
forward pass; the numbers are the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layout import IGNORE_INDEX
LOGIT_CHUNK_BYTES = 256 * 2**20  # float32 logits per head chunk: 256 positions of a 262k vocabulary


@dataclass
class LogitHead:
    """A causal LM split into body (ids/embeddings -> last hidden state) and head (hidden -> logits)."""

    body: nn.Module
    head: nn.Module
    softcap: float | None = None  # final_logit_softcapping: cap * tanh(logits / cap)
    scale: float = 1.0  # logit_scale (multiplies) or 1 / logits_scaling (divides)

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    def hidden(self, attention_mask=None, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """The body's last hidden state [b, s, d] (after the final norm)."""
        out = self.body(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise ValueError(f"{type(self.body).__name__} returned no last_hidden_state: it is not the body of a "
                             "causal LM (score with head=False)")
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``hidden`` [..., d] -> [..., vocab], transformed as the model's forward does."""
        logits = self.head(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    @torch.no_grad()
    def matches(self, decoder: nn.Module, input_ids: torch.Tensor) -> bool:
        """Do body + head give the model's own logits for ``input_ids`` [b, s] (a few tokens suffice)?

        Same computation, so the only differences are rounding: 1e-4 of the largest logit in float32,
        2e-2 in 16-bit weights. A missed transform (a scale, a cap) is far larger.
        """
        ref = decoder(input_ids=input_ids, use_cache=False).logits.float()
        ours = self.logits(self.hidden(input_ids=input_ids))
        rtol = 1e-4 if self.head.weight.dtype == torch.float32 else 2e-2
        return ours.shape == ref.shape and bool((ours - ref).abs().max() <= 1e-5 + rtol * ref.abs().max())


def logit_head(decoder: nn.Module) -> LogitHead | None:
    """``decoder``'s body and head (a Hugging Face causal LM: ``base_model`` and ``get_output_embeddings``),
    or None when it has no separate head to apply (callers then use the full forward pass)."""
    get_head = getattr(decoder, "get_output_embeddings", None)
    body = getattr(decoder, "base_model", None)
    head = get_head() if callable(get_head) else None
    if body is None or body is decoder or not isinstance(head, nn.Module) or getattr(head, "weight", None) is None:
        return None
    config = getattr(decoder, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        scale /= float(scaling)
    return LogitHead(body, head, float(softcap) if softcap else None, scale)


def _chunk_size(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab))


def _targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[b, s-1] bool: positions j whose next token labels[:, j + 1] is scored."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got {tuple(labels.shape)}")
    on = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None:
        on = on & attention_mask[:, 1:].bool()
    return on


def _hidden_or_logits(decoder, head, labels, attention_mask, input_ids, inputs_embeds):
    """The [n, d] hidden states (or, without a head, the [n, vocab] float logits) at scored positions."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    on = _targets(labels, attention_mask)
    if head is None:
        logits = decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         use_cache=False).logits
        return logits[:, :-1][on].float(), on
    hidden = head.hidden(attention_mask, input_ids, inputs_embeds)  # [b, s, d]
    return hidden[:, :-1][on], on  # [n, d]


def labelled_logits(
    decoder: nn.Module,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    head: LogitHead | None | bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits [n, vocab] at the n positions that predict a labelled token, and those labels [n].

    Rows in order, positions in order within a row (``labels[:, 1:][mask]``). ``head``: True finds
    the decoder's head (``logit_head``), a ``LogitHead`` uses that one, False/None the full forward
    pass. Gradients flow (no ``no_grad`` here). For a loss over many positions use ``labelled_nll``,
    which never holds more than one chunk of logits.
    """
    head = logit_head(decoder) if head is True else (head or None)
    states, on = _hidden_or_logits(decoder, head, labels, attention_mask, input_ids, inputs_embeds)
    targets = labels[:, 1:][on]
    return (states if head is None else head.logits(states)), targets


def _chunk_nll(head: LogitHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head.logits(hidden), targets, reduction="none")


def labelled_nll(
    decoder: nn.Module,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    head: LogitHead | None | bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token NLL [b, s-1] (float32, nats) of ``labels[:, 1:]``; 0 where nothing is scored.

    Cross-entropy is computed ``chunk_size`` positions at a time from the hidden states, so at most
    one chunk of float32 logits exists at once. With gradients on, each chunk is checkpointed: its
    logits are recomputed in the backward pass instead of being kept, so a training loss over a
    262k vocabulary also holds one chunk. ``head`` as in ``labelled_logits``.
    """
    head = logit_head(decoder) if head is True else (head or None)
    states, on = _hidden_or_logits(decoder, head, labels, attention_mask, input_ids, inputs_embeds)
    targets = labels[:, 1:][on]
    if head is None:
        nll = F.cross_entropy(states, targets, reduction="none")
    else:
        size = _chunk_size(head.vocab_size, chunk_size)
        parts = []
        for start in range(0, states.shape[0], size):
            h, y = states[start : start + size], targets[start : start + size]
            if torch.is_grad_enabled() and h.requires_grad:
                from torch.utils.checkpoint import checkpoint

                parts.append(checkpoint(_chunk_nll, head, h, y, use_reentrant=False))
            else:
                parts.append(_chunk_nll(head, h, y))
        nll = torch.cat(parts) if parts else states.new_zeros(0, dtype=torch.float32)
    # masked_scatter fills rows in order, positions in order: the order ``targets`` was taken in.
    return torch.zeros(on.shape, dtype=torch.float32, device=nll.device).masked_scatter(on, nll.float())
