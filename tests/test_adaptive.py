"""Entropy-adaptive pooling: allocation under a vector budget, chunk scores, plans, training mix."""

import math
import random

import pytest
import torch

from arc_encoder.adaptive import (
    AdaptivePooling,
    allocate_pooling,
    decoder_bits,
    plan_pooling,
    vectors_for,
    zlib_bits,
    zlib_scorer,
)
from arc_encoder.model import ARCModel
from arc_encoder.objectives import decoder_loss
from arc_encoder.samples import collate, mixed_pooling, text_sample
from conftest import TEXT, make_model


def _budget(tokens, target):
    return sum(math.ceil(n / target) for n in tokens)


def test_equal_density_gives_the_target_everywhere():
    tokens = [64] * 9
    assert allocate_pooling([300.0] * 9, tokens, (2, 4, 8), 4) == [4] * 9


def test_denser_chunks_get_finer_factors_within_budget():
    tokens = [64] * 6
    bits = [100, 200, 300, 400, 600, 900]  # bits per chunk, increasing density
    for strength in (1.0, 2.0, 4.0):
        f = allocate_pooling(bits, tokens, (2, 4, 8), 4, strength)
        assert f == sorted(f, reverse=True)  # monotone: denser -> finer
        assert sum(vectors_for(n, x) for n, x in zip(tokens, f)) <= _budget(tokens, 4)
    assert allocate_pooling(bits, tokens, (2, 4, 8), 4, 2.0)[0] == 8
    assert allocate_pooling(bits, tokens, (2, 4, 8), 4, 2.0)[-1] == 2
    assert allocate_pooling(bits, tokens, (2, 4, 8), 4, 0.0) == [4] * 6  # strength 0: uniform


def test_random_inputs_never_exceed_and_nearly_use_the_budget():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(1, 40)
        tokens = [rng.randint(1, 100) for _ in range(n)]
        bits = [rng.uniform(0.5, 9) * t for t in tokens]
        target = rng.choice([2.5, 4, 6])
        f = allocate_pooling(bits, tokens, (2, 4, 8), target, rng.choice([0.5, 1, 3]))
        used = sum(vectors_for(t, x) for t, x in zip(tokens, f))
        budget = _budget(tokens, target)
        assert used <= budget
        # No single refinement would still fit (the greedy repair used the slack).
        for t, x in zip(tokens, f):
            if x > 2:
                assert used + vectors_for(t, x // 2) - vectors_for(t, x) > budget


def test_allocation_errors():
    with pytest.raises(ValueError, match="2 scores for 1 chunks"):
        allocate_pooling([1, 2], [3], (2, 4), 3)
    with pytest.raises(ValueError, match="within factors"):
        AdaptivePooling((2, 4), 8)
    with pytest.raises(ValueError, match="density"):
        AdaptivePooling(density="gzip")  # type: ignore[arg-type]


def test_zlib_scores_repetition_low():
    assert zlib_bits("abc " * 50) < zlib_bits(TEXT[:200]) / 2
    assert zlib_scorer(["x", "y"]) == [zlib_bits("x"), zlib_bits("y")]


def test_decoder_bits_match_the_no_context_reconstruction_loss(tokenizer):
    model, decoder = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), dec_vocab=len(tokenizer))
    texts = [TEXT[:80], TEXT[100:150]]
    bits = decoder_bits(decoder, tokenizer, texts, batch_size=1)
    samples = [text_sample(tokenizer(t, add_special_tokens=False)["input_ids"], [5], tokenizer, tokenizer, True)
               for t in texts]
    for s, b in zip(samples, bits):
        batch = collate([s], "dec", "reconstruction", tokenizer.bos_token_id)
        with torch.no_grad():
            loss = decoder_loss(decoder, model.decoder_inputs(decoder, batch, "none", "reconstruction"))
        assert b == pytest.approx(float(loss) * len(s.context_ids) / math.log(2), rel=1e-4)


def test_plan_pooling_respects_training_and_budget(tokenizer):
    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), chunk_len=16)
    with pytest.raises(ValueError, match="never trained"):
        plan_pooling(model, [[5] * 20], AdaptivePooling((2, 4, 8), 4), zlib_scorer)
    model, _ = make_model(tokenizer=tokenizer, vocab_size=len(tokenizer), chunk_len=16, pooling_factors=(2, 4, 8))
    dense = tokenizer(TEXT[:300], add_special_tokens=False)["input_ids"][:48]
    boring = [tokenizer.convert_tokens_to_ids("Ġthe")] * 40
    plan = plan_pooling(model, [dense, boring], AdaptivePooling((2, 4, 8), 4, strength=2.0), zlib_scorer)
    assert [len(p) for p in plan] == [3, 3]
    assert max(plan[1]) == 8 and min(plan[0]) <= 4  # repetition is coarsened, real text kept finer
    fixed = model.compress([dense, boring], "dec")
    adaptive = model.compress([dense, boring], "dec", pooling_factors=plan)
    assert int(adaptive.lengths.sum()) <= int(fixed.lengths.sum())


def test_mixed_pooling_is_deterministic_and_uses_every_factor():
    a = mixed_pooling(7, 64, (2, 4, 8))
    assert a == mixed_pooling(7, 64, (2, 4, 8)) and a != mixed_pooling(8, 64, (2, 4, 8))
    assert set(a) == {2, 4, 8}
    with pytest.raises(ValueError):
        mixed_pooling(0, 3, ())
