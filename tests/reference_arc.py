"""An independent implementation of the ARC-Encoder reference's encoder and projector, for tests.

Written from the reference code's semantics (kyutai-labs/ARC-Encoder, read at
/work/notes/arcref): ``enhanced_transformer.py`` ``Transformer.forward_embedder``,
``transformer_layers.py`` ``TransformerBlock`` / ``Attention``, ``embedding_modules.py``
``split_integer`` / ``PoolingModule`` / ``EmbProjector``, ``models/utils/rope.py``.
It imports nothing from ``arc_encoder``: norms, RoPE (Hugging Face's rotate-half convention for
HF backbones, the reference's interleaved complex one for reference-layout tensors), GQA
attention, SwiGLU and the grouping are written here on raw weight tensors, one unpadded
sequence at a time, in float64.

The encoder, as the reference runs it (``pool_type="mean_pooled_queries"``, ``where="before"``,
one negative compress rate -pf, ``causal_embedder=False``): every kept block is a
bidirectional block; in the last one ``pooled_h`` = mean of the block input over the groups
``split_integer(n, -pf)``, ``TransformerBlock(x=pooled_h, other_kv=h)`` computes
``r = attention(attention_norm(pooled_h) at positions 0..m-1, attention_norm(h) at 0..n-1)``,
``h' = pooled_h + r``, ``out = h' + FFN(ffn_norm(h'))``, and no final norm follows.
GPT-NeoX (parallel residual), BERT (post-norm) and Gemma 3 (norms on the attention and MLP
outputs, two RoPE tables, sliding-window layers) are the same block by analogy, with the pooled
input as the residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------- grouping
def split_integer(x: int, n: int) -> list[int]:
    """``embedding_modules.split_integer``: n > 0: n groups; n < 0: groups of about -n tokens."""
    if n > 0:
        sizes = [x // n] * n
        for i in range(x % n):
            sizes[i] += 1
        return sizes
    n = -n
    if x % n == 0:
        return [n] * (x // n)
    count = x // n + 1
    sizes = [x // count] * count
    for i in range(x % count):
        sizes[i] += 1
    assert sum(sizes) == x
    return sizes


def group_sizes(num_tokens: int, pooling_factor: int) -> list[int]:
    """``PoolingModule`` with ``comp_rate = -pooling_factor``."""
    if pooling_factor == 1:  # comp_rate == -1: no pooling
        return [1] * num_tokens
    if num_tokens // pooling_factor == 0:  # shorter than one group: one vector
        return [num_tokens]
    return split_integer(num_tokens, -pooling_factor)


def mean_pool(h: Tensor, sizes: list[int]) -> Tensor:
    return torch.stack([part.mean(0) for part in h.split(sizes)])


# ---------------------------------------------------------------------------- layers
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x: Tensor) -> Tensor:  # exact (erf) GELU, HF's "gelu"
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def rope_rotate_half(x: Tensor, positions: Tensor, theta: float, rot_dim: int | None = None) -> Tensor:
    """HF convention on x [n, heads, hd]: channel i pairs with i + rot/2 (leading rot_dim channels)."""
    rot = x.shape[-1] if rot_dim is None else rot_dim
    freq = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)  # [rot/2]
    angle = positions.double()[:, None] * freq[None, :]  # [n, rot/2]
    cos = torch.cat([angle.cos(), angle.cos()], -1)[:, None, :]  # [n, 1, rot]
    sin = torch.cat([angle.sin(), angle.sin()], -1)[:, None, :]
    xr, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rotated * sin, rest], -1)


def rope_interleaved(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """The reference's ``apply_rotary_emb``: channels (2i, 2i+1) are one complex number."""
    hd = x.shape[-1]
    freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64)[: hd // 2] / hd)
    angle = positions.double()[:, None] * freq[None, :]  # [n, hd/2]
    rotation = torch.polar(torch.ones_like(angle), angle)[:, None, :]  # [n, 1, hd/2]
    as_complex = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(as_complex * rotation).flatten(-2)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Bidirectional GQA: q [m, heads, hd], k/v [n, kv_heads, hd] -> [m, heads * hd]."""
    repeats = q.shape[1] // k.shape[1]
    k = torch.repeat_interleave(k, repeats, dim=1)  # the reference's repeat_kv
    v = torch.repeat_interleave(v, repeats, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q, k) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hmn,nhd->mhd", probs, v).reshape(q.shape[0], -1)


# ---------------------------------------------------------------------------- pre-norm (Llama) family
@dataclass
class PreNormLayer:
    attn_norm: Tensor
    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    ffn_norm: Tensor
    w1: Tensor  # gate
    w3: Tensor  # up
    w2: Tensor  # down
    bq: Tensor | None = None
    bk: Tensor | None = None
    bv: Tensor | None = None
    q_norm: Tensor | None = None  # Qwen3 per-head RMSNorm
    k_norm: Tensor | None = None


@dataclass
class PreNormShape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope: Callable[[Tensor, Tensor], Tensor]  # (x [n, heads, hd], positions) -> rotated


def _d(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().double()


# PreNormLayer field -> tensor name in one block, per layout (absent optional tensors stay None).
HF_LLAMA_NAMES = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight", "ffn_norm": "post_attention_layernorm.weight",
    "w1": "mlp.gate_proj.weight", "w3": "mlp.up_proj.weight", "w2": "mlp.down_proj.weight",
}
REFERENCE_NAMES = {  # the reference's Mistral-style names (TransformerBlock, Attention, FeedForward)
    "attn_norm": "attention_norm.weight", "wq": "attention.wq.weight", "wk": "attention.wk.weight",
    "wv": "attention.wv.weight", "wo": "attention.wo.weight", "ffn_norm": "ffn_norm.weight",
    "w1": "feed_forward.w1.weight", "w3": "feed_forward.w3.weight", "w2": "feed_forward.w2.weight",
}


def prenorm_layers(sd: dict[str, Tensor], count: int, names: dict[str, str]) -> list[PreNormLayer]:
    return [PreNormLayer(**{field: _d(sd.get(f"layers.{i}.{name}")) for field, name in names.items()})
            for i in range(count)]


def _layer_count(sd: dict[str, Tensor]) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))


def prenorm_block(h: Tensor, layer: PreNormLayer, shape: PreNormShape, sizes: list[int] | None) -> Tensor:
    """``TransformerBlock.forward(x=pooled_h, other_kv=h)``; sizes None: an ordinary block (x = h)."""
    x = h if sizes is None else mean_pool(h, sizes)
    m, n = x.shape[0], h.shape[0]
    xq = rms_norm(x, layer.attn_norm, shape.eps)
    xkv = rms_norm(h, layer.attn_norm, shape.eps)
    q = linear(xq, layer.wq, layer.bq).view(m, shape.heads, shape.head_dim)
    k = linear(xkv, layer.wk, layer.bk).view(n, shape.kv_heads, shape.head_dim)
    v = linear(xkv, layer.wv, layer.bv).view(n, shape.kv_heads, shape.head_dim)
    if layer.q_norm is not None:
        q, k = rms_norm(q, layer.q_norm, shape.eps), rms_norm(k, layer.k_norm, shape.eps)
    q = shape.rope(q, torch.arange(m))
    k = shape.rope(k, torch.arange(n))
    r = linear(attention(q, k, v, shape.head_dim**-0.5), layer.wo)
    h2 = x + r
    f = rms_norm(h2, layer.ffn_norm, shape.eps)
    return h2 + linear(silu(linear(f, layer.w1)) * linear(f, layer.w3), layer.w2)


def prenorm_encoder(ids: list[int], embedding: Tensor, layers: list[PreNormLayer], shape: PreNormShape,
                    pooling_factor: int) -> Tensor:
    """``forward_embedder`` for one sequence: [n] token ids -> [m, dim]."""
    h = embedding.detach().double()[torch.tensor(ids)]
    for layer in layers[:-1]:
        h = prenorm_block(h, layer, shape, None)
    return prenorm_block(h, layers[-1], shape, group_sizes(len(ids), pooling_factor))


def hf_llama_shape(config) -> PreNormShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    return PreNormShape(config.num_attention_heads, config.num_key_value_heads, head_dim, config.rms_norm_eps,
                        lambda x, pos: rope_rotate_half(x, pos, theta))


def hf_llama_encoder(backbone, ids: list[int], pooling_factor: int) -> Tensor:
    sd = backbone.state_dict()
    layers = prenorm_layers(sd, _layer_count(sd), HF_LLAMA_NAMES)
    return prenorm_encoder(ids, sd["embed_tokens.weight"], layers, hf_llama_shape(backbone.config), pooling_factor)


# ---------------------------------------------------------------------------- GPT-NeoX
def hf_neox_encoder(backbone, ids: list[int], pooling_factor: int) -> Tensor:
    """Pre-norm LayerNorm blocks, fused per-head [q|k|v], partial rotary, (parallel) residual."""
    cfg, sd = backbone.config, {k: v.detach().double() for k, v in backbone.state_dict().items()}
    heads, eps = cfg.num_attention_heads, cfg.layer_norm_eps
    hd = cfg.hidden_size // heads
    rot = int(hd * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    theta = cfg.rope_parameters["rope_theta"]
    count = _layer_count(sd)
    h = sd["embed_in.weight"][torch.tensor(ids)]
    for i in range(count):
        p = f"layers.{i}."
        x = h if i < count - 1 else mean_pool(h, group_sizes(len(ids), pooling_factor))
        m, n = x.shape[0], h.shape[0]

        def ln(t, name):
            return layer_norm(t, sd[p + name + ".weight"], sd[p + name + ".bias"], eps)

        def qkv(t):
            return linear(t, sd[p + "attention.query_key_value.weight"],
                          sd[p + "attention.query_key_value.bias"]).view(t.shape[0], heads, 3 * hd)

        q = qkv(ln(x, "input_layernorm"))[..., :hd]
        kv = qkv(ln(h, "input_layernorm"))
        k, v = kv[..., hd : 2 * hd], kv[..., 2 * hd :]
        q, k = rope_rotate_half(q, torch.arange(m), theta, rot), rope_rotate_half(k, torch.arange(n), theta, rot)
        r = linear(attention(q, k, v, hd**-0.5), sd[p + "attention.dense.weight"], sd[p + "attention.dense.bias"])

        def mlp(t):
            up = gelu(linear(t, sd[p + "mlp.dense_h_to_4h.weight"], sd[p + "mlp.dense_h_to_4h.bias"]))
            return linear(up, sd[p + "mlp.dense_4h_to_h.weight"], sd[p + "mlp.dense_4h_to_h.bias"])

        if cfg.use_parallel_residual:
            h = x + r + mlp(ln(x, "post_attention_layernorm"))
        else:
            h2 = x + r
            h = h2 + mlp(ln(h2, "post_attention_layernorm"))
    return h


# ---------------------------------------------------------------------------- BERT
def hf_bert_encoder(backbone, ids: list[int], pooling_factor: int) -> Tensor:
    """Post-norm blocks: h' = LN1(x + attn), out = LN2(h' + FFN(h')), with x = pooled input in the last."""
    cfg, sd = backbone.config, {k: v.detach().double() for k, v in backbone.state_dict().items()}
    heads, eps = cfg.num_attention_heads, cfg.layer_norm_eps
    hd = cfg.hidden_size // heads
    n = len(ids)
    e = "embeddings."
    h = (sd[e + "word_embeddings.weight"][torch.tensor(ids)] + sd[e + "position_embeddings.weight"][:n]
         + sd[e + "token_type_embeddings.weight"][0])
    h = layer_norm(h, sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], eps)
    count = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    for i in range(count):
        p = f"encoder.layer.{i}."
        x = h if i < count - 1 else mean_pool(h, group_sizes(n, pooling_factor))

        def lin(t, name):
            return linear(t, sd[p + name + ".weight"], sd[p + name + ".bias"])

        def ln(t, name):
            return layer_norm(t, sd[p + name + ".weight"], sd[p + name + ".bias"], eps)

        q = lin(x, "attention.self.query").view(x.shape[0], heads, hd)
        k = lin(h, "attention.self.key").view(n, heads, hd)
        v = lin(h, "attention.self.value").view(n, heads, hd)
        r = lin(attention(q, k, v, hd**-0.5), "attention.output.dense")
        h2 = ln(x + r, "attention.output.LayerNorm")
        h = ln(h2 + lin(gelu(lin(h2, "intermediate.dense")), "output.dense"), "output.LayerNorm")
    return h


# ---------------------------------------------------------------------------- reference layout + projector
def reference_layout_encoder(tensors: dict[str, Tensor], model_args: dict, ids: list[int], pooling_factor: int) -> Tensor:
    """The reference ``Transformer`` (encoder) on its own tensors, with its interleaved complex RoPE.

    ``model_args``: dim, n_heads, n_kv_heads, head_dim, norm_eps, rope_theta, kept layer count
    ``n_layers`` (after truncation).
    """
    theta = model_args["rope_theta"]
    shape = PreNormShape(model_args["n_heads"], model_args["n_kv_heads"], model_args["head_dim"],
                         model_args["norm_eps"], lambda x, pos: rope_interleaved(x, pos, theta))
    layers = prenorm_layers(tensors, model_args["n_layers"], REFERENCE_NAMES)
    return prenorm_encoder(ids, tensors["tok_embeddings.weight"], layers, shape, pooling_factor)


def project(x: Tensor, layer1: Tensor, layer2: Tensor) -> Tensor:
    """``EmbProjector`` type "mlp": two bias-free linear layers, no activation."""
    return linear(linear(x.double(), layer1.detach().double()), layer2.detach().double())


# ---------------------------------------------------------------------------- Gemma 3
def gemma_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Gemma's RMSNorm scales by (1 + weight)."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight)


def gelu_tanh(x: Tensor) -> Tensor:  # HF's "gelu_pytorch_tanh"
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor) -> Tensor:
    """``attention`` with a [m, n] bool mask of the keys each query may read."""
    repeats = q.shape[1] // k.shape[1]
    k = torch.repeat_interleave(k, repeats, dim=1)
    v = torch.repeat_interleave(v, repeats, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), dim=-1)
    return torch.einsum("hmn,nhd->mhd", probs, v).reshape(q.shape[0], -1)


def gemma_band(config) -> int:
    """HF's bidirectional Gemma 3 (``use_bidirectional_attention``): its config replaces the causal
    window w by w // 2 + 1 and a token sees keys at distance < that (EmbeddingGemma)."""
    w = config.sliding_window
    return w if getattr(config, "use_bidirectional_attention", False) else w // 2 + 1


def hf_gemma3_encoder(backbone, ids: list[int], pooling_factor: int, sliding: str = "full") -> Tensor:
    """Gemma 3 text blocks on one sequence, bidirectional, the last block pooling.

    Block: ``h' = x + post_attn_norm(attn(input_norm))``, ``out = h' + post_ffw_norm(mlp(pre_ffw_norm(h')))``
    with x = the block input (the pooled input in the last block, whose queries sit at positions
    0..m-1); per-head q/k RMSNorms before RoPE; scores scaled by query_pre_attn_scalar^-0.5; the
    sliding layers use the local RoPE theta, the full layers the global one. ``sliding="band"``:
    in sliding layers a query reads the keys within ``gemma_band`` of ANY token of its group (with
    one token per group: HF's band); "full": every key.
    """
    cfg, sd = backbone.config, {k: v.detach().double() for k, v in backbone.state_dict().items()}
    heads, kv_heads, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    scale = cfg.query_pre_attn_scalar**-0.5
    n = len(ids)
    h = sd["embed_tokens.weight"][torch.tensor(ids)] * math.sqrt(cfg.hidden_size)
    count = _layer_count(sd)
    for i in range(count):
        p = f"layers.{i}."
        kind = cfg.layer_types[i]
        theta = cfg.rope_parameters[kind]["rope_theta"]
        sizes = group_sizes(n, pooling_factor) if i == count - 1 else [1] * n
        x = mean_pool(h, sizes)
        m = x.shape[0]
        members = torch.arange(n).split(sizes)  # token positions of each group
        if kind == "sliding_attention" and sliding == "band":
            band = gemma_band(cfg)
            allowed = torch.stack([(g[:, None] - torch.arange(n)[None, :]).abs().min(0).values < band for g in members])
        else:
            allowed = torch.ones(m, n, dtype=torch.bool)

        def norm(t, name):
            return gemma_rms_norm(t, sd[p + name + ".weight"], eps)

        xq, xkv = norm(x, "input_layernorm"), norm(h, "input_layernorm")
        q = norm(linear(xq, sd[p + "self_attn.q_proj.weight"]).view(m, heads, hd), "self_attn.q_norm")
        k = norm(linear(xkv, sd[p + "self_attn.k_proj.weight"]).view(n, kv_heads, hd), "self_attn.k_norm")
        v = linear(xkv, sd[p + "self_attn.v_proj.weight"]).view(n, kv_heads, hd)
        q, k = rope_rotate_half(q, torch.arange(m), theta), rope_rotate_half(k, torch.arange(n), theta)
        r = norm(linear(masked_attention(q, k, v, scale, allowed), sd[p + "self_attn.o_proj.weight"]),
                 "post_attention_layernorm")
        h2 = x + r
        f = norm(h2, "pre_feedforward_layernorm")
        up = gelu_tanh(linear(f, sd[p + "mlp.gate_proj.weight"])) * linear(f, sd[p + "mlp.up_proj.weight"])
        h = h2 + norm(linear(up, sd[p + "mlp.down_proj.weight"]), "post_feedforward_layernorm")
    return h
