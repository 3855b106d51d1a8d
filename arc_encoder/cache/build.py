"""Compressed RAG caches: compress a corpus once, answer questions from stored vectors.

A cache is the projector output for every document, stored on disk (format in
``arc_encoder/CACHE_FORMAT.md``). Building is deterministic: documents are taken in corpus
order, empty ones are skipped, and shard k holds documents [k*S, (k+1)*S) of that stream.
So a resumed build only redoes shards whose files are missing or fail their checksums, and a
multi-process build (``arc_encoder_train.cache_predict``) that writes shard k on rank
k % world_size produces the very same files as this module's single-process ``build_cache``.

Every file is written atomically; a shard's sidecar JSON is written last and marks it done.
Loading memory-maps shards with ``safetensors.safe_open`` and checks each shard's sha256 the
first time it is touched, and refuses a cache built with another checkpoint or decoder.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .adaptive import AdaptivePooling, ChunkScorer, chunk_scorer, plan_pooling
from .checkpoint import MANIFEST_NAME as CHECKPOINT_MANIFEST
from .checkpoint import read_config
from .config import dataclass_from_dict
from .model import ARCModel, CompressedContext
from .storage import (
    PathLike,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    check_files,
    read_json_file,
    sha256_file,
)

CACHE_FORMAT_VERSION = 1
CACHE_MANIFEST = "cache_manifest.json"
BUILD_CONFIG = "build_config.json"
INDEX_NAME = "index.json"
SHARD_DIR = "shards"

StorageDtype = Literal["float16", "bfloat16", "float32", "int8"]
CorpusFormat = Literal["auto", "json", "parquet", "text"]
VerifyMode = Literal["checksum", "size"]
PoolingMode = Literal["fixed", "adaptive"]
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Bytes per stored element (int8 also stores one float32 scale per vector, counted separately).
_ELEMENT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1}


def shard_name(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:05d}.safetensors"


def texts_name(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:05d}.texts.jsonl.gz"


def sidecar_name(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:05d}.json"


def checkpoint_sha256(checkpoint: PathLike) -> str:
    """A checkpoint's identity: sha256 of its manifest.json (which lists every file's sha256)."""
    path = Path(checkpoint) / CHECKPOINT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not an arc-encoder checkpoint: {CHECKPOINT_MANIFEST} is missing")
    return sha256_file(path)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------- build config
@dataclass
class CacheBuildConfig:
    """Everything that determines a cache's bytes; saved as build_config.json.

    A resumed build must present the same config, so shards from a different checkpoint,
    decoder, dtype or sharding are never mixed into one cache.
    """

    checkpoint: str
    checkpoint_sha256: str
    decoder: str
    corpus: str
    corpus_format: CorpusFormat = "auto"
    dtype: StorageDtype = "float16"
    docs_per_shard: int = 256
    batch_size: int = 8
    dedupe: bool = False
    # Copied from the checkpoint so `cache info` needs no model.
    decoder_path: str = ""
    decoder_hidden_size: int = 0
    pooling_factor: int = 0
    chunk_len: int = 0
    max_chunks: int = 0
    # Entropy-adaptive pooling (arc_encoder.adaptive): per-chunk factors from adaptive_factors,
    # spending within each shard the vectors fixed pooling at adaptive_target would.
    pooling: PoolingMode = "fixed"
    adaptive_factors: list[int] = field(default_factory=list)
    adaptive_target: float = 0.0
    adaptive_density: str = ""
    adaptive_strength: float = 1.0
    format_version: int = CACHE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in get_args(StorageDtype):
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(get_args(StorageDtype))}")
        if self.corpus_format not in get_args(CorpusFormat):
            raise ValueError(f"corpus_format={self.corpus_format!r} is not one of {list(get_args(CorpusFormat))}")
        for name in ("docs_per_shard", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.format_version != CACHE_FORMAT_VERSION:
            raise ValueError(f"cache format_version {self.format_version} is not {CACHE_FORMAT_VERSION}")
        if self.pooling not in get_args(PoolingMode):
            raise ValueError(f"pooling={self.pooling!r} is not one of {list(get_args(PoolingMode))}")
        self.adaptive_factors = [int(f) for f in self.adaptive_factors]
        self.policy()  # validates the adaptive settings

    def policy(self) -> AdaptivePooling | None:
        """The adaptive pooling policy of this build (None: fixed pooling)."""
        if self.pooling == "fixed":
            return None
        return AdaptivePooling(tuple(self.adaptive_factors), self.adaptive_target,
                               self.adaptive_density, self.adaptive_strength)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = BUILD_CONFIG) -> CacheBuildConfig:
        return dataclass_from_dict(cls, data, where)

    @classmethod
    def for_checkpoint(
        cls, checkpoint: PathLike, decoder: str, corpus: PathLike, adaptive: AdaptivePooling | None = None, **kwargs
    ) -> CacheBuildConfig:
        """Fill the checkpoint-derived fields (hash, decoder path and width, chunking)."""
        config = read_config(checkpoint)
        if decoder not in config.projectors:
            raise ValueError(f"{checkpoint}: no projector for decoder {decoder!r}; it has {sorted(config.projectors)}")
        proj = config.projectors[decoder]
        if adaptive is not None:
            untrained = sorted(set(adaptive.factors) - set(config.encoder.trained_pooling_factors))
            if untrained:
                raise ValueError(
                    f"{checkpoint}: adaptive factors {untrained} were never trained (the encoder knows "
                    f"{list(config.encoder.trained_pooling_factors)}; pretrain with encoder.pooling_factors)"
                )
            kwargs.update(pooling="adaptive", adaptive_factors=list(adaptive.factors), adaptive_target=adaptive.target,
                          adaptive_density=adaptive.density, adaptive_strength=adaptive.strength)
        return cls(
            checkpoint=str(Path(checkpoint).resolve()),
            checkpoint_sha256=checkpoint_sha256(checkpoint),
            decoder=decoder,
            corpus=str(Path(corpus).resolve()) if corpus else "",
            decoder_path=proj.decoder,
            decoder_hidden_size=proj.output_dim,
            pooling_factor=config.encoder.pooling_factor,
            chunk_len=config.encoder.chunk_len,
            max_chunks=config.encoder.max_chunks,
            **kwargs,
        )


# ---------------------------------------------------------------------------- document stream
@dataclass
class DocumentStream:
    """Documents in corpus order, empty ones skipped; shard k is docs [k*S, (k+1)*S)."""

    ids: list[str]
    texts: Sequence[str]
    rows: list[int]  # 1-based row (line, for JSONL/text) of each document in the corpus
    skipped_empty: int = 0
    dropped_duplicates: int = 0

    @classmethod
    def from_records(
        cls, ids: Sequence[Any], texts: Sequence[Any], dedupe: bool = False, where: str = "corpus"
    ) -> DocumentStream:
        """Check ids and texts: duplicate ids are an error naming both rows unless ``dedupe``."""
        if len(ids) != len(texts):
            raise ValueError(f"{where}: {len(ids)} ids for {len(texts)} texts")
        seen: dict[str, int] = {}
        keep_ids, keep_texts, keep_rows = [], [], []
        empty = dropped = 0
        for i, (doc_id, text) in enumerate(zip(ids, texts)):
            row = i + 1
            if doc_id is None or str(doc_id) == "":
                raise ValueError(f"{where}: row {row} has no id")
            doc_id = str(doc_id)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}: row {row} (id {doc_id!r}): text is {type(text).__name__}, not str")
            if text is None or not text.strip():
                empty += 1  # skipped by design: an empty document has nothing to compress
                continue
            if doc_id in seen:
                if not dedupe:
                    raise ValueError(
                        f"{where}: duplicate document id {doc_id!r} at rows {seen[doc_id]} and {row}; "
                        "make ids unique or pass dedupe (keeps the first)"
                    )
                dropped += 1
                continue
            seen[doc_id] = row
            keep_ids.append(doc_id)
            keep_texts.append(text)
            keep_rows.append(row)
        if not keep_ids:
            raise ValueError(f"{where}: no non-empty documents ({empty} empty)")
        return cls(keep_ids, keep_texts, keep_rows, empty, dropped)

    @classmethod
    def from_corpus(cls, path: PathLike, corpus_format: CorpusFormat = "auto", dedupe: bool = False) -> DocumentStream:
        """Read JSONL/JSON, parquet or plain text with ``datasets`` (fields ``id``, ``text``).

        Plain text: one document per line, id = line number. JSON/parquet without an ``id``
        column: id = row number.
        """
        from datasets import load_dataset

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus {path}: no such file")
        fmt = corpus_format
        if fmt == "auto":
            name = path.name.removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz")
            suffix = Path(name).suffix
            fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}.get(suffix, "")
            if not fmt:
                raise ValueError(f"corpus {path}: cannot tell the format from {suffix!r}; pass corpus_format")
        try:
            ds = load_dataset(fmt, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for unreadable files
            raise ValueError(f"corpus {path}: cannot read it as {fmt} ({type(err).__name__}: {err})") from err
        if "text" not in ds.column_names:
            raise ValueError(f"corpus {path}: no 'text' field (fields: {ds.column_names})")
        texts = ds["text"]
        ids = ds["id"] if "id" in ds.column_names else [str(i + 1) for i in range(len(texts))]
        return cls.from_records(list(ids), list(texts), dedupe=dedupe, where=f"corpus {path}")

    def __len__(self) -> int:
        return len(self.ids)

    def num_shards(self, docs_per_shard: int) -> int:
        return math.ceil(len(self.ids) / docs_per_shard)

    def shard(self, k: int, docs_per_shard: int) -> tuple[list[str], list[str], list[int]]:
        span = slice(k * docs_per_shard, (k + 1) * docs_per_shard)
        return list(self.ids[span]), list(self.texts[span]), list(self.rows[span])


# ---------------------------------------------------------------------------- compress + store
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector symmetric absmax: x ~= q * scale, q in [-127, 127]."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0  # [n]
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def tokenize_documents(model: ARCModel, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[list[int]]:
    """Encoder token ids per document; an empty or too-long document is an error naming it."""
    cfg = model.encoder.config
    token_ids = model.tokenize(list(texts))
    limit = cfg.chunk_len * cfg.max_chunks
    for i, t in enumerate(token_ids):
        name = ids[i] if ids is not None else i
        if not t:
            raise ValueError(f"document {name!r} has no tokens after tokenization")
        if len(t) > limit:
            raise ValueError(
                f"document {name!r} has {len(t)} tokens, over the limit of {limit} "
                f"({cfg.max_chunks} chunks x {cfg.chunk_len}); split it or raise max_chunks"
            )
    return token_ids


@torch.no_grad()
def compress_documents(
    model: ARCModel,
    decoder: str,
    token_ids: Sequence[Sequence[int]],
    batch_size: int,
    plan: Sequence[Sequence[int]] | None = None,
) -> list[torch.Tensor]:
    """Compress tokenized documents in batches of ``batch_size``; return per-doc vectors (CPU).

    Batches always start at the shard's first document, so every build path (single
    process, Lightning, resumed) sees the same batches and writes the same bytes.
    """
    vectors: list[torch.Tensor] = []
    for start in range(0, len(token_ids), batch_size):
        part = None if plan is None else list(plan[start : start + batch_size])
        ctx = model.compress(list(token_ids[start : start + batch_size]), decoder, part)
        vectors += [v.detach().cpu() for v in ctx.unpad()]
    return vectors


def make_scorer(build: CacheBuildConfig, device: str | torch.device = "cpu") -> ChunkScorer | None:
    """The chunk scorer of an adaptive build (loads the frozen decoder for ``decoder_nll``)."""
    policy = build.policy()
    if policy is None:
        return None
    if policy.density != "decoder_nll":
        return chunk_scorer(policy)
    from .model import load_frozen_decoder

    if not build.decoder_path or not Path(build.decoder_path).is_dir():
        raise ValueError(f"adaptive_density='decoder_nll' needs the decoder, but {build.decoder_path!r} is not a local directory")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return chunk_scorer(policy, *load_frozen_decoder(build.decoder_path, device, dtype))


@torch.no_grad()
def compress_shard(
    model: ARCModel, build: CacheBuildConfig, texts: Sequence[str], ids: Sequence[str], scorer: ChunkScorer | None
) -> tuple[list[torch.Tensor], list[int], list[list[int]] | None]:
    """One shard's vectors, token counts and (adaptive builds) per-document chunk factors.

    The adaptive budget is allocated within the shard, so every builder (resumed, multi-GPU)
    computes the same plan from the same documents.
    """
    token_ids = tokenize_documents(model, texts, ids)
    policy = build.policy()
    plan = None
    if policy is not None:
        if scorer is None:
            raise ValueError("an adaptive build needs a chunk scorer (make_scorer)")
        plan = plan_pooling(model, token_ids, policy, scorer)
    vectors = compress_documents(model, build.decoder, token_ids, build.batch_size, plan)
    return vectors, [len(t) for t in token_ids], plan


def write_shard(
    directory: PathLike,
    build: CacheBuildConfig,
    k: int,
    ids: Sequence[str],
    texts: Sequence[str],
    vectors: Sequence[torch.Tensor],
    tokens: Sequence[int],
    plan: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Write shard k (vectors, texts, then the sidecar that marks it complete). Shared by all builders."""
    directory = Path(directory)
    flat = torch.cat([v.float() for v in vectors])  # [shard_vectors, decoder_dim]
    # One metadata key: safetensors stores metadata as a hash map, so several keys would be
    # written in a random order and identical builds would differ byte-wise.
    info = {"shard": k, "dtype": build.dtype, "decoder": build.decoder, "format_version": CACHE_FORMAT_VERSION}
    meta = {"arc_encoder_cache": json.dumps(info, sort_keys=True)}
    if build.dtype == "int8":
        q, scale = quantize_int8(flat)
        tensors = {"vectors": q, "scales": scale}
    else:
        tensors = {"vectors": flat.to(_TORCH_DTYPES[build.dtype])}
    shard_sha = atomic_save_tensors(directory / shard_name(k), tensors, meta)
    lines = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, texts))
    blob = gzip.compress(lines.encode("utf-8"), mtime=0)  # mtime=0: same bytes on every build
    atomic_write_bytes(directory / texts_name(k), blob)
    docs, offset = [], 0
    for i, (doc_id, text, vec, n_tok) in enumerate(zip(ids, texts, vectors, tokens)):
        docs.append({"id": doc_id, "offset": offset, "length": int(vec.shape[0]), "tokens": int(n_tok),
                     "text_sha256": text_sha256(text), "text_bytes": len(text.encode("utf-8"))})
        if plan is not None:
            docs[-1]["pooling_factors"] = [int(f) for f in plan[i]]
        offset += int(vec.shape[0])
    sidecar = {
        "shard": k,
        "build_sha256": _build_sha(build),
        "file": shard_name(k),
        "sha256": shard_sha,
        "bytes": (directory / shard_name(k)).stat().st_size,
        "texts_file": texts_name(k),
        "texts_sha256": hashlib.sha256(blob).hexdigest(),
        "texts_bytes": len(blob),
        "vectors": offset,
        "docs": docs,
    }
    atomic_write_json(directory / sidecar_name(k), sidecar)
    return sidecar


def _build_sha(build: CacheBuildConfig) -> str:
    return hashlib.sha256(json.dumps(build.to_dict(), sort_keys=True).encode()).hexdigest()


def shard_is_complete(directory: PathLike, build: CacheBuildConfig, k: int, ids: Sequence[str]) -> bool:
    """A shard counts as done only if its sidecar, both files and their checksums all agree."""
    directory = Path(directory)
    path = directory / sidecar_name(k)
    if not path.is_file():
        return False
    try:
        side = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if side.get("build_sha256") != _build_sha(build) or [d["id"] for d in side.get("docs", [])] != list(ids):
        return False
    for key, sha in (("file", "sha256"), ("texts_file", "texts_sha256")):
        f = directory / side[key]
        if not f.is_file() or sha256_file(f) != side[sha]:
            return False
    return True


def prepare_build(
    directory: PathLike, build: CacheBuildConfig, resume: bool, stream: DocumentStream | None = None
) -> tuple[DocumentStream, list[int]]:
    """Create or reopen the cache directory; return the stream and the shards still to write."""
    directory = Path(directory)
    cfg_path = directory / BUILD_CONFIG
    if cfg_path.is_file():
        if not resume:
            raise FileExistsError(f"{directory} already holds a cache (or a partial build); pass resume to continue it")
        on_disk = CacheBuildConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
        if on_disk != build:
            diff = {k: (v, build.to_dict()[k]) for k, v in on_disk.to_dict().items() if build.to_dict()[k] != v}
            raise ValueError(f"{directory}: cannot resume, the build settings differ (on disk vs now: {diff})")
    elif directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not an arc-encoder cache; choose an empty directory")
    if stream is None:
        stream = DocumentStream.from_corpus(build.corpus, build.corpus_format, build.dedupe)
    (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if not cfg_path.is_file():
        atomic_write_json(cfg_path, build.to_dict())
    todo = [
        k for k in range(stream.num_shards(build.docs_per_shard))
        if not shard_is_complete(directory, build, k, stream.shard(k, build.docs_per_shard)[0])
    ]
    # Leftovers of an interrupted atomic write are never part of the cache.
    for tmp in (directory / SHARD_DIR).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    return stream, todo


def finalize_cache(directory: PathLike, build: CacheBuildConfig, stream: DocumentStream) -> dict[str, Any]:
    """Merge every shard's sidecar into index.json and write the cache manifest (last)."""
    directory = Path(directory)
    n_shards = stream.num_shards(build.docs_per_shard)
    index: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, Any]] = {}
    totals = {"tokens": 0, "vectors": 0, "text_bytes": 0}
    chunk_counts: dict[str, int] = {}
    for k in range(n_shards):
        path = directory / sidecar_name(k)
        if not path.is_file():
            raise ValueError(f"{directory}: shard {k} is missing ({sidecar_name(k)}); the build is incomplete, resume it")
        side = json.loads(path.read_text())
        if [d["id"] for d in side["docs"]] != stream.shard(k, build.docs_per_shard)[0]:
            raise ValueError(f"{path}: its documents are not the corpus's shard {k}; the corpus changed, rebuild")
        for d in side["docs"]:
            index[d["id"]] = {"shard": k, "offset": d["offset"], "length": d["length"],
                              "tokens": d["tokens"], "text_sha256": d["text_sha256"]}
            if "pooling_factors" in d:
                index[d["id"]]["pooling_factors"] = d["pooling_factors"]
                for f in d["pooling_factors"]:
                    chunk_counts[str(f)] = chunk_counts.get(str(f), 0) + 1
            totals["tokens"] += d["tokens"]
            totals["text_bytes"] += d["text_bytes"]
        totals["vectors"] += side["vectors"]
        files[side["file"]] = {"sha256": side["sha256"], "bytes": side["bytes"]}
        files[side["texts_file"]] = {"sha256": side["texts_sha256"], "bytes": side["texts_bytes"]}
        files[sidecar_name(k)] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    atomic_write_json(directory / INDEX_NAME, {"docs": index})
    for rel in (INDEX_NAME, BUILD_CONFIG):
        files[rel] = {"sha256": sha256_file(directory / rel), "bytes": (directory / rel).stat().st_size}
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        **{k: v for k, v in build.to_dict().items() if k != "format_version"},
        "num_docs": len(stream),
        "num_shards": n_shards,
        "skipped_empty": stream.skipped_empty,
        "dropped_duplicates": stream.dropped_duplicates,
        **totals,
        **({"chunks_per_pooling_factor": dict(sorted(chunk_counts.items(), key=lambda kv: int(kv[0])))}
           if chunk_counts else {}),
        "files": files,
    }
    atomic_write_json(directory / CACHE_MANIFEST, manifest)
    return manifest


@dataclass
class BuildResult:
    directory: Path
    manifest: dict[str, Any]
    shards_written: list[int] = field(default_factory=list)
    shards_reused: int = 0
    seconds: float = 0.0


def build_cache(
    checkpoint: PathLike,
    decoder: str,
    corpus: PathLike | DocumentStream,
    output: PathLike,
    dtype: StorageDtype = "float16",
    docs_per_shard: int = 256,
    batch_size: int = 8,
    dedupe: bool = False,
    corpus_format: CorpusFormat = "auto",
    resume: bool = False,
    device: str | torch.device = "cpu",
    model: ARCModel | None = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    adaptive: AdaptivePooling | None = None,
) -> BuildResult:
    """Single-process build (also the resume path). ``model``: already loaded from ``checkpoint``.

    ``on_shard(k)`` runs after shard k is complete (tests use it to simulate a crash).
    """
    import time

    from tqdm.auto import tqdm

    stream = corpus if isinstance(corpus, DocumentStream) else None
    build = CacheBuildConfig.for_checkpoint(
        checkpoint, decoder, "" if stream is not None else corpus, corpus_format=corpus_format,
        dtype=dtype, docs_per_shard=docs_per_shard, batch_size=batch_size, dedupe=dedupe, adaptive=adaptive,
    )
    stream, todo = prepare_build(output, build, resume, stream)
    if model is None:
        model = ARCModel.from_pretrained(checkpoint, decoders=[decoder], device=device)
    model.eval()
    scorer = make_scorer(build, device) if todo else None
    start = time.perf_counter()
    n_todo_docs = sum(len(stream.shard(k, docs_per_shard)[0]) for k in todo)
    bar = tqdm(total=n_todo_docs, unit="doc", desc="cache build", disable=not progress)
    for k in todo:
        ids, texts, _ = stream.shard(k, docs_per_shard)
        vectors, tokens, plan = compress_shard(model, build, texts, ids, scorer)
        write_shard(output, build, k, ids, texts, vectors, tokens, plan)
        bar.update(len(ids))
        if on_shard is not None:
            on_shard(k)
    bar.close()
    manifest = finalize_cache(output, build, stream)
    n_shards = stream.num_shards(docs_per_shard)
    return BuildResult(Path(output), manifest, todo, n_shards - len(todo), time.perf_counter() - start)


# ---------------------------------------------------------------------------- verify / load
def read_cache_manifest(directory: PathLike) -> dict[str, Any]:
    path = Path(directory) / CACHE_MANIFEST
    if not path.is_file():
        hint = " (a build started here but did not finish: resume it)" if (Path(directory) / BUILD_CONFIG).is_file() else ""
        raise FileNotFoundError(f"{directory} is not a complete arc-encoder cache: {CACHE_MANIFEST} is missing{hint}")
    return read_json_file(path, CACHE_FORMAT_VERSION)


def verify_cache(directory: PathLike, checkpoint: PathLike | None = None) -> list[str]:
    """Check every file against the manifest (and the index against the shards); return problems."""
    directory = Path(directory)
    manifest = read_cache_manifest(directory)
    problems = check_files(directory, manifest["files"])
    if not problems:
        index = json.loads((directory / INDEX_NAME).read_text())["docs"]
        if len(index) != manifest["num_docs"]:
            problems.append(f"{directory / INDEX_NAME}: {len(index)} documents, manifest says {manifest['num_docs']}")
        per_shard: dict[int, int] = {}
        for entry in index.values():
            per_shard[entry["shard"]] = max(per_shard.get(entry["shard"], 0), entry["offset"] + entry["length"])
        from safetensors import safe_open

        for k, end in sorted(per_shard.items()):
            with safe_open(str(directory / shard_name(k)), framework="pt") as f:
                rows = f.get_slice("vectors").get_shape()[0]
            if end > rows:
                problems.append(f"{directory / shard_name(k)}: index points at row {end} but the shard has {rows}")
    if checkpoint is not None:
        actual = checkpoint_sha256(checkpoint)
        if actual != manifest["checkpoint_sha256"]:
            problems.append(
                f"{directory}: built with checkpoint sha256 {manifest['checkpoint_sha256'][:12]}... "
                f"({manifest['checkpoint']}), but {checkpoint} has {actual[:12]}..."
            )
    return problems


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
        self.index: dict[str, dict[str, Any]] = json.loads(index_path.read_text())["docs"]
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
            self._shards[k] = safe_open(str(path), framework="pt")  # memory-mapped, read lazily
        return self._shards[k]

    def get(self, doc_id: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One document's [length, decoder_dim] vectors (int8 caches are dequantized)."""
        if doc_id not in self.index:
            raise KeyError(f"document id {doc_id!r} is not in cache {self.directory}")
        e = self.index[doc_id]
        f = self._shard(e["shard"])
        span = slice(e["offset"], e["offset"] + e["length"])
        vec = f.get_slice("vectors")[span]
        if self.manifest["dtype"] == "int8":
            vec = dequantize_int8(vec, f.get_slice("scales")[span])
        return vec.to(dtype)

    def fetch(self, doc_ids: Sequence[str], dtype: torch.dtype = torch.float32) -> CompressedContext:
        """One row per document id."""
        return CompressedContext.from_list([self.get(i, dtype) for i in doc_ids], self.decoder)

    def context(self, doc_ids_per_query: Sequence[Sequence[str]], dtype: torch.dtype = torch.float32) -> CompressedContext:
        """One row per query: its documents' vectors concatenated in the given order."""
        rows = []
        for q, ids in enumerate(doc_ids_per_query):
            if not ids:
                raise ValueError(f"query {q} has no documents")
            rows.append(torch.cat([self.get(i, dtype) for i in ids]))
        return CompressedContext.from_list(rows, self.decoder)

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

    def generate(
        self,
        model: ARCModel,
        decoder_model,
        decoder_tokenizer,
        questions: Sequence[str],
        doc_ids_per_question: Sequence[Sequence[str]],
        max_new_tokens: int = 32,
        **generate_kwargs,
    ) -> list[str]:
        """[BOS][doc1 vectors][doc2 vectors]...[continuation marker][question] -> answer."""
        if len(questions) != len(doc_ids_per_question):
            raise ValueError(f"{len(questions)} questions for {len(doc_ids_per_question)} document lists")
        dtype = decoder_model.get_input_embeddings().weight.dtype
        ctx = self.context(doc_ids_per_question, dtype)
        return model.generate(decoder_model, decoder_tokenizer, self.decoder, ctx, list(questions),
                              max_new_tokens=max_new_tokens, **generate_kwargs)


# ---------------------------------------------------------------------------- retrieval
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
        self.bm25 = BM25Okapi([bm25_tokens(t) or [""] for t in texts])

    @classmethod
    def from_cache(cls, cache: CompressedCache) -> BM25Retriever:
        texts = cache.texts()
        return cls(list(texts), list(texts.values()))

    def search(self, query: str, top_k: int = 3) -> list[tuple[str, float]]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        scores = self.bm25.get_scores(bm25_tokens(query))
        order = sorted(range(len(self.ids)), key=lambda i: (-scores[i], i))[:top_k]
        return [(self.ids[i], float(scores[i])) for i in order]


# ---------------------------------------------------------------------------- report
def kv_cache_bytes_per_token(decoder_config, dtype_bytes: int = 2) -> int:
    """2 (K and V) * layers * kv_heads * head_dim * bytes: what a decoder stores per context token."""
    heads = decoder_config.num_attention_heads
    kv_heads = getattr(decoder_config, "num_key_value_heads", None) or heads
    head_dim = getattr(decoder_config, "head_dim", None) or decoder_config.hidden_size // heads
    return 2 * decoder_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def cache_report(directory: PathLike, decoder_path: str | None = None) -> dict[str, Any]:
    """Sizes per original token: vectors on disk vs the decoder's KV cache vs raw UTF-8 text."""
    m = read_cache_manifest(directory)
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
    path = decoder_path or m.get("decoder_path")
    if path:
        try:
            from transformers import AutoConfig

            kv = kv_cache_bytes_per_token(AutoConfig.from_pretrained(path))
            report["kv_cache_bytes_per_token_bf16"] = kv
            report["kv_cache_over_cache"] = kv / report["vector_bytes_per_token"]
        except (OSError, ValueError) as err:
            report["kv_cache_error"] = f"cannot read decoder config at {path}: {err}"
    return report
