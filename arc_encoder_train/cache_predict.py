"""The cache build on several GPUs: Lightning ``Trainer.predict`` driving the library's `CacheBuild`.

    arc-encoder-train cache-build CKPT --decoder NAME --corpus docs.jsonl --output CACHE \\
        --devices 8 --strategy ddp

Each predict "batch" is one whole shard: rank r compresses the shards k with k % world_size == r
(``CacheBuild.compress``, the same batches as the single-process build) and writes each at once
(``CacheBuild.write``); rank 0 finalizes the index and manifest at the end. The files are therefore
identical to ``arc-encoder cache build``'s, and an interrupted run resumes (``--resume``) from the
shards already complete. Only global rank 0 locks, checks and opens the output directory and
decides which shards are still to build; the other ranks (re-launched by Lightning, or started by
torchrun / SLURM) read the same documents and receive that list by broadcast.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from arc_encoder.adaptive import AdaptivePooling
from arc_encoder.cache.build import CacheBuild, Shard
from arc_encoder.config import ARCConfig, torch_dtype
from arc_encoder.corpus import CorpusFormat, DocumentStream
from arc_encoder.model import ARCModel

from .progress import quiet_lightning
from .ranks import launched_as_rank_zero


class _ShardList(torch.utils.data.Dataset):
    def __init__(self, shards: Sequence[int]) -> None:
        self.shards = list(shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> int:
        return self.shards[i]


def _one(items: list[int]) -> int:
    return items[0]


class CacheShardData(L.LightningDataModule):
    """Shards still to build (known on global rank 0, broadcast to the others), dealt to ranks
    by k % world_size (no distributed sampler)."""

    def __init__(self, todo: Sequence[int] | None) -> None:
        super().__init__()
        self.todo = None if todo is None else list(todo)

    def predict_dataloader(self) -> torch.utils.data.DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        todo = self.trainer.strategy.broadcast(self.todo, src=0)
        mine = [k for k in todo if k % world == rank]
        return torch.utils.data.DataLoader(_ShardList(mine), batch_size=1, collate_fn=_one)


class CacheCompressModule(L.LightningModule):
    """Wraps an ARCModel; ``predict_step`` compresses every document of one shard (`CacheBuild.compress`)."""

    def __init__(self, model: ARCModel, build: CacheBuild) -> None:
        super().__init__()
        self.model = model.eval()
        self.build = build
        self.scorer = None

    def predict_step(self, batch: int, batch_idx: int) -> Shard:
        if self.scorer is None and self.build.settings.policy() is not None:
            self.scorer = self.build.scorer(self.model, self.device)  # adaptive builds score chunks first
        return self.build.compress(self.model, int(batch), self.scorer)


class CacheShardWriter(BasePredictionWriter):
    """Writes each predicted shard at once (so a crash loses at most the shards in flight); rank 0
    finalizes once every rank's shards are on disk."""

    def __init__(self, build: CacheBuild) -> None:
        super().__init__(write_interval="batch")
        self.build = build
        self.written: list[int] = []
        self.manifest: dict[str, Any] | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction: Shard, batch_indices, batch, batch_idx,
                           dataloader_idx=0):
        self.build.write(prediction)
        self.written.append(prediction.k)

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()  # every rank's shards are on disk before the merge
        if trainer.global_rank == 0:
            self.manifest = self.build.finalize()
        trainer.strategy.barrier()


def build_cache_lightning(
    checkpoint: str | Path,
    decoder: str,
    corpus: str | Path | DocumentStream,
    output: str | Path,
    dtype: str = "float16",
    docs_per_shard: int = 256,
    batch_size: int = 8,
    dedupe: bool = False,
    corpus_format: CorpusFormat = "auto",
    resume: bool = False,
    model_dtype: str | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    adaptive: AdaptivePooling | None = None,
    config: ARCConfig | None = None,
) -> CacheShardWriter:
    """Same arguments and same files as ``arc_encoder.cache.build.build_cache``; runs on any Trainer setup."""
    build = CacheBuild.for_checkpoint(checkpoint, decoder, corpus, output, dtype, docs_per_shard, batch_size, dedupe,
                                      corpus_format, adaptive, config)
    model = ARCModel.from_pretrained(checkpoint, decoders=[decoder])
    with contextlib.ExitStack() as stack:
        if launched_as_rank_zero():  # locks, checks and opens the output directory; no rank writes yet
            stack.enter_context(build.lock())  # held by rank 0 until the manifest is written
            todo = build.open(resume, model.tokenizer)
        else:  # a later rank: the same documents, read only; rank 0's shard list arrives by broadcast
            build.documents  # noqa: B018 - read now, as rank 0 did in open()
            todo = None
        if model_dtype is not None:
            model.to(torch_dtype(model_dtype))
        writer = CacheShardWriter(build)
        quiet_lightning()
        # Lightning's bar shows nothing until the end off a terminal; the summary line says what was done.
        kwargs = dict(logger=False, enable_checkpointing=False, use_distributed_sampler=False, inference_mode=True,
                      enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)
        kwargs.update(trainer_kwargs or {})
        kwargs["callbacks"] = list(kwargs.get("callbacks", [])) + [writer]
        trainer = L.Trainer(**kwargs)
        trainer.predict(CacheCompressModule(model, build), datamodule=CacheShardData(todo), return_predictions=False)
    return writer
