"""BLEU-4 and gap-closed: numbers computed by hand."""

import math

import pytest

from arc_encoder.bleu import corpus_bleu
from arc_encoder.metrics import gap_closed


def test_bleu_hand_computed():
    assert corpus_bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]]).bleu == pytest.approx(1.0)
    # one substitution at the end: 4/5, 3/4, 2/3, 1/2 of the n-grams match
    s = corpus_bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 6]])
    assert s.precisions == pytest.approx((4 / 5, 3 / 4, 2 / 3, 1 / 2))
    assert s.bleu == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25) and s.brevity_penalty == 1.0
    # too short: every n-gram matches, the brevity penalty exp(1 - 6/4) remains
    short = corpus_bleu([[1, 2, 3, 4]], [[1, 2, 3, 4, 5, 6]])
    assert short.bleu == pytest.approx(math.exp(-0.5)) and short.hypothesis_length == 4
    # clipping: a repeated token counts at most as often as in the reference
    assert corpus_bleu([[7, 7, 7, 7]], [[7, 1, 2, 3]], max_n=1).bleu == pytest.approx(0.25)
    # pooled over the corpus, not averaged per sentence: unigram matches 2 + 1 of 3 + 2
    pooled = corpus_bleu([[1, 2, 9], [5, 6]], [[1, 2, 3], [5, 7]], max_n=1)
    assert pooled.bleu == pytest.approx(3 / 5)
    assert corpus_bleu([[1, 2, 3, 4]], [[5, 6, 7, 8]]).bleu == 0.0  # no smoothing
    assert corpus_bleu([[]], [[1, 2]]).bleu == 0.0
    with pytest.raises(ValueError, match="hypotheses"):
        corpus_bleu([[1]], [])
    with pytest.raises(ValueError, match="max_n"):
        corpus_bleu([[1]], [[1]], max_n=0)


def test_gap_closed_only_with_a_real_open_book_gain():
    assert gap_closed(3.0, 2.0, 2.25) == pytest.approx(0.75)
    assert gap_closed(3.0, 2.9, 2.95) is None  # gain 0.1 < 0.2 nats: no ratio
    assert gap_closed(3.0, 2.9, 2.95, min_gain=0.05) == pytest.approx(0.5)
    assert gap_closed(float("nan"), 2.0, 2.0) is None
