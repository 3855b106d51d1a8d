"""What a cache costs: bytes per original token vs the decoder's KV cache and raw text."""

from __future__ import annotations

from typing import Any

from ..storage import PathLike
from .store import _ELEMENT_BYTES, read_cache_manifest

def kv_cache_bytes_per_token(decoder_config, dtype_bytes: int = 2) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * bytes: what a decoder stores per context token."""
    heads = decoder_config.num_attention_heads
    kv_heads = getattr(decoder_config, "num_key_value_heads", None) or heads
    head_dim = getattr(decoder_config, "head_dim", None) or decoder_config.hidden_size // heads
    return 2 * decoder_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def cache_report(directory: PathLike, decoder_path: str | None = None) -> dict[str, Any]:
    """Sizes per original token: vectors on disk vs the decoder's KV cache vs raw UTF-8 text.

    Every file must have its recorded size (a truncated shard would be reported at its recorded
    size); ``decoder_path`` must be a decoder of the cache's width (another decoder's KV cache
    says nothing about this cache). The recorded decoder path is only used when it can be read.
    """
    from ..storage import check_files, check_model_dir

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
        _kv_report(report, m, decoder_path, strict=True)
    elif m.get("decoder_path"):
        try:
            check_model_dir(m["decoder_path"], "the recorded decoder")
            _kv_report(report, m, m["decoder_path"], strict=False)
        except (OSError, ValueError) as err:
            report["kv_cache_error"] = f"cannot read decoder config at {m['decoder_path']}: {err}"
    return report


def _kv_report(report: dict[str, Any], manifest: dict[str, Any], path: str, strict: bool) -> None:
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
    kv = kv_cache_bytes_per_token(config)
    report["kv_cache_bytes_per_token_bf16"] = kv
    report["kv_cache_over_cache"] = kv / report["vector_bytes_per_token"]
