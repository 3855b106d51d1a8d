"""Reading a built cache: documents' vectors by id, as the decoder-space context a model lays out.

``CompressedCache`` opens a cache lazily: it checks the manifest and the index when opened,
memory-maps a shard (``safetensors.safe_open``) the first time one of its documents is read and
checks that shard's sha256 then, and refuses a cache built with another checkpoint or decoder.
``context`` gives the `CompressedContext` of retrieved documents (a marker after every document
when laid out); answering is the model's: ``model.generate(decoder, tokenizer, cache.decoder,
cache.context([doc_ids]), [question])``. The files are ``arc_encoder.cache.format``'s.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import torch

from ..layout import CompressedContext
from ..storage import PathLike, sha256_file
from .format import (
    INDEX_NAME,
    VerifyMode,
    check_shard_layout,
    checkpoint_sha256,
    dequantize_int8,
    read_cache_manifest,
    read_index,
    shard_name,
    texts_name,
)


class CompressedCache:
    """A built cache, opened lazily: shards are memory-mapped on first use and checksummed then."""

    def __init__(
        self,
        directory: PathLike,
        checkpoint: PathLike | None = None,
        decoder: str | None = None,
        verify: VerifyMode = "checksum",
    ) -> None:
        if verify not in get_args(VerifyMode):
            raise ValueError(f"verify={verify!r} is not one of {list(get_args(VerifyMode))}")
        self.directory = Path(directory)
        self.manifest = read_cache_manifest(self.directory)
        self.verify = verify
        if checkpoint is not None:
            actual = checkpoint_sha256(checkpoint)
            if actual != self.manifest["checkpoint_sha256"]:
                raise ValueError(
                    f"cache {self.directory} was built with checkpoint {self.manifest['checkpoint']} "
                    f"(sha256 {self.manifest['checkpoint_sha256'][:12]}...), not {checkpoint} "
                    f"(sha256 {actual[:12]}...); rebuild the cache for this checkpoint"
                )
        if decoder is not None and decoder != self.manifest["decoder"]:
            raise ValueError(
                f"cache {self.directory} holds vectors for decoder {self.manifest['decoder']!r}, not {decoder!r}"
            )
        index_path = self.directory / INDEX_NAME
        entry = self.manifest["files"].get(INDEX_NAME)
        if entry is None or not index_path.is_file() or sha256_file(index_path) != entry["sha256"]:
            raise ValueError(f"{index_path}: missing or does not match the cache manifest")
        self.index: dict[str, dict[str, Any]] = read_index(self.directory, self.manifest)
        self._shards: dict[int, Any] = {}
        self._texts: dict[str, str] | None = None

    @property
    def decoder(self) -> str:
        return self.manifest["decoder"]

    @property
    def doc_ids(self) -> list[str]:
        return list(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def _check_file(self, rel: str) -> Path:
        path = self.directory / rel
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise ValueError(f"{path}: not listed in the cache manifest")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard file is missing")
        if path.stat().st_size != entry["bytes"]:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}: shard is truncated")
        if self.verify == "checksum" and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: checksum mismatch: the shard is corrupt or was altered")
        return path

    def _shard(self, k: int):
        if k not in self._shards:
            from safetensors import safe_open

            path = self._check_file(shard_name(k))
            f = safe_open(str(path), framework="pt")  # memory-mapped, read lazily
            self._shards[k] = (f, check_shard_layout(f, path, self.manifest))
        return self._shards[k]

    def get(self, doc_id: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One document's [length, decoder_dim] vectors (int8 caches are dequantized)."""
        if doc_id not in self.index:
            raise KeyError(f"document id {doc_id!r} is not in cache {self.directory}")
        e = self.index[doc_id]
        f, rows = self._shard(e["shard"])
        if e["offset"] + e["length"] > rows:
            raise ValueError(f"{self.directory / shard_name(e['shard'])}: document {doc_id!r} is indexed at rows "
                             f"{e['offset']}..{e['offset'] + e['length']}, but the shard has {rows} rows")
        span = slice(e["offset"], e["offset"] + e["length"])
        vec = f.get_slice("vectors")[span]
        if self.manifest["dtype"] == "int8":
            vec = dequantize_int8(vec, f.get_slice("scales")[span])
        return vec.to(dtype)

    def fetch(self, doc_ids: Sequence[str], dtype: torch.dtype = torch.float32) -> CompressedContext:
        """One row per document id."""
        return CompressedContext.from_list([self.get(i, dtype) for i in doc_ids], self.decoder)

    def context(self, doc_ids_per_query: Sequence[Sequence[str]], dtype: torch.dtype = torch.float32) -> CompressedContext:
        """One row per query: its documents' vectors concatenated in the given order, with the
        document boundaries recorded (each document gets its own special token)."""
        for q, ids in enumerate(doc_ids_per_query):
            if not ids:
                raise ValueError(f"query {q} has no documents")
        return CompressedContext.from_documents([[self.get(i, dtype) for i in ids] for ids in doc_ids_per_query],
                                                self.decoder)

    def texts(self) -> dict[str, str]:
        """Source texts by id (verified against the manifest and the index hashes)."""
        if self._texts is None:
            texts: dict[str, str] = {}
            for k in range(self.manifest["num_shards"]):
                path = self._check_file(texts_name(k))
                for line in gzip.decompress(path.read_bytes()).decode("utf-8").splitlines():
                    rec = json.loads(line)
                    texts[rec["id"]] = rec["text"]
            self._texts = texts
        return self._texts
