"""Sliding-window layers: which layers keep a window, the KV-cache bytes at a context length, attention FLOPs."""

import json

import pytest
from transformers import AutoConfig

from arc_encoder.cache.report import kv_cache_bytes, kv_cache_bytes_per_token, kv_layout
from arc_encoder.decoders import attention_windows
from arc_encoder.planner import flops

# Gemma 3 270M's real shape (config.json of the converted model): 18 layers, every 6th full, window 512,
# 4 query heads of head_dim 256 on a 640-wide model, 1 KV head.
GEMMA3_270M = {
    "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
    "sliding_window": 512, "layer_types": [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention")
                                           for i in range(18)],
}


def tiny_gemma3(**kw):
    """Odd tiny sizes: 5 layers (full at 2 and 4), window 7, head_dim 12 with 3 heads on a 21-wide model (not 7)."""
    return AutoConfig.for_model(
        "gemma3_text", vocab_size=99, hidden_size=21, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=3, num_key_value_heads=1, head_dim=12, sliding_window=7,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                     "sliding_attention"], **kw)


def test_attention_windows_read_every_convention():
    assert attention_windows(tiny_gemma3()) == [7, None, 7, None, 7]
    assert attention_windows(GEMMA3_270M) == [512] * 5 + [None] + [512] * 5 + [None] + [512] * 5 + [None]
    # a Gemma config.json from before layer_types: the pattern
    old = {k: v for k, v in GEMMA3_270M.items() if k != "layer_types"} | {"sliding_window_pattern": 6}
    assert attention_windows(old) == attention_windows(GEMMA3_270M)
    assert attention_windows({"num_hidden_layers": 3}) == [None] * 3  # Llama
    assert attention_windows({"num_hidden_layers": 3, "sliding_window": 16}) == [16] * 3  # Mistral
    assert attention_windows({"num_hidden_layers": 3, "sliding_window": 16, "use_sliding_window": False}) == [None] * 3
    assert attention_windows({"num_hidden_layers": 4, "sliding_window": 16, "use_sliding_window": True,
                              "max_window_layers": 3}) == [None, None, None, 16]  # Qwen2
    qwen2 = AutoConfig.for_model("qwen2", num_hidden_layers=4, use_sliding_window=False, sliding_window=16)
    assert attention_windows(qwen2) == [None] * 4
    with pytest.raises(ValueError, match="layer_types must list one string per layer"):
        attention_windows({"num_hidden_layers": 3, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="sliding_window must be"):
        attention_windows({"num_hidden_layers": 3, "sliding_window": 0})


def test_kv_cache_bytes_at_a_context_length():
    cfg = tiny_gemma3()
    per_layer_position = 2 * 1 * 12 * 2  # K and V, 1 KV head of head_dim 12 (not 21 / 3), bf16
    assert kv_cache_bytes_per_token(cfg) == 5 * per_layer_position == 240  # every layer while T <= 7
    assert kv_cache_bytes(cfg, 5) == 5 * 5 * per_layer_position  # shorter than the window: all layers, all tokens
    # 31 tokens: 2 full layers keep 31, 3 sliding layers keep 7 each
    assert kv_cache_bytes(cfg, 31) == (2 * 31 + 3 * 7) * per_layer_position == 3984
    assert kv_cache_bytes_per_token(cfg, context_tokens=31) == pytest.approx(3984 / 31)
    assert kv_layout(cfg) == {"full_layers": 2, "sliding_layers": 3, "sliding_window": 7}
    llama = AutoConfig.for_model("llama", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                 hidden_size=32)
    assert kv_cache_bytes_per_token(llama, context_tokens=1000) == kv_cache_bytes_per_token(llama) == 3 * 2 * 2 * 8 * 2
    with pytest.raises(ValueError, match="context_tokens must be >= 1"):
        kv_cache_bytes(cfg, 0)


def test_gemma3_270m_kv_bytes():
    cfg = AutoConfig.for_model(**GEMMA3_270M)
    assert kv_cache_bytes_per_token(cfg) == 18 * 2 * 256 * 2 == 18432  # T <= 512
    # 4,096 tokens: 3 full layers x 4096 + 15 sliding x 512 positions, 1,024 bytes each
    assert kv_cache_bytes(cfg, 4096) == (3 * 4096 + 15 * 512) * 1024
    assert kv_cache_bytes_per_token(cfg, context_tokens=4096) == pytest.approx(4992.0)


def test_attention_flops_are_bounded_by_the_window():
    shape = flops.ModelShape.from_dict(tiny_gemma3().to_dict())
    assert shape.layer_types == ("sliding_attention", "full_attention", "sliding_attention", "full_attention",
                                 "sliding_attention") and shape.sliding_window == 7 and shape.head_dim == 12
    dq, t = 3 * 12, 31
    assert flops.causal_attention_pairs(5, 7) == 12.5 == flops.causal_attention_pairs(5)
    assert flops.causal_attention_pairs(31, 7) == 7 * 7 / 2 + 24 * 7 == 192.5
    p_qkv, p_o, p_mlp = flops.block_params(shape)
    assert (p_qkv, p_o, p_mlp) == (21 * 36 + 2 * 21 * 12, 36 * 21, 3 * 21 * 37)
    expected = 5 * 2 * t * (p_qkv + p_o + p_mlp) + 4 * dq * (2 * t * t / 2 + 3 * 192.5) + 2 * 1 * 21 * 99
    assert flops.decoder_forward_flops(shape, t, 1) == pytest.approx(expected)
    # the same config read as an HF object gives the same count; all-full layers count more
    assert flops.decoder_forward_flops(tiny_gemma3(), t, 1) == pytest.approx(expected)
    full = flops.ModelShape.from_dict({k: v for k, v in tiny_gemma3().to_dict().items()
                                       if k not in ("layer_types", "sliding_window")})
    assert full.layer_types is None
    assert flops.decoder_forward_flops(full, t, 1) - expected == pytest.approx(4 * dq * 3 * (t * t / 2 - 192.5))
    # at or under the window nothing changes
    assert flops.decoder_forward_flops(shape, 7, 1) == flops.decoder_forward_flops(full, 7, 1)


def test_model_shape_rejects_bad_windows():
    cfg = dict(GEMMA3_270M, layer_types=["sliding_attention"] * 3)
    with pytest.raises(ValueError, match="dec.json: layer_types must list one string per layer"):
        flops.ModelShape.from_dict(cfg, "dec.json")


def test_plan_reads_a_sliding_window_decoder_config(tmp_path):
    """`arc-encoder plan --decoder-config` with Gemma 3's config.json counts windowed attention."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GEMMA3_270M))
    shape = flops.ModelShape.from_dict(json.loads(path.read_text()), str(path))
    q16k = flops.text_query_flops(shape, 16_000, 32)
    unwindowed = flops.ModelShape.from_dict({k: v for k, v in GEMMA3_270M.items()
                                             if k not in ("layer_types", "sliding_window")})
    # 16k tokens of context: 15 of 18 layers attend over 512 keys instead of up to 16k: 5.29 vs 12.69 TFLOPs
    ratio = q16k.decoder / flops.text_query_flops(unwindowed, 16_000, 32).decoder
    assert 0.41 < ratio < 0.42 and q16k.decoder == pytest.approx(5.2913e12, rel=1e-4)
