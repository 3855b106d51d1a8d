"""Compressed RAG caches: compress a corpus once, answer questions from the stored vectors.

``build`` reads a corpus and writes shards (one build object, ``CacheBuild``), ``format`` is the
files (writes, lock, verification; no model), ``reader`` opens a built cache lazily, ``retrieve``
finds documents with BM25, ``report`` sizes a cache.
"""
