"""ARCEncoder + Projector against the independent reference implementation (tests/reference_arc.py).

Tiny random backbones of every supported family with odd sizes, float32, right-padded batches
with n divisible and not divisible by the pooling factor: max abs difference <= 1e-5.
"""

import math

import pytest
import torch
from transformers import AutoConfig

import reference_arc as ref
from arc_encoder import ARCEncoder, EncoderConfig, Projector, ProjectorConfig
from arc_encoder.config import LEGACY_ENCODER_OPTIONS
from arc_encoder.encoder import group_membership

TOL = 1e-5
# Odd widths and head counts; Qwen3's head_dim is not hidden / heads; Mistral/Llama use a Llama-3 theta.
BACKBONES = {
    "llama": dict(model_type="llama", hidden_size=30, num_attention_heads=5, num_key_value_heads=1,
                  intermediate_size=37, rope_theta=500000.0),
    "mistral": dict(model_type="mistral", hidden_size=30, num_attention_heads=3, num_key_value_heads=1,
                    intermediate_size=41, rope_theta=1000000.0),
    "qwen2": dict(model_type="qwen2", hidden_size=28, num_attention_heads=7, num_key_value_heads=1,
                  intermediate_size=33),
    "qwen3": dict(model_type="qwen3", hidden_size=24, num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                  intermediate_size=29),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=40, num_attention_heads=5, intermediate_size=43,
                     rotary_pct=0.5),
    "gpt_neox_serial": dict(model_type="gpt_neox", hidden_size=40, num_attention_heads=5, intermediate_size=43,
                            rotary_pct=0.5, use_parallel_residual=False),
}
REFERENCE = {"gpt_neox": ref.hf_neox_encoder, "gpt_neox_serial": ref.hf_neox_encoder}
VOCAB = 97


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights at unit scale (HF's 0.02 init makes attention nearly uniform and hides mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and ("norm" in name.lower()):
                p.copy_(1.0 + 0.3 * noise) if name.endswith("weight") else p.copy_(0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def _encoder(kind: str, layers: int = 3, removed: int = 1, **options) -> ARCEncoder:
    spec = dict(BACKBONES[kind])
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=VOCAB, num_hidden_layers=layers, **spec)
    enc_cfg = EncoderConfig(base_model=f"tiny-{kind}", layers_removed=removed, pooling_factor=4, chunk_len=64,
                            attn_implementation="sdpa", **options)
    enc = ARCEncoder.from_base_model(enc_cfg, backbone_config=cfg).eval()
    _randomize(enc, seed=len(kind))
    return enc


def _batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad id 0) and mask."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=gen)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def _reference(kind: str, enc: ARCEncoder, ids: list[int], pf: int) -> torch.Tensor:
    return REFERENCE.get(kind, ref.hf_llama_encoder)(enc.backbone, ids, pf)


def _assert_rows_match(kind, enc, ids, mask, pfs, out):
    lengths = mask.sum(-1).tolist()
    for b, (n_b, pf) in enumerate(zip(lengths, pfs)):
        expect = _reference(kind, enc, ids[b, :n_b].tolist(), pf)
        m = expect.shape[0]
        assert m == math.ceil(n_b / pf) == out.lengths[b].item()
        diff = (out.hidden_states[b, :m].double() - expect).abs().max().item()
        assert diff <= TOL, (kind, b, n_b, pf, diff)
        assert out.hidden_states[b, m:].abs().max().item() == 0 if m < out.hidden_states.shape[1] else True


@pytest.mark.parametrize("kind", list(BACKBONES))
@pytest.mark.parametrize("pf, lengths", [(8, [17, 16, 7]), (4, [17, 16, 3])])
def test_encoder_matches_reference(kind, pf, lengths):
    enc = _encoder(kind)
    ids, mask = _batch(lengths)
    with torch.no_grad():
        out = enc(ids, mask, pooling_factors=pf)
    _assert_rows_match(kind, enc, ids, mask, [pf] * len(lengths), out)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt_neox"])
def test_mixed_pooling_factors_and_pf1_match_reference(kind):
    enc = _encoder(kind)
    ids, mask = _batch([13, 17, 9, 5], seed=1)
    pfs = [3, 8, 1, 4]  # 13@3 -> 3,3,3,2,2 / 17@8 -> 6,6,5 / pf 1: no pooling / 5@4 -> 3,2
    with torch.no_grad():
        out = enc(ids, mask, pooling_factors=pfs)
    _assert_rows_match(kind, enc, ids, mask, pfs, out)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt_neox"])
def test_legacy_options_differ_from_reference(kind):
    """The format-1 semantics are really different: the parity tests would catch them."""
    enc = _encoder(kind)
    legacy = _encoder(kind, **LEGACY_ENCODER_OPTIONS)
    legacy.load_state_dict(enc.state_dict(), strict=False)  # the legacy encoder also holds the final norm
    ids, mask = _batch([17], seed=2)
    with torch.no_grad():
        a, b = enc(ids, mask, 8).hidden_states, legacy(ids, mask, 8).hidden_states
    assert (a - b).abs().max() > 1e-2


def test_group_sizes():
    for (n, pf), sizes in {(17, 8): [6, 6, 5], (7, 4): [4, 3], (3, 4): [3], (16, 8): [8, 8], (9, 4): [3, 3, 3], (17, 4): [4, 4, 3, 3, 3],
                           (13, 3): [3, 3, 3, 2, 2], (5, 1): [1] * 5}.items():
        assert ref.group_sizes(n, pf) == sizes, (n, pf)
        member = group_membership(torch.tensor([n]), torch.tensor([pf]), n, math.ceil(n / pf), "balanced")
        assert member[0].sum(-1).tolist() == sizes, (n, pf)
    fixed = group_membership(torch.tensor([17]), torch.tensor([8]), 17, 3, "fixed_tail")
    assert fixed[0].sum(-1).tolist() == [8, 8, 1]


def test_projector_and_special_tokens_match_reference():
    cfg = ProjectorConfig(input_dim=30, output_dim=19, hidden_dim=11)
    proj = Projector(cfg)
    assert torch.equal(proj.special_tokens, torch.ones(2, 30))  # reference init: ones, encoder space
    assert [n for n, _ in proj.named_parameters()] == ["special_tokens", "net.0.weight", "net.2.weight"]
    _randomize(proj, seed=5)
    x = torch.randn(3, 5, 30)
    w1, w2 = proj.net[0].weight, proj.net[2].weight
    assert (proj(x).double() - ref.project(x, w1, w2)).abs().max() <= TOL
    both = proj.special_embeddings(["reconstruction", "continuation", "reconstruction"])
    expect = ref.project(proj.special_tokens[[1, 0, 1]], w1, w2)
    assert both.shape == (3, 19) and (both.double() - expect).abs().max() <= TOL
    torch.testing.assert_close(proj.special_embedding("continuation"), both[1])


def test_bert_matches_independent_bert_block():
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=30, num_hidden_layers=3, num_attention_heads=5,
                     intermediate_size=37, max_position_embeddings=64)
    enc = ARCEncoder.from_base_model(EncoderConfig(base_model="tiny-bert", layers_removed=1, pooling_factor=4,
                                                   chunk_len=64), backbone_config=cfg).eval()
    _randomize(enc, seed=9)
    ids, mask = _batch([17, 7, 12], seed=3)
    pfs = [8, 4, 4]
    with torch.no_grad():
        out = enc(ids, mask, pooling_factors=pfs)
    for b, (n_b, pf) in enumerate(zip([17, 7, 12], pfs)):
        expect = ref.hf_bert_encoder(enc.backbone, ids[b, :n_b].tolist(), pf)
        assert (out.hidden_states[b, : expect.shape[0]].double() - expect).abs().max() <= TOL
