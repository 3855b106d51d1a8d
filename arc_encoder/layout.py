"""The decoder-input layout: compressed documents, markers and tokens in one ``inputs_embeds`` row.

A pure function of its inputs (no model, no projector): ``build_decoder_inputs`` is handed the
decoder's embedding table, the compressed context and the projected marker embedding, and lays
out per sample, as the reference (kyutai-labs/ARC-Encoder, ``augmented_model.py``) does:

    [prefix tokens] [document 1][marker] [document 2][marker] ... [prompt tokens] [target tokens]

The marker (the projector's ``continuation``, or ``reconstruction`` for the reconstruction task)
follows EVERY compressed document; the chunks of one long document are concatenated with no token
between them; no marker embedding (a projector without that special token, the paper's
long-context setting) puts none. The prefix is the decoder's BOS where its projector's policy puts
one (``decoders.decoder_prefix``). Labels are the target ids; every other position is
``IGNORE_INDEX``, so only target tokens carry loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .chunking import TokenIds

IGNORE_INDEX = -100  # labels of positions that carry no loss (torch's cross_entropy default)


@dataclass
class CompressedContext:
    """Compressed contexts in one decoder's embedding space, padded to the longest row.

    A row holds one or several documents (e.g. retrieved passages), concatenated;
    ``doc_lengths`` records each document's vector count so that the decoder input puts a
    special token after every document. None: one document per row.
    """

    embeddings: torch.Tensor  # [batch, max_len, decoder_dim]
    lengths: torch.Tensor  # [batch], long: valid vectors per row
    decoder: str
    doc_lengths: list[list[int]] | None = None  # per row, per document: vectors (host ints)

    def __post_init__(self) -> None:
        if self.doc_lengths is not None:
            if len(self.doc_lengths) != self.embeddings.shape[0]:
                raise ValueError(f"doc_lengths has {len(self.doc_lengths)} rows but the context batch has "
                                 f"{self.embeddings.shape[0]}")
            if any(n < 1 for row in self.doc_lengths for n in row):
                raise ValueError("a compressed document has at least one vector")

    def unpad(self) -> list[torch.Tensor]:
        """One [length_b, decoder_dim] tensor per sample."""
        return [e[:n] for e, n in zip(self.embeddings, self.lengths.tolist())]

    def document_lengths(self) -> list[list[int]]:
        """Per row, the vector count of each document (one host copy of ``lengths`` when not recorded)."""
        if self.doc_lengths is not None:
            return [list(row) for row in self.doc_lengths]
        return [[n] if n else [] for n in self.lengths.tolist()]

    @classmethod
    def from_list(cls, items: Sequence[torch.Tensor], decoder: str) -> CompressedContext:
        """One row per tensor, each row one document."""
        if not items:
            raise ValueError("no compressed contexts given")
        lengths = torch.tensor([t.shape[0] for t in items], dtype=torch.long)
        if len(items) > 1 and all(t.shape == items[0].shape for t in items):
            embeddings = torch.stack(list(items))  # the common case: one chunk size per batch
        else:
            embeddings = nn.utils.rnn.pad_sequence(list(items), batch_first=True)
        return cls(embeddings, lengths, decoder)

    @classmethod
    def from_documents(cls, rows: Sequence[Sequence[torch.Tensor]], decoder: str) -> CompressedContext:
        """One row per list of documents ([vectors, decoder_dim] each), concatenated in order."""
        for i, docs in enumerate(rows):
            if len(docs) == 0:
                raise ValueError(f"row {i} has no documents")
        ctx = cls.from_list([torch.cat(list(docs)) if len(docs) > 1 else docs[0] for docs in rows], decoder)
        ctx.doc_lengths = [[d.shape[0] for d in docs] for docs in rows]
        ctx.__post_init__()
        return ctx

    @classmethod
    def empty(cls, batch: int, width: int, decoder: str, like: torch.Tensor) -> CompressedContext:
        """``batch`` rows without vectors (no-context and full-text baselines), on ``like``'s device and dtype."""
        return cls(like.new_zeros(batch, 0, width), torch.zeros(batch, dtype=torch.long), decoder)


@dataclass
class DecoderInputs:
    """What a frozen HF decoder consumes instead of token ids."""

    inputs_embeds: torch.Tensor  # [batch, seq, decoder_dim]
    attention_mask: torch.Tensor  # [batch, seq], long
    labels: torch.Tensor | None  # [batch, seq], IGNORE_INDEX off-target


def build_decoder_inputs(
    decoder_embeddings: nn.Embedding,
    context: CompressedContext,
    prompt_ids: Sequence[TokenIds],
    target_ids: Sequence[TokenIds] | None = None,
    marker_embedding: torch.Tensor | None = None,
    prefix_ids: Sequence[TokenIds] | None = None,
    padding_side: str = "right",
    skip_first_target: Sequence[bool] | None = None,
) -> DecoderInputs:
    """Lay out [prefix][doc 1][marker][doc 2][marker]...[prompt][target] per sample, padded.

    ``marker_embedding`` ([decoder_dim], the projected special token) follows every document of
    ``context`` (its ``document_lengths``); None puts none. Right padding for training, left
    padding for generation. Labels are the target ids (IGNORE_INDEX elsewhere) and are None when
    no targets are given; ``skip_first_target[b]`` leaves row b's first target token unlabelled
    (see ``ARCModel.decoder_inputs``).
    """
    batch = context.embeddings.shape[0]
    for name, seqs in (("prompt_ids", prompt_ids), ("target_ids", target_ids), ("prefix_ids", prefix_ids),
                       ("skip_first_target", skip_first_target)):
        if seqs is not None and len(seqs) != batch:
            raise ValueError(f"{name} has {len(seqs)} rows but the context batch has {batch}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    weight = decoder_embeddings.weight
    device, dtype = weight.device, weight.dtype
    vocab = weight.shape[0]
    # Everything is laid out on the host from Python lists (at most one device sync, for
    # the context lengths), then moved once: per-row device work would stall the GPU queue.
    ctx_len = context.lengths.tolist()
    docs = context.document_lengths()
    for b, (row, n) in enumerate(zip(docs, ctx_len)):
        if sum(row) != n:
            raise ValueError(f"row {b}: documents of {row} vectors do not add up to its {n} vectors")
    has_marker = int(marker_embedding is not None)
    rows = []
    for b in range(batch):
        prefix = list(prefix_ids[b]) if prefix_ids is not None else []
        prompt = list(prompt_ids[b])
        target = list(target_ids[b]) if target_ids is not None else []
        tokens = prefix + prompt + target
        if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
            raise ValueError(f"row {b}: token id out of the decoder's vocabulary [0, {vocab})")
        rows.append((prefix, prompt, target))
    totals = [len(p) + ctx_len[b] + has_marker * len(docs[b]) + len(q) + len(t)
              for b, (p, q, t) in enumerate(rows)]
    longest = max(totals)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    ctx_rows, ctx_pos, ctx_src, marker_rows, marker_pos = [], [], [], [], []
    for b, (prefix, prompt, target) in enumerate(rows):
        start = 0 if padding_side == "right" else longest - totals[b]
        mask[b, start : start + totals[b]] = 1
        pos = start
        ids[b, pos : pos + len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        pos += len(prefix)
        src = 0
        for n in docs[b]:  # each document's vectors, then its marker
            ctx_rows += [b] * n
            ctx_pos += range(pos, pos + n)
            ctx_src += range(src, src + n)
            pos, src = pos + n, src + n
            if has_marker:
                marker_rows.append(b)
                marker_pos.append(pos)
                pos += 1
        tail = prompt + target
        ids[b, pos : pos + len(tail)] = torch.tensor(tail, dtype=torch.long)
        if target:
            skip = int(skip_first_target is not None and bool(skip_first_target[b]))
            first = pos + len(prompt) + skip
            labels[b, first : pos + len(tail)] = torch.tensor(target[skip:], dtype=torch.long)
    embeds = decoder_embeddings(ids.to(device))  # [batch, longest, dim]; pads/ctx slots overwritten
    if ctx_rows:
        cdev = context.embeddings.device  # cached contexts may live elsewhere (e.g. CPU mmap)
        src = context.embeddings[torch.tensor(ctx_rows, device=cdev), torch.tensor(ctx_src, device=cdev)]
        embeds = embeds.index_put(
            (torch.tensor(ctx_rows, device=device), torch.tensor(ctx_pos, device=device)),
            src.to(device=device, dtype=dtype),
        )
    if marker_pos:
        special = marker_embedding.to(dtype).expand(len(marker_pos), -1)
        embeds = embeds.index_put(
            (torch.tensor(marker_rows, device=device), torch.tensor(marker_pos, device=device)), special
        )
    embeds = embeds * mask.to(device=device, dtype=dtype)[..., None]  # zero padding slots
    mask, labels = mask.to(device), labels.to(device)
    return DecoderInputs(embeds, mask, labels if target_ids is not None else None)
