"""Model FLOPs of the encoder, projector and decoder, shared by the speed benchmark and the planner.

Model FLOPs are what the math needs, not what a kernel happens to do: no recomputation,
no padding; embeddings, norms and rotary are ignored. With H hidden, I MLP width,
dq = heads * head_dim, dkv = kv_heads * head_dim, a chunk of n tokens pooled to
m = ceil(n / pf) vectors:

  per token, matmuls of one block: P_qkv = H*dq + 2*H*dkv, P_o = dq*H, P_mlp = 3*H*I
  encoder block (bidirectional):  2*n*(P_qkv + P_o + P_mlp) + 4*n^2*dq   (QK^T and AV)
  pooled last block:              2*n*P_kv + 2*m*(P_q + P_o + P_mlp) + 4*m*n*dq, with
                                  P_q = H*dq, P_kv = 2*H*dkv: as the reference, the queries
                                  are projected from the m pooled inputs, keys and values
                                  from all n tokens (m query rows)
  decoder forward over T tokens:  2*T*(blocks' params + lm_head rows kept) + 4*dq*pairs per
                                  layer; pairs = T^2/2 (causal: half the square), and for a
                                  sliding-window layer of W positions (Gemma 3: 5 of every 6
                                  layers, W = 512) with T > W: W^2/2 + (T - W)*W, each query
                                  reading at most W keys
  projector:                      2*vectors*(in*hidden + hidden*out)

A config is anything with Hugging Face's attribute names (``hidden_size``,
``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, optional
``head_dim``, and for decoders ``num_hidden_layers`` and ``vocab_size``, optional
``layer_types`` / ``sliding_window``, read by ``arc_encoder.decoders.attention_windows``): a
``PretrainedConfig`` or a :class:`ModelShape` read from a JSON dict. The encoder's
bidirectional layers are counted as full attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..decoders import attention_windows

QueryMode = Literal["cached", "online"]


class ConfigLike(Protocol):
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int


@dataclass(frozen=True)
class ModelShape:
    """The sizes FLOP counts need, read from an HF config dict (config.json or a speed file)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    layer_types: tuple[str, ...] | None = None  # set only when some layers use a sliding window
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], where: str = "config") -> ModelShape:
        """Unknown keys are ignored (a full config.json has many); missing or bad sizes are errors."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{where}: expected a JSON object (an HF config), got {type(cfg).__name__}")
        values: dict[str, int | None] = {}
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "head_dim"):
            v = cfg.get(name)
            if v is None and name == "num_key_value_heads":
                v = cfg.get("num_attention_heads")  # HF default: no grouped-query attention
            if v is None and name == "head_dim":
                values[name] = None
                continue
            if v is None:
                raise ValueError(f"{where}: missing key {name!r}")
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{where}: key {name!r} must be an integer >= 1, got {v!r}")
            values[name] = v
        try:
            windows = attention_windows(cfg)
        except ValueError as err:
            raise ValueError(f"{where}: {str(err).removeprefix('config: ')}") from None
        sliding = sorted({w for w in windows if w is not None})
        if len(sliding) > 1:
            raise ValueError(f"{where}: sliding layers with different windows {sliding} are not supported")
        if sliding:
            values["layer_types"] = tuple("full_attention" if w is None else "sliding_attention" for w in windows)
            values["sliding_window"] = sliding[0]
        return cls(**values)  # type: ignore[arg-type]


def attention_dims(cfg: ConfigLike) -> tuple[int, int, int, int]:
    """(H, I, dq, dkv): hidden, MLP width, query width and key/value width (grouped-query)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dq = cfg.num_attention_heads * head_dim
    dkv = cfg.num_key_value_heads * head_dim
    return cfg.hidden_size, cfg.intermediate_size, dq, dkv


def block_params(cfg: ConfigLike) -> tuple[int, int, int]:
    """Matmul weights per token of one block: (q+k+v, o, mlp)."""
    h, i, dq, dkv = attention_dims(cfg)
    return h * dq + 2 * h * dkv, dq * h, 3 * h * i


def encoder_forward_flops(cfg: ConfigLike, layers: int, n: int, pf: int, chunks: int) -> float:
    """Model FLOPs of one encoder forward over ``chunks`` full chunks of n tokens (docstring)."""
    p_qkv, p_o, p_mlp = block_params(cfg)
    h, _, dq, dkv = attention_dims(cfg)
    m = -(-n // pf)
    full = 2 * n * (p_qkv + p_o + p_mlp) + 4 * n * n * dq
    pooled = 2 * n * (2 * h * dkv) + 2 * m * (h * dq + p_o + p_mlp) + 4 * m * n * dq
    return float(chunks * ((layers - 1) * full + pooled))


def causal_attention_pairs(tokens: int, window: int | None = None) -> float:
    """(query, key) pairs one causal layer attends over ``tokens``: T^2/2 (the model-FLOPs convention),
    or with a sliding ``window`` W < T: W^2/2 for the first W queries plus W for each later one."""
    if window is None or tokens <= window:
        return tokens * tokens / 2
    return window * window / 2 + (tokens - window) * window


def decoder_forward_flops(cfg: ConfigLike, tokens: int, logits_rows: int) -> float:
    """Causal decoder forward over one sequence of ``tokens`` with ``logits_rows`` lm_head rows
    (sliding-window layers attend over at most their window: ``causal_attention_pairs``)."""
    p_qkv, p_o, p_mlp = block_params(cfg)
    dq = attention_dims(cfg)[2]
    windows = attention_windows(cfg)
    matmuls = 2 * tokens * (p_qkv + p_o + p_mlp) * len(windows)
    attention = sum(4 * dq * causal_attention_pairs(tokens, w) for w in windows)
    return float(matmuls + attention + 2 * logits_rows * cfg.hidden_size * cfg.vocab_size)


def projector_flops(in_dim: int, hidden: int, out_dim: int, vectors: int) -> float:
    return float(2 * vectors * (in_dim * hidden + hidden * out_dim))


# ---------------------------------------------------------------------------- one query
def chunk_lengths(context_tokens: int, chunk_len: int) -> list[int]:
    """How ``ARCModel.chunk`` splits a context: full chunks, then a shorter tail."""
    if context_tokens < 1 or chunk_len < 1:
        raise ValueError(f"context_tokens and chunk_len must be >= 1, got {context_tokens}, {chunk_len}")
    full, tail = divmod(context_tokens, chunk_len)
    return [chunk_len] * full + ([tail] if tail else [])


def compressed_len(context_tokens: int, chunk_len: int, pf: int) -> int:
    """Vectors the encoder emits: ceil(len / pf) per chunk, so a ragged tail costs one extra."""
    return sum(-(-n // pf) for n in chunk_lengths(context_tokens, chunk_len))


def decoder_tokens(context: Literal["compressed", "full", "none"], prompt_tokens: int,
                   context_tokens: int = 0, chunk_len: int = 1, pf: int = 1) -> int:
    """Decoder input length of one query, as ``ARCModel.generate`` lays it out.

    compressed (one document, however many chunks): [BOS][vectors][marker][prompt]; full
    text: [BOS][context][prompt]; none (closed book): [BOS][prompt].
    """
    if context == "compressed":
        return 1 + compressed_len(context_tokens, chunk_len, pf) + 1 + prompt_tokens
    if context == "full":
        return 1 + context_tokens + prompt_tokens
    if context == "none":
        return 1 + prompt_tokens
    raise ValueError(f"context must be 'compressed', 'full' or 'none', got {context!r}")


@dataclass(frozen=True)
class QueryFlops:
    """Model FLOPs of answering one query's prefill (the first token), split by stage."""

    encoder: float
    projector: float
    decoder: float
    decoder_tokens: int

    @property
    def total(self) -> float:
        return self.encoder + self.projector + self.decoder


def encode_context_flops(cfg: ConfigLike, layers: int, context_tokens: int, chunk_len: int, pf: int) -> float:
    """Encoder FLOPs over a whole context: its full chunks plus the ragged tail (unpadded)."""
    return sum(encoder_forward_flops(cfg, layers, n, pf, 1) for n in chunk_lengths(context_tokens, chunk_len))


def compressed_query_flops(encoder_cfg: ConfigLike, layers_kept: int, decoder_cfg: ConfigLike,
                           projector_hidden: int, context_tokens: int, chunk_len: int, pf: int,
                           prompt_tokens: int, mode: QueryMode) -> QueryFlops:
    """One query from a compressed context; ``cached`` skips the encoder and projector (done offline)."""
    if mode not in ("cached", "online"):
        raise ValueError(f"mode must be 'cached' or 'online', got {mode!r}")
    m = compressed_len(context_tokens, chunk_len, pf)
    n_dec = decoder_tokens("compressed", prompt_tokens, context_tokens, chunk_len, pf)
    enc = proj = 0.0
    if mode == "online":
        enc = encode_context_flops(encoder_cfg, layers_kept, context_tokens, chunk_len, pf)
        proj = projector_flops(encoder_cfg.hidden_size, projector_hidden, decoder_cfg.hidden_size, m)
    return QueryFlops(enc, proj, decoder_forward_flops(decoder_cfg, n_dec, 1), n_dec)


def text_query_flops(decoder_cfg: ConfigLike, context_tokens: int, prompt_tokens: int) -> QueryFlops:
    """The references: the full text in context (``context_tokens`` > 0) or none (0)."""
    n_dec = (decoder_tokens("full", prompt_tokens, context_tokens) if context_tokens
             else decoder_tokens("none", prompt_tokens))
    return QueryFlops(0.0, 0.0, decoder_forward_flops(decoder_cfg, n_dec, 1), n_dec)
