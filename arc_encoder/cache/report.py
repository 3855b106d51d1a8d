"""What a cache costs: bytes per original token vs the decoder's KV cache and raw text.

The KV cache a compressed cache replaces: per layer and token, K and V of ``kv_heads * head_dim``
values (``head_dim`` from the config where given: Gemma 3 270M has 4 query heads of 256 on a
640-wide model and one KV head, so 512 values per layer, not 2 x 160). A sliding-window layer
(Gemma 3: 5 of every 6 layers, 512 positions) keeps at most its window, so at context length T
the cache holds ``sum over layers of min(T, window)`` positions and its bytes per token fall as
T grows: the comparison is made at a stated context length (``kv_cache_bytes``).
"""

from __future__ import annotations

from typing import Any

from ..decoders import attention_windows
from ..storage import PathLike
from .format import _ELEMENT_BYTES, read_cache_manifest


def kv_bytes_per_layer_position(decoder_config, dtype_bytes: int = 2) -> int:
    """2 (K and V) * kv_heads * head_dim * bytes: one layer's cache for one position."""
    heads = decoder_config.num_attention_heads
    kv_heads = getattr(decoder_config, "num_key_value_heads", None) or heads
    head_dim = getattr(decoder_config, "head_dim", None) or decoder_config.hidden_size // heads
    return 2 * kv_heads * head_dim * dtype_bytes


def kv_cache_bytes(decoder_config, context_tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of the decoder's KV cache after ``context_tokens`` tokens: every full-attention layer keeps
    them all, a sliding-window layer at most its window (``decoders.attention_windows``)."""
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
    positions = sum(context_tokens if w is None else min(context_tokens, w) for w in attention_windows(decoder_config))
    return positions * kv_bytes_per_layer_position(decoder_config, dtype_bytes)


def kv_cache_bytes_per_token(decoder_config, dtype_bytes: int = 2, context_tokens: int | None = None) -> float:
    """What a decoder stores per context token: ``kv_cache_bytes(T) / T`` at ``context_tokens`` = T.

    None: while the context fits every window, i.e. every layer keeps every token
    (2 * layers * kv_heads * head_dim * bytes, an int): the upper bound, and the exact value for a
    decoder without sliding-window layers at any length.
    """
    if context_tokens is None:
        return decoder_config.num_hidden_layers * kv_bytes_per_layer_position(decoder_config, dtype_bytes)
    return kv_cache_bytes(decoder_config, context_tokens, dtype_bytes) / context_tokens


def kv_layout(decoder_config) -> dict[str, Any]:
    """How many layers are full and sliding, and the window(s): for reports."""
    windows = attention_windows(decoder_config)
    sliding = sorted({w for w in windows if w is not None})
    return {"full_layers": sum(w is None for w in windows), "sliding_layers": len(windows) - sum(w is None for w in windows),
            "sliding_window": sliding[0] if len(sliding) == 1 else (sliding or None)}


def cache_report(directory: PathLike, decoder_path: str | None = None,
                 context_tokens: int | None = None) -> dict[str, Any]:
    """Sizes per original token: vectors on disk vs the decoder's KV cache vs raw UTF-8 text.

    The KV cache is taken at ``context_tokens`` tokens (default: the cache's mean document length,
    rounded: the context one cached document replaces); only decoders with sliding-window layers
    depend on it. Every file must have its recorded size (a truncated shard would be reported at its
    recorded size); ``decoder_path`` must be a decoder of the cache's width (another decoder's KV cache
    says nothing about this cache). The recorded decoder path is only used when it can be read.
    """
    from ..storage import check_files, check_model_dir

    if context_tokens is not None and context_tokens < 1:
        raise ValueError(f"context_tokens must be >= 1, got {context_tokens}")
    m = read_cache_manifest(directory)
    problems = check_files(directory, m["files"], hash=False)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{more}: the cache is damaged; `arc-encoder cache verify {directory}` "
                         "lists every problem")
    vector_bytes = m["vectors"] * m["decoder_hidden_size"] * _ELEMENT_BYTES[m["dtype"]]
    if m["dtype"] == "int8":
        vector_bytes += m["vectors"] * 4
    disk = sum(f["bytes"] for f in m["files"].values())
    shard_bytes = sum(f["bytes"] for rel, f in m["files"].items() if rel.endswith(".safetensors"))
    report: dict[str, Any] = {
        "docs": m["num_docs"], "shards": m["num_shards"], "tokens": m["tokens"], "vectors": m["vectors"],
        "dtype": m["dtype"], "decoder": m["decoder"], "pooling_factor": m["pooling_factor"],
        "pooling": m.get("pooling", "fixed"), "vectors_per_token": m["vectors"] / m["tokens"],
        "chunks_per_pooling_factor": m.get("chunks_per_pooling_factor", {}),
        "skipped_empty": m["skipped_empty"], "dropped_duplicates": m["dropped_duplicates"],
        "bytes_on_disk": disk, "shard_bytes": shard_bytes,
        "vector_bytes_per_token": vector_bytes / m["tokens"],
        "text_bytes_per_token": m["text_bytes"] / m["tokens"],
    }
    if decoder_path:  # given: it must be a readable decoder of this cache's width
        check_model_dir(decoder_path, "--decoder-path")
        _kv_report(report, m, decoder_path, strict=True, context_tokens=context_tokens)
    elif m.get("decoder_path"):
        try:
            check_model_dir(m["decoder_path"], "the recorded decoder")
            _kv_report(report, m, m["decoder_path"], strict=False, context_tokens=context_tokens)
        except (OSError, ValueError) as err:
            report["kv_cache_error"] = f"cannot read decoder config at {m['decoder_path']}: {err}"
    return report


def _kv_report(report: dict[str, Any], manifest: dict[str, Any], path: str, strict: bool,
               context_tokens: int | None = None) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the decoder config at {path}: {err}") from err
    width = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "hidden_size", None)
    if width != manifest["decoder_hidden_size"]:
        what = "--decoder-path" if strict else "the recorded decoder"
        raise ValueError(f"{what} {path}: a decoder of width {width}, "
                         f"but this cache holds vectors of width {manifest['decoder_hidden_size']} for decoder "
                         f"{manifest['decoder']!r}; its KV cache says nothing about this cache")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    t = context_tokens or max(1, round(manifest["tokens"] / max(1, manifest["num_docs"])))
    kv = kv_cache_bytes_per_token(config, context_tokens=t)
    report["kv_context_tokens"] = t
    report["kv_cache_bytes_bf16"] = kv_cache_bytes(config, t)
    report["kv_cache_bytes_per_token_bf16"] = kv
    report["kv_cache_bytes_per_token_bf16_unwindowed"] = kv_cache_bytes_per_token(config)
    report["kv_layers"] = kv_layout(config)
    report["kv_cache_over_cache"] = kv / report["vector_bytes_per_token"]
