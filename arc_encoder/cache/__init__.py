"""Compressed RAG caches: compress a corpus once, answer questions from the stored vectors.

``build`` reads a corpus and writes shards, ``store`` is the format (writes, verification,
lazy loading), ``retrieve`` finds documents with BM25, ``report`` sizes a cache.
"""
