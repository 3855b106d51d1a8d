"""BM25 retrieval over a cache's source texts (``rank-bm25``, pure Python)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .reader import CompressedCache

_WORD = re.compile(r"\w+")


def bm25_tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25Retriever:
    """Okapi BM25 over the cache's source texts (``rank-bm25``, pure Python)."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        from rank_bm25 import BM25Okapi

        if not ids:
            raise ValueError("BM25Retriever needs at least one document")
        self.ids = list(ids)
        tokens = [bm25_tokens(t) or [""] for t in texts]
        self.words = [set(t) for t in tokens]
        self.bm25 = BM25Okapi(tokens)

    @classmethod
    def from_cache(cls, cache: CompressedCache) -> BM25Retriever:
        texts = cache.texts()
        return cls(list(texts), list(texts.values()))

    def search(self, query: str, top_k: int = 3) -> list[tuple[str, float]]:
        """The ``top_k`` best documents: highest score first, then those that share a word with the
        query (BM25 scores a word found in half of a small corpus 0), then corpus order."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        query_tokens = bm25_tokens(query)
        words = set(query_tokens)
        scores = self.bm25.get_scores(query_tokens)
        order = sorted(range(len(self.ids)), key=lambda i: (-scores[i], not words & self.words[i], i))[:top_k]
        return [(self.ids[i], float(scores[i])) for i in order]

    def matching(self, query: str) -> set[str]:
        """Ids of the documents that share at least one word with ``query``."""
        words = set(bm25_tokens(query))
        return {doc_id for doc_id, doc_words in zip(self.ids, self.words) if words & doc_words}
