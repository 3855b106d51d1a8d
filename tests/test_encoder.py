import math

import pytest
import torch

from arc_encoder.encoder import GroupPooling, apply_rope
from conftest import FAMILIES, make_encoder


def _valid(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def pool_groups(x, valid, pf, groups="balanced"):
    """Group means along dim -2 of x [batch, ..., n, d] at one pooling factor (the encoder's GroupPooling)."""
    return GroupPooling(valid, x.shape[-2], [pf] * x.shape[0], groups, x.dtype, x.device)(x)


def pooled_attention(enc, layer, hidden, valid, position_embeddings):
    """Only the pooled block's attention (output projection included, no residual): [batch, m, hidden]."""
    pooling = enc._pooling(hidden, valid, None)
    return enc._pooled_attention(layer, hidden, pooling(hidden), valid, pooling, position_embeddings)


@pytest.mark.parametrize("family", FAMILIES)
def test_pf1_attention_equals_backbone_bidirectional_attention(family):
    enc = make_encoder(family, pooling_factor=1).eval()
    layer = enc.backbone.layers[-1]
    hidden = torch.randn(2, 7, 32)
    valid = torch.ones(2, 7, dtype=torch.bool)
    pos = torch.arange(7).expand(2, 7)
    pe = enc.backbone.rotary_emb(hidden, position_ids=pos)
    ours = pooled_attention(enc, layer, hidden, valid, pe)
    theirs, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=pe, attention_mask=None)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pf1_with_residual_equals_whole_bidirectional_backbone(family):
    # last_hidden_state ends in the backbone's final norm: the (non-default) final_norm option
    enc = make_encoder(family, pooling_factor=1, pooled_residual=True, layers_removed=0, final_norm=True).eval()
    ids = torch.randint(3, 99, (2, 7))
    ours = enc(ids).hidden_states
    full = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    theirs = enc.backbone(input_ids=ids, attention_mask=full).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    causal = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7)
    causal_out = enc.backbone(input_ids=ids, attention_mask=causal).last_hidden_state
    assert (ours - causal_out).abs().max() > 1e-3  # the encoder really is bidirectional


def _reference_pooled_attention(enc, layer, hidden, lengths, pf, positions):
    """Explicit float64 loops: mean of each group's queries (fixed groups, short tail), softmax over all valid keys."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden).double()
    hd = attn.head_dim
    out_rows = []
    for b, n_b in enumerate(lengths):
        xb = x[b, :n_b]
        q = (xb @ attn.q_proj.weight.double().T + (attn.q_proj.bias.double() if attn.q_proj.bias is not None else 0)).view(n_b, -1, hd)
        k = (xb @ attn.k_proj.weight.double().T + (attn.k_proj.bias.double() if attn.k_proj.bias is not None else 0)).view(n_b, -1, hd)
        v = (xb @ attn.v_proj.weight.double().T + (attn.v_proj.bias.double() if attn.v_proj.bias is not None else 0)).view(n_b, -1, hd)
        pos = torch.arange(n_b)[None]
        cos, sin = enc.backbone.rotary_emb(hidden, position_ids=pos)
        cos, sin = cos.double(), sin.double()
        rot = lambda t, c, s: apply_rope(t.transpose(0, 1)[None], c, s)[0].transpose(0, 1)
        k = rot(k, cos, sin)
        if positions == "group_mean":
            q = rot(q, cos, sin)
        groups = math.ceil(n_b / pf)
        qp = torch.stack([q[g * pf : min((g + 1) * pf, n_b)].mean(0) for g in range(groups)])
        if positions == "pooled_index":
            c2, s2 = enc.backbone.rotary_emb(hidden, position_ids=torch.arange(groups)[None])
            qp = rot(qp, c2.double(), s2.double())
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("mhd,nhd->hmn", qp, k) / math.sqrt(hd)
        o = torch.einsum("hmn,nhd->mhd", scores.softmax(-1), v).reshape(groups, -1)
        out_rows.append(o @ attn.o_proj.weight.double().T)
    return out_rows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["pooled_index", "group_mean"])
@pytest.mark.parametrize("pf", [3, 4])
def test_pooled_queries_match_explicit_reference(family, positions, pf):
    # The format-1 options: mean of per-token queries over fixed groups with a short tail.
    enc = make_encoder(family, pooling_factor=pf, pooled_query_positions=positions,
                       pooled_query_input="pooled_queries", pooling_groups="fixed_tail").eval()
    layer = enc.backbone.layers[-1]
    lengths = [7, 5]  # 7 and 5 are not multiples of 3 or 4: short tail groups
    hidden = torch.randn(2, 7, 32)
    valid = _valid(lengths, 7)
    pe = enc.backbone.rotary_emb(hidden, position_ids=torch.arange(7).expand(2, 7))
    ours = pooled_attention(enc, layer, hidden, valid, pe)
    ref = _reference_pooled_attention(enc, layer, hidden, lengths, pf, positions)
    for b, r in enumerate(ref):
        torch.testing.assert_close(ours[b, : r.shape[0]].double(), r, atol=1e-5, rtol=1e-4)


def test_pool_groups_tail_mean_ignores_padding():
    x = torch.arange(14, dtype=torch.float32).view(1, 7, 2).repeat(2, 1, 1)
    valid = _valid([7, 5], 7)
    out = pool_groups(x, valid, 4, "fixed_tail")  # groups {0..3}, {4..6} / {4}
    assert out.shape == (2, 2, 2)
    torch.testing.assert_close(out[0, 1], x[0, 4:7].mean(0))
    torch.testing.assert_close(out[1, 1], x[1, 4])  # only token 4 is real in row 1's tail


@pytest.mark.parametrize("pf, lengths, expected", [(4, [7, 5, 1], [2, 2, 1]), (3, [7, 6, 2], [3, 2, 1]), (8, [7, 7, 3], [1, 1, 1])])
def test_output_lengths_and_mask(pf, lengths, expected):
    enc = make_encoder("llama", pooling_factor=pf).eval()
    ids = torch.randint(3, 99, (3, 7))
    out = enc(ids, _valid(lengths, 7))
    assert out.hidden_states.shape == (3, math.ceil(7 / pf), 32)
    assert out.lengths.tolist() == expected
    assert out.attention_mask.sum(-1).tolist() == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_valid_rows(family):
    enc = make_encoder(family, pooling_factor=4).eval()
    short = torch.randint(3, 99, (1, 5))
    alone = enc(short).hidden_states
    padded = torch.cat([short, torch.zeros(1, 6, dtype=torch.long)], 1)
    long = torch.randint(3, 99, (1, 11))
    batch = enc(torch.cat([padded, long]), _valid([5, 11], 11))
    torch.testing.assert_close(batch.hidden_states[0, :2], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.hidden_states[1:2], enc(long).hidden_states, atol=1e-5, rtol=1e-5)


def test_bad_masks_are_clear_errors():
    enc = make_encoder()
    ids = torch.randint(3, 99, (2, 7))
    with pytest.raises(ValueError, match="right-padded"):
        enc(ids, torch.tensor([[0, 1, 1, 1, 1, 1, 1]] * 2))
    with pytest.raises(ValueError, match="empty row"):
        enc(ids, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="shape"):
        enc(ids, torch.ones(2, 6))


def test_unsupported_backbone_is_clear_error():
    from transformers import AutoConfig, AutoModel

    from arc_encoder import ARCEncoder, EncoderConfig

    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=99)
    with pytest.raises(ValueError, match="gpt2"):
        ARCEncoder(EncoderConfig(base_model="x", layers_removed=0), AutoModel.from_config(cfg))


def test_eager_and_sdpa_agree_with_padding():
    outs = []
    for impl in ("eager", "sdpa"):
        enc = make_encoder("llama", attn_implementation=impl).eval()
        outs.append(enc(torch.arange(3, 17).view(2, 7), _valid([7, 4], 7)).hidden_states)
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1, :1], outs[1][1, :1], atol=1e-5, rtol=1e-5)


def _tiny_bert_encoder(pf, chunk_len=64, **cfg):
    from transformers import AutoConfig

    from arc_encoder import ARCEncoder, EncoderConfig

    bert = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(3)
    return ARCEncoder.from_base_model(EncoderConfig(base_model="tiny-bert", pooling_factor=pf, layers_removed=0, chunk_len=chunk_len, **cfg),
                                      backbone_config=bert).eval()


def test_bert_family_pf1_with_residual_equals_backbone():
    enc = _tiny_bert_encoder(1, pooled_residual=True)
    assert enc.family == "bert" and enc.backbone.pooler is None
    ids = torch.randint(3, 99, (2, 7))
    ours = enc(ids).hidden_states
    theirs = enc.backbone(input_ids=ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_bert_family_pooling_and_padding():
    enc = _tiny_bert_encoder(4)
    ids = torch.randint(3, 99, (2, 7))
    out = enc(ids, _valid([7, 5], 7))
    assert out.hidden_states.shape == (2, 2, 32) and out.lengths.tolist() == [2, 2]
    alone = enc(ids[1:, :5]).hidden_states
    torch.testing.assert_close(out.hidden_states[1], alone[0], atol=1e-5, rtol=1e-5)


def test_bert_chunk_len_over_positions_is_clear_error():
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        _tiny_bert_encoder(4, chunk_len=65)


def test_pool_groups_without_mask_equals_all_valid_mask():
    x = torch.randn(2, 3, 7, 5)
    for pf in (1, 3, 4, 8):
        for groups in ("balanced", "fixed_tail"):
            torch.testing.assert_close(pool_groups(x, None, pf, groups),
                                       pool_groups(x, torch.ones(2, 7, dtype=torch.bool), pf, groups))


def _tiny_neox_encoder(pf, **cfg):
    from transformers import AutoConfig

    from arc_encoder import ARCEncoder, EncoderConfig

    neox = AutoConfig.for_model("gpt_neox", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=37, rotary_pct=0.5)  # partial rotary: 4 of 8 dims
    torch.manual_seed(4)
    return ARCEncoder.from_base_model(EncoderConfig(base_model="tiny-neox", pooling_factor=pf, layers_removed=0, **cfg),
                                      backbone_config=neox).eval()


def test_gpt_neox_pf1_with_residual_equals_whole_bidirectional_backbone():
    enc = _tiny_neox_encoder(1, pooled_residual=True, final_norm=True)  # last_hidden_state is final-normed
    assert enc.family == "neox" and enc.blocks[0].use_parallel_residual
    ids = torch.randint(3, 99, (2, 7))
    ours = enc(ids).hidden_states
    full = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    theirs = enc.backbone(input_ids=ids, attention_mask=full).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["pooled_index", "group_mean"])
def test_gpt_neox_pooling_lengths_and_padding(positions):
    legacy = {"pooled_query_input": "pooled_queries"} if positions == "group_mean" else {}
    enc = _tiny_neox_encoder(4, pooled_query_positions=positions, **legacy)
    ids = torch.randint(3, 99, (2, 7))
    out = enc(ids, _valid([7, 5], 7))
    assert out.hidden_states.shape == (2, 2, 32) and out.lengths.tolist() == [2, 2]
    torch.testing.assert_close(out.hidden_states[1], enc(ids[1:, :5]).hidden_states[0], atol=1e-5, rtol=1e-5)
