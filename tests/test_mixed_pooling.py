"""Per-row / per-chunk pooling factors: the basis of entropy-adaptive compression."""

import pytest
import torch

from arc_encoder import EncoderConfig
from conftest import make_encoder, make_model


def _valid(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_mixed_rows_equal_each_row_alone(family):
    enc = make_encoder(family, pooling_factor=4).eval()
    lengths, n = [11, 7, 9], 11
    ids = torch.randint(3, 99, (3, n))
    mask = _valid(lengths, n)
    pfs = [2, 4, 3]
    mixed = enc(ids, mask, pooling_factors=pfs)
    assert mixed.lengths.tolist() == [6, 2, 3]
    assert mixed.hidden_states.shape == (3, 6, 32)
    for b, (length, pf) in enumerate(zip(lengths, pfs)):
        alone = enc(ids[b : b + 1, :length], pooling_factors=pf).hidden_states[0]
        m = -(-length // pf)
        torch.testing.assert_close(mixed.hidden_states[b, :m], alone, atol=1e-5, rtol=1e-5)
        assert mixed.attention_mask[b].sum() == m


def test_uniform_list_matches_config_factor_and_int_override():
    enc = make_encoder("llama", pooling_factor=4).eval()
    ids = torch.randint(3, 99, (2, 9))
    base = enc(ids).hidden_states
    torch.testing.assert_close(enc(ids, pooling_factors=[4, 4]).hidden_states, base)
    assert enc(ids, pooling_factors=8).hidden_states.shape == (2, 2, 32)


def test_bert_mixed_rows_equal_each_row_alone():
    from transformers import BertConfig

    from arc_encoder import ARCEncoder

    cfg = BertConfig(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=29, max_position_embeddings=64)
    enc = ARCEncoder.from_base_model(EncoderConfig(base_model="bert", layers_removed=0, pooling_factor=2,
                                                   chunk_len=64), backbone_config=cfg).eval()
    ids = torch.randint(3, 97, (2, 10))
    mixed = enc(ids, _valid([10, 6], 10), pooling_factors=[5, 2])
    for b, (length, pf) in enumerate([(10, 5), (6, 2)]):
        alone = enc(ids[b : b + 1, :length], pooling_factors=pf).hidden_states[0]
        torch.testing.assert_close(mixed.hidden_states[b, : -(-length // pf)], alone, atol=1e-5, rtol=1e-5)


def test_bad_pooling_factors_are_clear_errors():
    enc = make_encoder("llama", pooling_factor=4)
    ids = torch.randint(3, 99, (2, 9))
    with pytest.raises(ValueError, match="2 rows"):
        enc(ids, pooling_factors=[2])
    with pytest.raises(ValueError, match=r"pooling factor 0 is not an integer in \[1, chunk_len"):
        enc(ids, pooling_factors=[2, 0])  # the one pooling-factor check (chunking.check_pooling_factor)
    with pytest.raises(ValueError, match="must be one of"):
        EncoderConfig(base_model="x", pooling_factor=4, pooling_factors=(2, 8))
    with pytest.raises(ValueError, match="duplicates"):
        EncoderConfig(base_model="x", pooling_factor=4, pooling_factors=(4, 4))
    cfg = EncoderConfig(base_model="x", pooling_factor=4, pooling_factors=[8, 2, 4])
    assert cfg.pooling_factors == (2, 4, 8) and cfg.trained_pooling_factors == (2, 4, 8)
    assert EncoderConfig(base_model="x").trained_pooling_factors == (4,)


def test_compress_per_chunk_plan_and_gradients():
    model, _ = make_model(pooling_factor=4, chunk_len=8)
    contexts = [list(range(3, 22)), list(range(5, 12))]  # 19 tokens = chunks 8+8+3; 7 tokens = 1 chunk
    ctx = model.compress(contexts, "dec", pooling_factors=[[2, 8, 4], 1])
    assert ctx.lengths.tolist() == [4 + 1 + 1, 7]
    # The same chunks compressed one at a time give the same vectors.
    parts = [model.compress([contexts[0][0:8]], "dec", 2), model.compress([contexts[0][8:16]], "dec", 8),
             model.compress([contexts[0][16:]], "dec", 4)]
    expect = torch.cat([p.unpad()[0] for p in parts])
    torch.testing.assert_close(ctx.unpad()[0], expect, atol=1e-5, rtol=1e-5)
    ctx.embeddings.sum().backward()
    assert model.encoder.backbone.layers[-1].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="3 chunks but 2"):
        model.compress(contexts, "dec", pooling_factors=[[2, 8], 1])
    with pytest.raises(ValueError, match="1 entries for 2 contexts"):
        model.compress(contexts, "dec", pooling_factors=[4])
