"""Corpus BLEU over token sequences: how close a greedy reconstruction is to its text.

Teacher-forced token accuracy says how often the next token is right given the true prefix;
a greedy reconstruction can drift after one error. BLEU-4 (Papineni et al. 2002, as
sacrebleu computes its corpus score with no smoothing) scores the free-running output: the
geometric mean of clipped 1..4-gram precisions pooled over the corpus, times a brevity
penalty exp(1 - r / c) when the hypotheses are shorter than the references (c < r).
Sequences are token ids (or any hashable items), so no detokenisation choice enters.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BleuScore:
    """BLEU in [0, 1] with its parts (pooled over the corpus)."""

    bleu: float
    precisions: tuple[float, ...]  # clipped n-gram precision, n = 1 .. max_n
    brevity_penalty: float
    hypothesis_length: int
    reference_length: int


def _ngrams(seq: Sequence[Hashable], n: int) -> Counter:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def corpus_bleu(hypotheses: Sequence[Sequence[Hashable]], references: Sequence[Sequence[Hashable]],
                max_n: int = 4) -> BleuScore:
    """Corpus BLEU of ``hypotheses`` against one reference each (no smoothing: a zero precision
    gives 0)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("corpus_bleu needs at least one hypothesis")
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp, ref = list(hyp), list(ref)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    precisions = tuple(m / t if t else 0.0 for m, t in zip(matches, totals))
    if hyp_len == 0:
        return BleuScore(0.0, precisions, 0.0, 0, ref_len)
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    if min(precisions) == 0.0:
        return BleuScore(0.0, precisions, bp, hyp_len, ref_len)
    bleu = bp * math.exp(sum(math.log(p) for p in precisions) / max_n)
    return BleuScore(bleu, precisions, bp, hyp_len, ref_len)
