"""Building a compressed RAG cache: read a corpus, compress it shard by shard, write the shards, merge the index.

One build object, `CacheBuild`, is what a build is (its settings, `CacheBuildConfig`; its documents,
a `DocumentStream` read once; its output directory) and does each step of it once:

    build = CacheBuild.for_checkpoint(checkpoint, decoder, corpus, output)
    with build.lock():
        todo = build.open(resume, model.tokenizer)      # every check first, then the directory
        for k in todo:
            build.write(build.compress(model, k))       # one shard's vectors, then its files
        manifest = build.finalize()                     # the index and manifest, last

``build_cache`` drives it in one process; ``arc_encoder_train.cache_predict`` drives the same object
from Lightning's ``Trainer.predict`` on several GPUs (rank r compresses and writes shards k with
k % world_size == r, rank 0 opens and finalizes), so both write the very same files.

Building is deterministic: documents are taken in corpus order, empty ones are skipped, and shard
k holds documents [k*S, (k+1)*S) of that stream; batches always start at a shard's first document.
A resumed build only redoes shards whose files are missing or fail their checksums, or whose
documents changed. The files are ``arc_encoder.cache.format``'s; reading them back is
``arc_encoder.cache.reader``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adaptive import AdaptivePooling, ChunkScorer, chunk_scorer, plan_pooling
from ..chunking import check_length, length_problem
from ..config import ARCConfig
from ..corpus import CorpusFormat, DocumentStream
from ..decoders import compute_dtype
from ..model import ARCModel
from ..storage import DirectoryLock, PathLike
from .format import (
    CacheBuildConfig,
    cache_lock,
    check_build_dir,
    create_build_dir,
    finalize_cache,
    shards_to_write,
    write_shard,
)
from .names import StorageDtype


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


@dataclass
class Shard:
    """One compressed shard, ready to write: its documents, their vectors (CPU), token counts and
    (adaptive builds) per-document chunk factors."""

    k: int
    ids: list[str]
    texts: list[str]
    vectors: list[torch.Tensor]
    tokens: list[int]
    plan: list[list[int]] | None = None


class CacheBuild:
    """One cache build: settings, documents, output directory; the steps every builder drives (module doc)."""

    def __init__(self, output: PathLike, settings: CacheBuildConfig, stream: DocumentStream | None = None) -> None:
        self.output = Path(output)
        self.settings = settings
        self._stream = stream

    @classmethod
    def for_checkpoint(
        cls,
        checkpoint: PathLike,
        decoder: str,
        corpus: PathLike | DocumentStream,
        output: PathLike,
        dtype: StorageDtype = "float16",
        docs_per_shard: int = 256,
        batch_size: int = 8,
        dedupe: bool = False,
        corpus_format: CorpusFormat = "auto",
        adaptive: AdaptivePooling | None = None,
        config: ARCConfig | None = None,
    ) -> CacheBuild:
        """The build of ``corpus`` (a file, or documents already read) with ``checkpoint``'s projector
        ``decoder`` into ``output`` (``config``: the checkpoint's, when already read)."""
        stream = corpus if isinstance(corpus, DocumentStream) else None
        settings = CacheBuildConfig.for_checkpoint(
            checkpoint, decoder, "" if stream is not None else corpus, adaptive=adaptive, config=config,
            corpus_format=corpus_format, dtype=dtype, docs_per_shard=docs_per_shard, batch_size=batch_size,
            dedupe=dedupe,
        )
        return cls(output, settings, stream)

    @property
    def documents(self) -> DocumentStream:
        """The corpus's documents, read and checked on first use."""
        if self._stream is None:
            s = self.settings
            self._stream = DocumentStream.from_corpus(s.corpus, s.corpus_format, s.dedupe)
        return self._stream

    def shard_documents(self, k: int) -> tuple[list[str], list[str]]:
        return self.documents.shard(k, self.settings.docs_per_shard)

    def lock(self) -> DirectoryLock:
        """The output directory's build lock (`format.cache_lock`): hold it from `open` to `finalize`."""
        return cache_lock(self.output)

    def open(self, resume: bool, tokenizer=None) -> list[int]:
        """Check the output directory, the corpus and every document's length (with ``tokenizer``: default
        the checkpoint's), then create or reopen the directory; returns the shards still to write."""
        check_build_dir(self.output, self.settings, resume)
        if tokenizer is None:
            from ..checkpoint import read_tokenizer

            tokenizer = read_tokenizer(self.settings.checkpoint)
        if tokenizer is not None:
            check_document_lengths(self.documents, tokenizer, self.settings.chunk_len, self.settings.max_chunks)
        create_build_dir(self.output, self.settings)
        return shards_to_write(self.output, self.settings, self.documents)

    def scorer(self, model: ARCModel, device: str | torch.device = "cpu") -> ChunkScorer | None:
        """The chunk scorer of an adaptive build (None for fixed pooling); ``decoder_nll`` loads the
        projector's own frozen decoder (found and checked by ``model.load_decoder``)."""
        policy = self.settings.policy()
        if policy is None:
            return None
        if policy.density != "decoder_nll":
            return chunk_scorer(policy)
        decoder, tokenizer, _ = model.load_decoder(self.settings.decoder, None, device, compute_dtype(device))
        return chunk_scorer(policy, decoder, tokenizer)

    @torch.no_grad()
    def compress(self, model: ARCModel, k: int, scorer: ChunkScorer | None = None) -> Shard:
        """Shard ``k``'s vectors. The adaptive budget is allocated within the shard, so every builder
        (resumed, multi-GPU) computes the same plan from the same documents."""
        ids, texts = self.shard_documents(k)
        token_ids = tokenize_documents(model, texts, ids)
        policy = self.settings.policy()
        plan = None
        if policy is not None:
            if scorer is None:
                raise ValueError("an adaptive build needs a chunk scorer (CacheBuild.scorer)")
            plan = plan_pooling(model, token_ids, policy, scorer)
        vectors: list[torch.Tensor] = []
        size = self.settings.batch_size
        for start in range(0, len(token_ids), size):
            part = None if plan is None else list(plan[start : start + size])
            ctx = model.compress(list(token_ids[start : start + size]), self.settings.decoder, part)
            vectors += [v.detach().cpu() for v in ctx.unpad()]
        return Shard(k, ids, texts, vectors, [len(t) for t in token_ids], plan)

    def write(self, shard: Shard) -> None:
        """Shard ``shard.k``'s files: vectors, texts, then the sidecar that marks it complete."""
        write_shard(self.output, self.settings, shard.k, shard.ids, shard.texts, shard.vectors, shard.tokens,
                    shard.plan)

    def finalize(self) -> dict[str, Any]:
        """Merge every shard's sidecar into the index and write the manifest (last); returns the manifest."""
        return finalize_cache(self.output, self.settings, self.documents)


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
    config: ARCConfig | None = None,
) -> BuildResult:
    """The single-process build (also the resume path). ``model``: already loaded from ``checkpoint``;
    ``config``: the checkpoint's config, when already read.

    ``on_shard(k)`` runs after shard k is complete (tests use it to simulate a crash).
    """
    from tqdm.auto import tqdm

    build = CacheBuild.for_checkpoint(checkpoint, decoder, corpus, output, dtype, docs_per_shard, batch_size, dedupe,
                                      corpus_format, adaptive, config)
    if model is None:
        model = ARCModel.from_pretrained(checkpoint, decoders=[decoder], device=device)
    model.eval()
    with build.lock():
        todo = build.open(resume, model.tokenizer)
        scorer = build.scorer(model, device) if todo else None
        start = time.perf_counter()
        n_todo_docs = sum(len(build.shard_documents(k)[0]) for k in todo)
        with tqdm(total=n_todo_docs, unit="doc", desc="cache build", disable=not progress) as bar:
            for k in todo:  # the bar's line ends before any error is printed
                shard = build.compress(model, k, scorer)
                build.write(shard)
                bar.update(len(shard.ids))
                if on_shard is not None:
                    on_shard(k)
        manifest = build.finalize()
    n_shards = build.documents.num_shards(docs_per_shard)
    return BuildResult(Path(output), manifest, todo, n_shards - len(todo), time.perf_counter() - start)
