"""Entropy-adaptive compression: more vectors for dense text, fewer for predictable text.

A fixed pooling factor spends the same number of vectors on a boilerplate licence header as
on a dense API table. Here every chunk gets its own factor from a set the encoder was trained
with (``EncoderConfig.pooling_factors``, mixed-pooling training), under a vector budget equal
to fixed pooling at ``target`` (so the average rate is the same as the fixed baseline's):

1. score each chunk's information content in bits: ``zlib`` (compressed size of its text; no
   model, free) or ``decoder_nll`` (the frozen decoder's negative log-likelihood of the text,
   in bits: what the decoder cannot predict on its own, the quantity the vectors must carry);
2. give chunk i a share of the budget proportional to ``tokens_i * density_i ** strength``
   (strength 1: every vector carries the same number of bits; 0: uniform), i.e. an ideal
   factor ``tokens_i / vectors_i``, snapped to the nearest allowed factor in log space;
3. repair the budget greedily: coarsen the least dense chunks while over budget, then refine
   the densest chunks while a refinement still fits.

Pure functions over token counts and scores, plus ``plan_pooling`` that applies them to an
``ARCModel``'s chunks. The resulting per-chunk plan goes to ``ARCModel.compress(...,
pooling_factors=plan)`` and is recorded per document by the cache.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch

from .config import is_int
from .objectives import IGNORE_INDEX, next_token_logits, token_nll

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .model import ARCModel
    from .chunking import TokenIds

Density = Literal["zlib", "decoder_nll"]
ChunkScorer = Callable[[Sequence[str]], list[float]]  # chunk texts -> information in bits

_ZLIB_EMPTY = len(zlib.compress(b"", 9))


@dataclass
class AdaptivePooling:
    """Per-chunk pooling under the vector budget of fixed pooling at ``target``."""

    factors: tuple[int, ...] = (2, 4, 8)
    target: float = 4.0
    density: Density = "zlib"
    strength: float = 1.0

    def __post_init__(self) -> None:
        self.factors = tuple(sorted(set(self.factors)))
        if not self.factors or not all(is_int(f, 1) for f in self.factors):
            raise ValueError(f"factors must be integers >= 1, got {self.factors}")
        if not self.factors[0] <= self.target <= self.factors[-1]:
            raise ValueError(f"target={self.target} must lie within factors [{self.factors[0]}, {self.factors[-1]}]")
        if self.density not in get_args(Density):
            raise ValueError(f"density={self.density!r} is not one of {list(get_args(Density))}")
        if not 0.0 <= self.strength <= 8.0:
            raise ValueError(f"strength must be in [0, 8], got {self.strength}")


def zlib_bits(text: str) -> float:
    """Bits of ``text`` after zlib (level 9), minus the empty stream's fixed overhead."""
    return 8.0 * max(1, len(zlib.compress(text.encode("utf-8"), 9)) - _ZLIB_EMPTY)


def zlib_scorer(texts: Sequence[str]) -> list[float]:
    return [zlib_bits(t) for t in texts]


@torch.no_grad()
def decoder_bits(
    decoder: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """Total negative log-likelihood (bits) of each text under ``decoder``, BOS-prefixed, no context."""
    device = next(decoder.parameters()).device
    bos = tokenizer.bos_token_id
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        rows = tokenizer(list(texts[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        rows = [([bos] if bos is not None else []) + r for r in rows]
        longest = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        nll = token_nll(*next_token_logits(decoder, labels, mask, input_ids=ids))
        out += (nll.sum(-1) / math.log(2)).tolist()
    return out


def decoder_scorer(decoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16) -> ChunkScorer:
    return lambda texts: decoder_bits(decoder, tokenizer, texts, batch_size)


def vectors_for(tokens: int, factor: int) -> int:
    return -(-tokens // factor)


def allocate_pooling(
    bits: Sequence[float],
    tokens: Sequence[int],
    factors: Sequence[int],
    target: float,
    strength: float = 1.0,
) -> list[int]:
    """One factor per chunk: total vectors <= those of fixed pooling at ``target`` (module doc)."""
    if len(bits) != len(tokens):
        raise ValueError(f"{len(bits)} scores for {len(tokens)} chunks")
    if not tokens:
        return []
    if any(n < 1 for n in tokens):
        raise ValueError("every chunk needs at least one token")
    fs = sorted(set(factors))
    budget = sum(math.ceil(n / target) for n in tokens)
    density = [max(b, 1e-9) / n for b, n in zip(bits, tokens)]
    weight = [n * d**strength for n, d in zip(tokens, density)]
    total_w = sum(weight)
    level = []
    for n, w in zip(tokens, weight):
        ideal = n / max(budget * w / total_w, 1e-9)  # ideal factor: tokens per allotted vector
        level.append(min(range(len(fs)), key=lambda k: (abs(math.log(fs[k] / ideal)), -fs[k])))
    used = sum(vectors_for(n, fs[k]) for n, k in zip(tokens, level))
    # Least dense first for coarsening, densest first for refining (index breaks ties).
    order = sorted(range(len(tokens)), key=lambda i: (density[i], i))
    for _ in range(len(fs)):
        for i in order:
            if used <= budget:
                break
            if level[i] < len(fs) - 1:
                used -= vectors_for(tokens[i], fs[level[i]]) - vectors_for(tokens[i], fs[level[i] + 1])
                level[i] += 1
    for _ in range(len(fs)):
        for i in reversed(order):
            if level[i] > 0:
                cost = vectors_for(tokens[i], fs[level[i] - 1]) - vectors_for(tokens[i], fs[level[i]])
                if used + cost <= budget:
                    used += cost
                    level[i] -= 1
    return [fs[k] for k in level]


def chunk_scorer(policy: AdaptivePooling, decoder=None, decoder_tokenizer=None) -> ChunkScorer:
    """The scorer ``policy.density`` names (``decoder_nll`` needs the frozen decoder and its tokenizer)."""
    if policy.density == "zlib":
        return zlib_scorer
    if decoder is None or decoder_tokenizer is None:
        raise ValueError("density='decoder_nll' needs the decoder and its tokenizer")
    return decoder_scorer(decoder, decoder_tokenizer)


def plan_pooling(
    model: ARCModel, contexts: Sequence[TokenIds], policy: AdaptivePooling, scorer: ChunkScorer
) -> list[list[int]]:
    """Per context, one pooling factor per chunk (for ``model.compress(..., pooling_factors=)``)."""
    model.encoder.config.check_trained(policy.factors, "adaptive ")
    if model.tokenizer is None:
        raise ValueError("plan_pooling needs the model's tokenizer (chunk texts are scored)")
    chunks = [model.chunk(ids, i) for i, ids in enumerate(contexts)]
    flat = [c for cs in chunks for c in cs]
    bits = scorer(model.tokenizer.batch_decode(flat))
    factors = allocate_pooling(bits, [len(c) for c in flat], policy.factors, policy.target, policy.strength)
    plan, k = [], 0
    for cs in chunks:
        plan.append(factors[k : k + len(cs)])
        k += len(cs)
    return plan
