"""Building a compressed RAG cache: read a corpus, compress it shard by shard, merge the index.

A cache is the projector output for every document, stored on disk (format in
``arc_encoder/CACHE_FORMAT.md``). Building is deterministic: documents are taken in corpus
order, empty ones are skipped, and shard k holds documents [k*S, (k+1)*S) of that stream.
So a resumed build only redoes shards whose files are missing or fail their checksums, and a
multi-process build (``arc_encoder_train.cache_predict``) that writes shard k on rank
k % world_size produces the very same files as this module's single-process ``build_cache``.
The files themselves (and reading them back) are ``arc_encoder.cache.store``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adaptive import AdaptivePooling, ChunkScorer, chunk_scorer, plan_pooling
from ..chunking import check_length, length_problem
from ..model import ARCModel
from ..decoders import compute_dtype
from ..storage import PathLike, atomic_write_json, read_json_file, sha256_file
from .store import (
    BUILD_CONFIG,
    CACHE_FORMAT_VERSION,
    CACHE_MANIFEST,
    INDEX_NAME,
    LOCK_NAME,
    SHARD_DIR,
    CacheBuildConfig,
    CorpusFormat,
    StorageDtype,
    build_sha256,
    cache_lock,
    check_sidecar,
    sidecar_name,
    text_sha256,
    write_shard,
)


def _corpus_error(path: Path, fmt: str, err: BaseException) -> ValueError:
    """One clear error naming the corpus file (bad UTF-8 said as such, wherever it surfaced)."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return ValueError(f"corpus {path}: not UTF-8 text ({cause})")
    return ValueError(f"corpus {path}: cannot read it as {fmt} ({type(err).__name__}: {err})")


# ---------------------------------------------------------------------------- document stream
def read_corpus(path: PathLike, corpus_format: CorpusFormat = "auto") -> tuple[list, list]:
    """(ids, texts) of a JSONL/JSON, parquet or plain-text file, optionally .gz/.bz2/.xz (``datasets``).

    Fields ``id`` and ``text``. Plain text: one document per line, id = line number.
    JSON/parquet without an ``id`` column: id = row number. Every text input of the command
    line (``cache build``, ``compress``, ``eval info``) reads through here.
    """
    from datasets import load_dataset

    from ..loading import quiet_datasets

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path}: no such file")
    fmt = corpus_format
    if fmt == "auto":
        name = path.name.removesuffix(".gz").removesuffix(".bz2").removesuffix(".xz")
        suffix = Path(name).suffix
        fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}.get(suffix, "")
        if not fmt:
            raise ValueError(f"corpus {path}: cannot tell the format from {suffix!r}; name it with --format "
                             "(corpus_format=): json, parquet or text")
    try:
        with quiet_datasets():
            ds = load_dataset(fmt, data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise ValueError(f"corpus {path}: no 'text' field (fields: {ds.column_names})")
        texts = list(ds["text"])  # Arrow decodes the strings here: bad UTF-8 surfaces now
        ids = list(ds["id"]) if "id" in ds.column_names else [str(i + 1) for i in range(len(texts))]
    except ValueError as err:
        if str(err).startswith(f"corpus {path}:"):
            raise
        raise _diagnosed(path, fmt, err) from err
    except Exception as err:  # datasets raises many types for unreadable files
        raise _diagnosed(path, fmt, err) from err
    return ids, texts


def _diagnosed(path: Path, fmt: str, err: BaseException) -> ValueError:
    """The error of an unreadable corpus, naming the line at fault where one can be found (read
    again line by line: only after ``datasets`` failed, so a good corpus is read once)."""
    problem = corpus_problem(path, fmt)
    return ValueError(f"corpus {path}: {problem}") if problem else _corpus_error(path, fmt, err)


def corpus_problem(path: PathLike, fmt: str) -> str | None:
    """What is wrong with a corpus file, with its line number: an empty file, a truncated or corrupt
    compressed file, bad UTF-8, a JSON Lines line that is not JSON. None if nothing is found."""
    import bz2
    import gzip
    import lzma
    import zlib

    path = Path(path)
    openers = {".gz": (gzip.open, "gzip"), ".bz2": (bz2.open, "bzip2"), ".xz": (lzma.open, "xz")}
    opener, kind = openers.get(path.suffix, (open, ""))
    line_no, records = 0, 0
    whole_json = None
    try:
        if fmt == "json":  # a .json file may be one JSON document (an array of records) rather than lines
            with opener(path, "rb") as f:
                try:
                    whole_json = json.loads(f.read().decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    whole_json = None
        if whole_json is not None:
            return None if whole_json else "the file holds no records"
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"line {line_no}: not UTF-8 text ({e.reason} at byte {e.start})"
                if not line.strip():
                    continue
                records += 1
                if fmt == "json":
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"line {line_no}, column {e.colno}: not valid JSON ({e.msg})"
    except EOFError:
        return f"the {kind} file is truncated (it ends inside line {line_no + 1})"
    except (OSError, lzma.LZMAError, zlib.error) as e:
        return f"not a readable {kind or fmt} file ({e})"
    if records == 0:
        return "the file is empty (no records)" if line_no == 0 else f"the file has only blank lines ({line_no})"
    return None


@dataclass
class DocumentStream:
    """Documents in corpus order, empty ones skipped; shard k is docs [k*S, (k+1)*S)."""

    ids: list[str]
    texts: Sequence[str]
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
        keep_ids, keep_texts = [], []
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
                        "make ids unique, or keep the first with --dedupe (dedupe=True)"
                    )
                dropped += 1
                continue
            seen[doc_id] = row
            keep_ids.append(doc_id)
            keep_texts.append(text)
        if not keep_ids:
            raise ValueError(f"{where}: no non-empty documents ({empty} empty)")
        return cls(keep_ids, keep_texts, empty, dropped)

    @classmethod
    def from_corpus(cls, path: PathLike, corpus_format: CorpusFormat = "auto", dedupe: bool = False) -> DocumentStream:
        """Read a corpus (``read_corpus``) and check its ids (``from_records``)."""
        ids, texts = read_corpus(path, corpus_format)
        return cls.from_records(ids, texts, dedupe=dedupe, where=f"corpus {path}")

    def __len__(self) -> int:
        return len(self.ids)

    def num_shards(self, docs_per_shard: int) -> int:
        return math.ceil(len(self.ids) / docs_per_shard)

    def shard(self, k: int, docs_per_shard: int) -> tuple[list[str], list[str]]:
        """Shard k's document ids and texts."""
        span = slice(k * docs_per_shard, (k + 1) * docs_per_shard)
        return list(self.ids[span]), list(self.texts[span])



# ---------------------------------------------------------------------------- compress
def tokenize_documents(model: ARCModel, texts: Sequence[str], ids: Sequence[str] | None = None) -> list[list[int]]:
    """Encoder token ids per document; an empty or too-long document is an error naming it."""
    cfg = model.encoder.config
    token_ids = model.tokenize(list(texts))
    for i, t in enumerate(token_ids):
        name = ids[i] if ids is not None else i
        if not t:
            raise ValueError(f"document {name!r} has no tokens after tokenization")
        check_length(len(t), cfg.chunk_len, cfg.max_chunks, f"document {name!r}")
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


def make_scorer(build: CacheBuildConfig, model: ARCModel, device: str | torch.device = "cpu") -> ChunkScorer | None:
    """The chunk scorer of an adaptive build (``decoder_nll``: the projector's own frozen decoder,
    found and checked by ``model.load_decoder``)."""
    policy = build.policy()
    if policy is None:
        return None
    if policy.density != "decoder_nll":
        return chunk_scorer(policy)
    decoder, tokenizer, _ = model.load_decoder(build.decoder, None, device, compute_dtype(device))
    return chunk_scorer(policy, decoder, tokenizer)


def check_document_lengths(stream: DocumentStream, tokenizer, chunk_len: int, max_chunks: int) -> None:
    """Refuse a document longer than ``chunk_len * max_chunks`` encoder tokens before any shard is
    written (the build would otherwise fail on it after the shards before it).

    Only documents of at least limit / 4 UTF-8 bytes can be that long (no tokenizer makes more
    than 4 tokens of a byte), so only those are tokenized here.
    """
    limit = chunk_len * max_chunks
    for doc_id, text in zip(stream.ids, stream.texts):
        if 4 * len(text.encode("utf-8")) >= limit:
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            problem = length_problem(n, chunk_len, max_chunks, f"document {doc_id!r}")
            if problem:
                raise ValueError(f"{problem} (nothing was written)")


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


def prepare_build(
    directory: PathLike, build: CacheBuildConfig, resume: bool, stream: DocumentStream | None = None,
    tokenizer=None,
) -> tuple[DocumentStream, list[int]]:
    """Create or reopen the cache directory; return the stream and the shards still to write.

    Every check (settings, corpus, document lengths with ``tokenizer``: default the checkpoint's)
    passes before anything is written. The caller holds the directory's `cache_lock`.
    """
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
    if stream is None:
        stream = DocumentStream.from_corpus(build.corpus, build.corpus_format, build.dedupe)
    if tokenizer is None:
        from ..checkpoint import read_tokenizer

        tokenizer = read_tokenizer(build.checkpoint)
    if tokenizer is not None:
        check_document_lengths(stream, tokenizer, build.chunk_len, build.max_chunks)
    (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    if not cfg_path.is_file():
        atomic_write_json(cfg_path, build.to_dict())
    todo = [
        k for k in range(stream.num_shards(build.docs_per_shard))
        if not shard_is_complete(directory, build, k, *stream.shard(k, build.docs_per_shard))
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
    if model is None:
        model = ARCModel.from_pretrained(checkpoint, decoders=[decoder], device=device)
    model.eval()
    with cache_lock(output):
        stream, todo = prepare_build(output, build, resume, stream, model.tokenizer)
        scorer = make_scorer(build, model, device) if todo else None
        start = time.perf_counter()
        n_todo_docs = sum(len(stream.shard(k, docs_per_shard)[0]) for k in todo)
        with tqdm(total=n_todo_docs, unit="doc", desc="cache build", disable=not progress) as bar:
            for k in todo:  # the bar's line ends before any error is printed
                ids, texts = stream.shard(k, docs_per_shard)
                vectors, tokens, plan = compress_shard(model, build, texts, ids, scorer)
                write_shard(output, build, k, ids, texts, vectors, tokens, plan)
                bar.update(len(ids))
                if on_shard is not None:
                    on_shard(k)
        manifest = finalize_cache(output, build, stream)
    n_shards = stream.num_shards(docs_per_shard)
    return BuildResult(Path(output), manifest, todo, n_shards - len(todo), time.perf_counter() - start)


