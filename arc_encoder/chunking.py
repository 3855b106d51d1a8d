"""Chunk plans: how a context is cut into encoder chunks, the one length limit, the one pooling-factor check.

The encoder reads at most ``chunk_len`` tokens at once (paper: 1024); a longer context is cut into
chunks that are compressed as one batch and concatenated. A context longer than ``chunk_len x
max_chunks`` tokens is refused (paper: 32 x 1024). A pooling factor is an integer in [1, chunk_len]:
a larger one would make every chunk one vector. The model (``ARCModel.compress``), the encoder
config, the encoder's rows and the cache build all check here, so a limit has one wording.

Pure functions over token counts; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

TokenIds = Sequence[int]
# Per context: one factor for all its chunks, or one factor per chunk.
PoolingPlan = Sequence[int | Sequence[int]]


def length_problem(tokens: int, chunk_len: int, max_chunks: int, what: str) -> str | None:
    """Why ``what`` (e.g. "context 3", "document 'a'") cannot be compressed at ``tokens`` tokens, or None."""
    limit = chunk_len * max_chunks
    if tokens > limit:
        return (f"{what} has {tokens} tokens, over the limit of {limit} ({max_chunks} chunks x {chunk_len} tokens); "
                "split it or raise max_chunks")
    return None


def check_length(tokens: int, chunk_len: int, max_chunks: int, what: str) -> None:
    """ValueError when ``what`` is longer than ``chunk_len x max_chunks`` tokens (`length_problem`)."""
    problem = length_problem(tokens, chunk_len, max_chunks, what)
    if problem:
        raise ValueError(problem)


def chunk(ids: TokenIds, chunk_len: int, max_chunks: int, index: int = 0) -> list[list[int]]:
    """Split context ``index`` into chunks of at most ``chunk_len`` tokens (refused when empty or too long)."""
    ids = list(ids)
    if not ids:
        raise ValueError(f"context {index} is empty (0 tokens)")
    check_length(len(ids), chunk_len, max_chunks, f"context {index}")
    return [ids[i : i + chunk_len] for i in range(0, len(ids), chunk_len)]


def check_pooling_factor(factor: object, chunk_len: int, where: str = "") -> None:
    """A pooling factor is an int (never a bool) in [1, chunk_len]."""
    if isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= chunk_len:
        raise ValueError(f"{where}pooling factor {factor!r} is not an integer in [1, chunk_len={chunk_len}]")


def per_chunk_factors(chunk_counts: Sequence[int], pooling_factors: int | PoolingPlan,
                      chunk_len: int) -> list[list[int]]:
    """Expand ``pooling_factors`` (one int, or per context an int or one factor per chunk) to one
    factor per chunk, given each context's chunk count; every factor is checked (`check_pooling_factor`)."""
    if isinstance(pooling_factors, int):
        pooling_factors = [pooling_factors] * len(chunk_counts)
    if len(pooling_factors) != len(chunk_counts):
        raise ValueError(f"pooling_factors has {len(pooling_factors)} entries for {len(chunk_counts)} contexts")
    plan = []
    for i, (n_chunks, pf) in enumerate(zip(chunk_counts, pooling_factors)):
        per_chunk = [pf] * n_chunks if isinstance(pf, int) else list(pf)
        if len(per_chunk) != n_chunks:
            raise ValueError(f"context {i} has {n_chunks} chunks but {len(per_chunk)} pooling factors")
        for f in per_chunk:
            check_pooling_factor(f, chunk_len, f"context {i}: ")
        plan.append(per_chunk)
    return plan


def compressed_len(tokens: int, pooling_factor: int) -> int:
    """Vectors a chunk of ``tokens`` tokens becomes: ceil(tokens / pooling_factor) (either grouping)."""
    return -(-tokens // pooling_factor)
