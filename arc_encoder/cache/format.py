"""The cache on disk: file names, the build config, shard writes, the build lock, verification.

A cache is the projector output for every document, stored in sharded safetensors (format
in ``arc_encoder/CACHE_FORMAT.md``). Every file is written atomically; a shard's sidecar JSON
is written last and marks it done (`write_shard`); `finalize` merges the sidecars into the index
and writes the manifest last. Every JSON file is checked field by field when read, and
`verify_cache` checks every file against the manifest. This module knows files and tensors,
never the model: building (``arc_encoder.cache.build``) and reading (``arc_encoder.cache.reader``)
stand on it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from ..adaptive import AdaptivePooling
from ..checkpoint import MANIFEST_NAME as CHECKPOINT_MANIFEST
from ..checkpoint import read_config
from ..config import ARCConfig, check_int, dataclass_from_dict, is_int, torch_dtype
from ..corpus import CorpusFormat, DocumentStream
from ..storage import (
    DirectoryLock,
    PathLike,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    check_file_table,
    check_files,
    read_json_file,
    sha256_file,
)
from .names import StorageDtype

CACHE_FORMAT_VERSION = 1
CACHE_MANIFEST = "cache_manifest.json"
BUILD_CONFIG = "build_config.json"
INDEX_NAME = "index.json"
SHARD_DIR = "shards"
# Held (fcntl.flock) by the one process building into a cache directory; removed when it ends.
LOCK_NAME = ".build.lock"
_SHARD_FILE = re.compile(rf"{SHARD_DIR}/shard-(\d+)\.safetensors")

VerifyMode = Literal["checksum", "size"]
PoolingMode = Literal["fixed", "adaptive"]
# The safetensors dtype name of each storage dtype's vectors.
_SAFETENSORS_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int8": "I8"}
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
            check_int(name, getattr(self, name), 1)
        for name in ("checkpoint", "checkpoint_sha256", "decoder", "corpus", "decoder_path"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.dedupe, bool):
            raise ValueError(f"dedupe must be true or false, got {self.dedupe!r}")
        if self.format_version != CACHE_FORMAT_VERSION:
            raise ValueError(f"cache format_version {self.format_version} is not {CACHE_FORMAT_VERSION}")
        if self.pooling not in get_args(PoolingMode):
            raise ValueError(f"pooling={self.pooling!r} is not one of {list(get_args(PoolingMode))}")
        if not isinstance(self.adaptive_factors, (list, tuple)) or any(
                isinstance(f, bool) or not isinstance(f, int) for f in self.adaptive_factors):
            raise ValueError(f"adaptive_factors must be a list of integers, got {self.adaptive_factors!r}")
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
        cls, checkpoint: PathLike, decoder: str, corpus: PathLike, adaptive: AdaptivePooling | None = None,
        config: ARCConfig | None = None, **kwargs
    ) -> CacheBuildConfig:
        """Fill the checkpoint-derived fields (hash, decoder path and width, chunking) from the checkpoint's
        config (``config``: already read, else read here)."""
        config = config if config is not None else read_config(checkpoint)
        if decoder not in config.projectors:
            raise ValueError(f"{checkpoint}: no projector for decoder {decoder!r}; it has {sorted(config.projectors)}")
        proj = config.projectors[decoder]
        if adaptive is not None:
            config.encoder.check_trained(adaptive.factors, f"{checkpoint}: adaptive ")
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


# ---------------------------------------------------------------------------- lock
def cache_lock(directory: PathLike) -> DirectoryLock:
    """The exclusive build lock of cache ``directory`` (created if missing), taken at once or refused
    (a context manager).

    Two builds into one directory would each report success while the survivor's files were
    whichever finished last. The lock (`DirectoryLock`) is an ``fcntl.flock`` on ``DIR/.build.lock``
    (released by the kernel if the process dies); the file is removed on release, and a directory
    this call created is removed again if nothing else was written into it.
    """
    return DirectoryLock(directory, LOCK_NAME, "{directory}: another build is writing this cache (it holds the lock "
                         "{path}, pid {pid}); wait for it to finish, then resume")


# ---------------------------------------------------------------------------- shards
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector symmetric absmax: x ~= q * scale, q in [-127, 127]."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0  # [n]
    q = torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


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
        tensors = {"vectors": flat.to(torch_dtype(build.dtype))}
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
        "build_sha256": build_sha256(build),
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


_SIDECAR_INTS = {"shard": 0, "bytes": 0, "texts_bytes": 0, "vectors": 0}
_SIDECAR_STRS = ("build_sha256", "file", "sha256", "texts_file", "texts_sha256")
_DOC_INTS = {"offset": 0, "length": 1, "tokens": 0, "text_bytes": 0}


def check_sidecar(side: Any, where: str) -> dict[str, Any]:
    """A shard sidecar's structure (every field its JSON type); a ValueError names the file and field."""
    if not isinstance(side, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(side).__name__}")
    for key, low in _SIDECAR_INTS.items():
        check_int(f"{where}: {key}", side.get(key), low)
    for key in _SIDECAR_STRS:
        if not isinstance(side.get(key), str) or not side[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string, got {side.get(key)!r}")
    for key in ("file", "texts_file"):
        if Path(side[key]).is_absolute() or ".." in Path(side[key]).parts:
            raise ValueError(f"{where}: {key} {side[key]!r} is not a path inside the cache")
    docs = side.get("docs")
    if not isinstance(docs, list):
        raise ValueError(f"{where}: docs must be a list, got {docs!r}")
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(d.get("text_sha256"), str):
            raise ValueError(f"{where}: docs[{i}] needs a string id and text_sha256")
        for key, low in _DOC_INTS.items():
            check_int(f"{where}: docs[{i}].{key}", d.get(key), low)
        factors = d.get("pooling_factors", [1])
        if not isinstance(factors, list) or not factors or not all(is_int(f, 1) for f in factors):
            raise ValueError(f"{where}: docs[{i}].pooling_factors must be a list of integers >= 1, got {factors!r}")
    return side


def build_sha256(build: CacheBuildConfig) -> str:
    return hashlib.sha256(json.dumps(build.to_dict(), sort_keys=True).encode()).hexdigest()



# ---------------------------------------------------------------------------- verify / load
# Build settings every cache manifest records (the adaptive ones came later: default fixed pooling).
_MANIFEST_REQUIRED = ("checkpoint", "checkpoint_sha256", "decoder", "dtype", "docs_per_shard", "decoder_hidden_size",
                      "pooling_factor", "chunk_len", "max_chunks")
_MANIFEST_COUNTS = {"num_docs": 1, "num_shards": 1, "tokens": 1, "vectors": 1, "text_bytes": 0, "skipped_empty": 0,
                    "dropped_duplicates": 0}


def check_cache_manifest(data: Any, where: str) -> dict[str, Any]:
    """A cache manifest's structure: the build settings (as `CacheBuildConfig` checks them),
    counts, and the file table; errors name the file and the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format_version") != CACHE_FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {data.get('format_version')!r} is not {CACHE_FORMAT_VERSION}")
    check_file_table(data.get("files"), where)
    for key, minimum in _MANIFEST_COUNTS.items():
        check_int(f"{where}: {key}", data.get(key), minimum)
    missing = [k for k in _MANIFEST_REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    names = {f.name for f in dataclasses.fields(CacheBuildConfig)}
    try:
        CacheBuildConfig(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError) as err:  # TypeError: a required setting is missing
        raise ValueError(f"{where}: {err}") from err
    for key in ("decoder_hidden_size", "pooling_factor"):
        check_int(f"{where}: {key}", data.get(key), 1)
    return data


def read_cache_manifest(directory: PathLike) -> dict[str, Any]:
    path = Path(directory) / CACHE_MANIFEST
    if not path.is_file():
        hint = " (a build started here but did not finish: resume it)" if (Path(directory) / BUILD_CONFIG).is_file() else ""
        raise FileNotFoundError(f"{directory} is not a complete arc-encoder cache: {CACHE_MANIFEST} is missing{hint}")
    return check_cache_manifest(read_json_file(path), str(path))


def read_index(directory: PathLike, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """index.json, checked against the manifest: every document's shard exists (the manifest lists
    num_shards shards, each with its files) and its offsets are non-negative integers."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    data = read_json_file(path)
    docs = data.get("docs") if isinstance(data, dict) else None
    if not isinstance(docs, dict):
        raise ValueError(f"{path}: expected {{\"docs\": {{id: entry}}}}")
    if len(docs) != manifest["num_docs"]:
        raise ValueError(f"{path}: {len(docs)} documents, the manifest says num_docs {manifest['num_docs']}")
    shards = set()
    for doc_id, e in docs.items():
        ok = isinstance(e, dict) and all(is_int(e.get(k), low)
                                         for k, low in (("shard", 0), ("offset", 0), ("length", 1)))
        if not ok:
            raise ValueError(f"{path}: document {doc_id!r} needs integer shard, offset >= 0 and length >= 1")
        shards.add(e["shard"])
    listed = sorted(int(m.group(1)) for rel in manifest["files"] if (m := _SHARD_FILE.fullmatch(rel)))
    expected = list(range(manifest["num_shards"]))
    if listed != expected or not shards <= set(expected):
        raise ValueError(f"{directory / CACHE_MANIFEST}: num_shards {manifest['num_shards']}, but it lists "
                         f"{len(listed)} shard files and the index uses shards {min(shards)}..{max(shards)}; "
                         "the manifest does not describe this cache")
    for k in expected:
        for rel in (texts_name(k), sidecar_name(k)):
            if rel not in manifest["files"]:
                raise ValueError(f"{directory / CACHE_MANIFEST}: shard {k}'s {rel} is not listed")
    return docs


def check_shard_layout(f, path: PathLike, manifest: dict[str, Any]) -> int:
    """An open shard's tensors are the manifest's dtype and width (int8: plus one float32 scale per
    vector); returns its rows. A shard of another cache (another dtype) would be misread."""
    dtype = manifest["dtype"]
    expected = {"vectors": torch.int8, "scales": torch.float32} if dtype == "int8" else {"vectors": torch_dtype(dtype)}
    names = set(f.keys())
    if "vectors" in names:
        got = f.get_slice("vectors").get_dtype()
        if got != _SAFETENSORS_DTYPE[dtype]:
            shard_dtype = next((k for k, v in _SAFETENSORS_DTYPE.items() if v == got), got)
            raise ValueError(f"{path}: a {shard_dtype} shard, but the manifest says dtype {dtype} (a shard of "
                             "another cache?)")
    if names != set(expected):
        raise ValueError(f"{path}: tensors {sorted(names)}, a {dtype} cache shard has {sorted(expected)}")
    shape = f.get_slice("vectors").get_shape()
    if len(shape) != 2 or shape[1] != manifest["decoder_hidden_size"]:
        raise ValueError(f"{path}: vectors have shape {shape}, expected [rows, {manifest['decoder_hidden_size']}]")
    if dtype == "int8" and f.get_slice("scales").get_shape() != [shape[0]]:
        raise ValueError(f"{path}: scales have shape {f.get_slice('scales').get_shape()}, expected [{shape[0]}]")
    return shape[0]


def verify_cache(directory: PathLike, checkpoint: PathLike | None = None) -> list[str]:
    """Check every file against the manifest, the index against the manifest, and every shard's
    dtype, width and rows against the index; return the problems found."""
    directory = Path(directory)
    manifest = read_cache_manifest(directory)
    problems = check_files(directory, manifest["files"])
    if not problems:
        try:
            index = read_index(directory, manifest)
        except ValueError as err:
            index = {}
            problems.append(str(err))
        per_shard: dict[int, int] = {}
        for entry in index.values():
            per_shard[entry["shard"]] = max(per_shard.get(entry["shard"], 0), entry["offset"] + entry["length"])
        from safetensors import safe_open

        for k in range(manifest["num_shards"] if index else 0):
            path = directory / shard_name(k)
            try:
                with safe_open(str(path), framework="pt") as f:
                    rows = check_shard_layout(f, path, manifest)
            except ValueError as err:
                problems.append(str(err))
                continue
            if per_shard.get(k, 0) > rows:
                problems.append(f"{path}: index points at row {per_shard[k]} but the shard has {rows}")
    if checkpoint is not None:
        actual = checkpoint_sha256(checkpoint)
        if actual != manifest["checkpoint_sha256"]:
            problems.append(
                f"{directory}: built with checkpoint sha256 {manifest['checkpoint_sha256'][:12]}... "
                f"({manifest['checkpoint']}), but {checkpoint} has {actual[:12]}..."
            )
    return problems


# ---------------------------------------------------------------------------- the build directory
def check_build_dir(directory: PathLike, build: CacheBuildConfig, resume: bool) -> None:
    """Cache ``directory`` may take this build: it does not exist or is empty (but for its lock), or it
    holds a build of the same settings (``build``) and the build resumes. Writes nothing."""
    directory = Path(directory)
    cfg_path = directory / BUILD_CONFIG
    if cfg_path.is_file():
        if not resume:
            raise FileExistsError(f"{directory} already holds a cache (or a partial build); continue it with --resume "
                                  "(resume=True) or choose another --output")
        on_disk = CacheBuildConfig.from_dict(json.loads(cfg_path.read_text()), str(cfg_path))
        if on_disk != build:
            diff = {k: (v, build.to_dict()[k]) for k, v in on_disk.to_dict().items() if build.to_dict()[k] != v}
            raise ValueError(f"{directory}: cannot resume, the build settings differ (on disk vs now: {diff})")
    elif directory.exists() and any(p.name != LOCK_NAME for p in directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not an arc-encoder cache; choose an empty directory")


def create_build_dir(directory: PathLike, build: CacheBuildConfig) -> None:
    """The shard directory and build_config.json (once); leftovers of an interrupted atomic write go.
    The caller holds the directory's `cache_lock` and checked it (`check_build_dir`)."""
    directory = Path(directory)
    (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if not (directory / BUILD_CONFIG).is_file():
        atomic_write_json(directory / BUILD_CONFIG, build.to_dict())
    for tmp in (directory / SHARD_DIR).glob(".*.tmp"):  # never part of the cache
        tmp.unlink(missing_ok=True)


def shards_to_write(directory: PathLike, build: CacheBuildConfig, stream: DocumentStream) -> list[int]:
    """The shards of ``stream`` that are not complete in ``directory`` (`shard_is_complete`)."""
    return [k for k in range(stream.num_shards(build.docs_per_shard))
            if not shard_is_complete(directory, build, k, *stream.shard(k, build.docs_per_shard))]


def _doc_keys(ids: Sequence[str], texts: Sequence[str]) -> list[tuple[str, str]]:
    return [(i, text_sha256(t)) for i, t in zip(ids, texts)]


def _sidecar_keys(side: dict) -> list[tuple[str, str]]:
    return [(d.get("id"), d.get("text_sha256")) for d in side.get("docs", [])]


def shard_is_complete(
    directory: PathLike, build: CacheBuildConfig, k: int, ids: Sequence[str], texts: Sequence[str]
) -> bool:
    """A shard counts as done only if its sidecar (build settings, document ids AND text hashes),
    both files and their checksums all agree: a document whose text changed is compressed again."""
    directory = Path(directory)
    path = directory / sidecar_name(k)
    if not path.is_file():
        return False
    try:
        side = check_sidecar(json.loads(path.read_text()), str(path))
    except (ValueError, UnicodeDecodeError):  # damaged: the shard is written again
        return False
    if side.get("build_sha256") != build_sha256(build) \
            or _sidecar_keys(side) != _doc_keys(ids, texts):
        return False
    for key, sha in (("file", "sha256"), ("texts_file", "texts_sha256")):
        f = directory / side[key]
        if not f.is_file() or sha256_file(f) != side[sha]:
            return False
    return True


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
        side = check_sidecar(read_json_file(path), str(path))
        if side.get("build_sha256") != build_sha256(build):
            raise ValueError(f"{path}: written by another build (other settings, or a concurrent build into this "
                             "directory), not this one; resume to rebuild it")
        if _sidecar_keys(side) != _doc_keys(*stream.shard(k, build.docs_per_shard)):
            raise ValueError(f"{path}: its documents are not the corpus's shard {k}; the corpus changed, resume")
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
