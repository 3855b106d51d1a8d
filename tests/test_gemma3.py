"""Gemma 3 as encoder backbone (and as decoder).

Tiny random Gemma 3 text models with odd sizes (vocab 99, hidden 48, 3 heads / 1 kv head,
head_dim 16, query_pre_attn_scalar 20, both layer types, window 5 so the band matters at 7-13
tokens, local RoPE theta far from the global one) in float32, against (a) the independent
float64 implementation in tests/reference_arc.py and (b) Hugging Face's own bidirectional
Gemma 3 (``use_bidirectional_attention=True``) with pooling factor 1; max abs difference <= 1e-5.
"""

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

import reference_arc as ref
from arc_encoder import ARCConfig, ARCEncoder, ARCModel, EncoderConfig
from arc_encoder.encoder import ADAPTERS, backbone_adapter
from arc_encoder.tiny import tiny_causal_lm, tiny_config

TOL = 1e-5
VOCAB = 99
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
REAL_GEMMA = Path(os.environ.get("ARC_GEMMA3_DIR", "/work/models/gemma3"))


def gemma_config(**overrides):
    spec = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=37, num_hidden_layers=4, num_attention_heads=3,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=20, sliding_window=5,
                layer_types=LAYER_TYPES, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})
    spec.update(overrides)
    return AutoConfig.for_model("gemma3_text", **spec)


def _randomize(module: nn.Module, seed: int) -> None:
    """Weights at unit scale (HF's init: zero norm weights, 0.02 matrices, which hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(0.3 * noise)  # Gemma norms scale by (1 + weight)
            elif "embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def gemma_encoder(pf=4, removed=0, sliding="full", seed=3, impl="sdpa", **overrides) -> ARCEncoder:
    cfg = EncoderConfig(base_model="tiny-gemma3", layers_removed=removed, pooling_factor=pf, chunk_len=64,
                        attn_implementation=impl, sliding_window_layers=sliding)
    enc = ARCEncoder.from_base_model(cfg, backbone_config=gemma_config(**overrides)).eval()
    _randomize(enc, seed)
    return enc


def _batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=gen)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


def _max_diff_to_reference(enc, ids, mask, pfs, sliding) -> float:
    with torch.no_grad():
        out = enc(ids, mask, pooling_factors=pfs)
    worst = 0.0
    for b, (n_b, pf) in enumerate(zip(mask.sum(-1).tolist(), pfs)):
        expect = ref.hf_gemma3_encoder(enc.backbone, ids[b, :n_b].tolist(), pf, sliding)
        m = expect.shape[0]
        assert m == math.ceil(n_b / pf) == out.lengths[b].item()
        worst = max(worst, (out.hidden_states[b, :m].double() - expect).abs().max().item())
        assert out.hidden_states[b, m:].abs().sum().item() == 0  # positions past the row's vectors
    return worst


@pytest.mark.parametrize("sliding", ["full", "band"])
@pytest.mark.parametrize("removed", [0, 2])  # the pooled block is a sliding layer / a full layer
@pytest.mark.parametrize("pf, lengths", [(1, [13, 9, 7]), (2, [13, 8, 5]), (4, [13, 12, 3])])
def test_gemma3_encoder_matches_reference(sliding, removed, pf, lengths):
    enc = gemma_encoder(pf, removed, sliding)
    assert enc.family == "gemma3"
    assert [enc.adapter.layer_kind(b) for b in enc.blocks] == LAYER_TYPES[: 4 - removed]
    ids, mask = _batch(lengths)
    diff = _max_diff_to_reference(enc, ids, mask, [pf] * len(lengths), sliding)
    assert diff <= TOL, (sliding, removed, pf, diff)


def test_gemma3_mixed_pooling_factors_match_reference():
    enc = gemma_encoder(4, 0, "band")
    ids, mask = _batch([13, 11, 9, 6], seed=1)
    pfs = [1, 2, 4, 3]  # 11@2 -> 2,2,2,2,2,1 / 9@4 -> 3,3,3 / 6@3 -> 3,3
    assert _max_diff_to_reference(enc, ids, mask, pfs, "band") <= TOL


def _hf_bidirectional(enc: ARCEncoder, **overrides) -> nn.Module:
    """HF's own bidirectional Gemma 3 with the encoder's weights, final norm removed (the encoder has none)."""
    hf = AutoModel.from_config(gemma_config(use_bidirectional_attention=True, **overrides),
                               attn_implementation="sdpa").eval()
    missing, unexpected = hf.load_state_dict(enc.backbone.state_dict(), strict=False)
    assert missing == ["norm.weight"] and unexpected == []
    hf.norm = nn.Identity()
    return hf


# "band" is HF's band; "full" equals HF once the window covers the sequence.
@pytest.mark.parametrize("sliding, window", [("band", 5), ("full", 64)])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gemma3_pf1_equals_hf_bidirectional_gemma3(sliding, window, impl):
    enc = gemma_encoder(1, 0, sliding, impl=impl)
    hf = _hf_bidirectional(enc, sliding_window=window)
    ids, mask = _batch([13, 9, 13], seed=2)
    with torch.no_grad():
        ours = enc(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        alone = enc(ids[:1]).hidden_states  # no mask at all (valid=None path)
        hf_alone = hf(input_ids=ids[:1]).last_hidden_state
    for b, n_b in enumerate(mask.sum(-1).tolist()):
        assert (ours.hidden_states[b, :n_b] - theirs[b, :n_b]).abs().max().item() <= TOL, (b, sliding, impl)
    assert (alone - hf_alone).abs().max().item() <= TOL
    torch.testing.assert_close(alone[0], ours.hidden_states[0], atol=TOL, rtol=0)


def test_band_matters_only_beyond_the_window():
    band, full = gemma_encoder(2, 0, "band"), gemma_encoder(2, 0, "full")
    assert band.adapter.window(band.backbone, "sliding_attention") == 3  # causal window 5 -> |i - j| < 5 // 2 + 1
    assert band.adapter.window(band.backbone, "full_attention") is None
    ids, _ = _batch([13], seed=4)
    with torch.no_grad():
        assert (band(ids).hidden_states - full(ids).hidden_states).abs().max() > 1e-2
        short = ids[:, :3]  # every pair within the band
        torch.testing.assert_close(band(short).hidden_states, full(short).hidden_states, atol=0, rtol=0)


@pytest.mark.parametrize("sliding", ["full", "band"])
def test_padded_rows_equal_packed_rows_and_gradients_stay_finite(sliding):
    enc = gemma_encoder(2, 0, sliding, seed=5).train()  # dropout is 0: train mode only enables autograd paths
    ids, mask = _batch([13, 4, 10], seed=6)  # row 1: nine padding tokens, far outside its band
    out = enc(ids, mask)
    for b, n_b in enumerate([13, 4, 10]):
        packed = enc(ids[b : b + 1, :n_b]).hidden_states  # the row alone: no padding, no mask
        torch.testing.assert_close(out.hidden_states[b, : math.ceil(n_b / 2)], packed[0], atol=TOL, rtol=0)
    out.hidden_states.square().sum().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_gemma3_rope_tables_differ_per_layer_type():
    enc = gemma_encoder(1, 0)
    hidden = torch.zeros(1, 7, 48)
    pos = torch.arange(7)[None]
    local = enc.adapter.rope(enc.backbone, hidden, pos, "sliding_attention")
    glob = enc.adapter.rope(enc.backbone, hidden, pos, "full_attention")
    assert (local[0] - glob[0]).abs().max() > 0.1  # theta 10 vs 10000


# ---------------------------------------------------------------------------- strict matching
def _backbone(model_type, **kw):
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=37, **kw)
    return AutoModel.from_config(cfg)


# Llama-like module names, other math: Gemma 1 scales its embeddings in the model's forward,
# Granite multiplies its residuals, Gemma 2 caps its attention logits.
@pytest.mark.parametrize("model_type, kw", [("gemma", {"head_dim": 8}), ("granite", {}), ("gemma2", {"head_dim": 8})])
def test_backbones_with_llama_like_names_are_refused(model_type, kw):
    backbone = _backbone(model_type, **kw)
    with pytest.raises(ValueError, match=rf"model_type='{model_type}' is not supported: .*gemma3: gemma3_text"):
        ARCEncoder(EncoderConfig(base_model="x", layers_removed=0), backbone)
    with pytest.raises(ValueError, match=rf"model_type='{model_type}' is not supported"):
        ARCEncoder.from_base_model(EncoderConfig(base_model="x", layers_removed=0, attn_implementation="eager"),
                                   backbone_config=backbone.config)  # (HF has no SDPA path for Gemma 2)


def test_a_gemma3_is_never_read_as_llama():
    backbone = AutoModel.from_config(gemma_config())
    assert backbone_adapter(backbone) is ADAPTERS["gemma3"]
    with pytest.raises(ValueError, match=r"'llama' encoder would ignore: \['post_feedforward_layernorm', "
                                         r"'pre_feedforward_layernorm'\]"):
        ADAPTERS["llama"].check(backbone)


def test_extra_block_modules_are_refused():
    backbone = _backbone("llama")
    backbone.layers[1].extra_norm = nn.LayerNorm(32)  # a part the pooled block would never run
    with pytest.raises(ValueError, match=r"model_type='llama' \('llama' family\) has block modules .*\['extra_norm'\]"):
        ARCEncoder(EncoderConfig(base_model="x", layers_removed=0), backbone)


def test_gemma3_with_logit_softcapping_is_refused():
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        ARCEncoder.from_base_model(EncoderConfig(base_model="x", layers_removed=0),
                                   backbone_config=gemma_config(attn_logit_softcapping=50.0))


def test_gemma3_rotary_without_layer_types_is_refused():
    """The transformers 4.x layout (one table per module, no layer_type argument) is refused, not misread."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    backbone = AutoModel.from_config(gemma_config())
    backbone.rotary_emb = LlamaRotaryEmbedding(AutoConfig.for_model("llama", hidden_size=48, num_attention_heads=3))
    with pytest.raises(ValueError, match="takes no layer_type"):
        ARCEncoder(EncoderConfig(base_model="x", layers_removed=0), backbone)


def test_sliding_window_layers_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="sliding_window_layers='banded' is not one of"):
        EncoderConfig(base_model="x", sliding_window_layers="banded")
    enc = gemma_encoder(2, 1, "band")
    model = ARCModel(ARCConfig(encoder=enc.config), enc, None)
    model.save_pretrained(tmp_path / "ck")
    again = ARCModel.from_pretrained(tmp_path / "ck")
    assert again.encoder.config.sliding_window_layers == "band" and again.encoder.family == "gemma3"
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(again.encoder(ids).hidden_states, enc(ids).hidden_states, atol=0, rtol=0)


# ---------------------------------------------------------------------------- decoder
def test_gemma3_decoder_gets_a_projector_and_its_loss_decreases():
    from arc_encoder.decoders import freeze_decoder
    from arc_encoder.samples import Sample, collate
    from conftest import make_encoder

    enc = make_encoder("llama", pooling_factor=4)
    model = ARCModel(ARCConfig(encoder=enc.config), enc, None)
    decoder = tiny_causal_lm(tiny_config("gemma3_text", vocab_size=101, hidden_size=24, num_heads=3, num_kv_heads=1,
                                         num_layers=2), seed=2)
    with torch.no_grad():  # HF's 0.02 init after Gemma's final norm gives near-uniform logits whatever the input
        decoder.lm_head.weight.mul_(25.0)
    freeze_decoder(decoder)
    projector = model.add_decoder("gemma", decoder, hidden_dim=16)
    assert projector.config.output_dim == 24
    samples = [Sample(list(range(3, 15)), list(range(3, 15)), [], [5, 6, 7, 8]),
               Sample(list(range(20, 29)), list(range(20, 29)), [], [9, 10, 11])]
    batch = collate(samples, "gemma", "continuation", 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(batch, decoder)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(p.grad is None for p in decoder.parameters())


# ---------------------------------------------------------------------------- the real model
@pytest.mark.slow
@pytest.mark.skipif(not (REAL_GEMMA / "config.json").is_file(),
                    reason=f"the real Gemma 3 270M is not at {REAL_GEMMA} (set ARC_GEMMA3_DIR)")
def test_real_gemma3_equals_hf_bidirectional_gemma3():
    """Gemma 3 270M, float32, layers_removed=0, pf 1: HF's bidirectional model before its final norm,
    on a sentence and on 600 tokens of real text (longer than the 257-token band)."""
    import gzip
    import json

    from transformers import AutoTokenizer

    import arc_encoder

    data = json.loads((REAL_GEMMA / "config.json").read_text())
    data["use_bidirectional_attention"] = True  # in the dict: from_pretrained(..., flag) would skip the halving
    hf_cfg = AutoConfig.for_model(**data)
    assert hf_cfg.sliding_window == data["sliding_window"] // 2 + 1
    hf = AutoModel.from_pretrained(REAL_GEMMA, config=hf_cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf.norm = nn.Identity()
    tok = AutoTokenizer.from_pretrained(REAL_GEMMA)
    with gzip.open(Path(arc_encoder.__file__).parent / "resources" / "pydoc_small" / "test.jsonl.gz", "rt") as f:
        passage = " ".join(json.loads(line)["text"] for line in f)
    sentence = tok("The quick brown fox jumps over the lazy dog, and a list in Python is a mutable sequence.")
    texts = {"sentence": sentence["input_ids"], "passage": tok(passage, add_special_tokens=False)["input_ids"][:600]}
    for mode in ("band", "full"):
        cfg = EncoderConfig(base_model=str(REAL_GEMMA), layers_removed=0, pooling_factor=1, attn_implementation="sdpa",
                            sliding_window_layers=mode)
        enc = ARCEncoder.from_base_model(cfg, torch_dtype=torch.float32).eval()
        for name, ids in texts.items():
            ids = torch.tensor([ids])
            with torch.no_grad():
                ours, theirs = enc(ids).hidden_states, hf(input_ids=ids).last_hidden_state
            rel = ((ours - theirs).norm() / theirs.norm()).item()
            cos = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min().item()
            if mode == "band" or name == "sentence":  # within the band the two modes are one
                assert rel < 1e-4 and cos > 0.9999, (mode, name, rel, cos)
            else:
                assert rel > 1e-2, (mode, name, rel)  # the full mode really reads past the band
