"""Multi-GPU cache build: Lightning ``Trainer.predict`` with a shard-writing prediction writer.

    arc-encoder-train cache-build CKPT --decoder NAME --corpus docs.jsonl --output CACHE \\
        --devices 8 --strategy ddp        # or: python -m arc_encoder_train.cache_predict ...

Each predict "batch" is one whole shard: rank r builds shards k with k % world_size == r,
compresses them with the library's ``compress_shard`` (same batches as the
single-process build) and writes them with the library's ``write_shard``; rank 0 merges the
index and manifest at the end. The files are therefore identical to ``arc-encoder cache
build``'s, and an interrupted run resumes (``--resume``) from the shards already complete.
Only global rank 0 creates or validates the output directory and decides which shards are
still to build; the other ranks (re-launched by Lightning, or started by torchrun / SLURM)
receive that list by broadcast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from arc_encoder.adaptive import AdaptivePooling
from arc_encoder.cache.build import DocumentStream, compress_shard, finalize_cache, make_scorer, prepare_build
from arc_encoder.cache.store import CacheBuildConfig, CorpusFormat, StorageDtype, cache_lock, write_shard
from arc_encoder.checkpoint import read_config
from arc_encoder.cli.common import DTYPE_CHOICES, adaptive_policy, add_adaptive_args, checkpoint_inputs, output_dir
from arc_encoder.config import torch_dtype
from arc_encoder.model import ARCModel

from .distributed import launched_as_rank_zero, rank_prefix
from .progress import quiet_lightning


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
    """Wraps an ARCModel; ``predict_step`` compresses every document of one shard."""

    def __init__(self, model: ARCModel, build: CacheBuildConfig, stream: DocumentStream) -> None:
        super().__init__()
        self.model = model.eval()
        self.build = build
        self.stream = stream
        self.scorer = None

    def predict_step(self, batch: int, batch_idx: int) -> dict[str, Any]:
        k = int(batch)
        ids, texts = self.stream.shard(k, self.build.docs_per_shard)
        if self.scorer is None and self.build.policy() is not None:
            self.scorer = make_scorer(self.build, self.model, self.device)  # adaptive builds score chunks first
        vectors, tokens, plan = compress_shard(self.model, self.build, texts, ids, self.scorer)
        return {"shard": k, "ids": ids, "texts": texts, "vectors": vectors, "tokens": tokens, "plan": plan}


class CacheShardWriter(BasePredictionWriter):
    """Writes each predicted shard at once (so a crash loses at most the shards in flight)."""

    def __init__(self, directory: Path, build: CacheBuildConfig, stream: DocumentStream) -> None:
        super().__init__(write_interval="batch")
        self.directory = Path(directory)
        self.build = build
        self.stream = stream
        self.written: list[int] = []
        self.manifest: dict[str, Any] | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        p = prediction
        write_shard(self.directory, self.build, p["shard"], p["ids"], p["texts"], p["vectors"], p["tokens"], p["plan"])
        self.written.append(p["shard"])

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()  # every rank's shards are on disk before the merge
        if trainer.global_rank == 0:
            self.manifest = finalize_cache(self.directory, self.build, self.stream)
        trainer.strategy.barrier()


def build_cache_lightning(
    checkpoint: str | Path,
    decoder: str,
    corpus: str | Path | DocumentStream,
    output: str | Path,
    dtype: StorageDtype = "float16",
    docs_per_shard: int = 256,
    batch_size: int = 8,
    dedupe: bool = False,
    corpus_format: CorpusFormat = "auto",
    resume: bool = False,
    model_dtype: str | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    adaptive: AdaptivePooling | None = None,
) -> CacheShardWriter:
    """Same arguments and same files as ``arc_encoder.cache.build.build_cache``; runs on any Trainer setup."""
    stream = corpus if isinstance(corpus, DocumentStream) else None
    build = CacheBuildConfig.for_checkpoint(
        checkpoint, decoder, "" if stream is not None else corpus, corpus_format=corpus_format,
        dtype=dtype, docs_per_shard=docs_per_shard, batch_size=batch_size, dedupe=dedupe, adaptive=adaptive,
    )
    model = ARCModel.from_pretrained(checkpoint, decoders=[decoder])
    with contextlib.ExitStack() as stack:
        if launched_as_rank_zero():  # locks, creates and validates the output directory; no rank writes yet
            stack.enter_context(cache_lock(output))  # held by rank 0 until the manifest is written
            stream, todo = prepare_build(output, build, resume, stream, model.tokenizer)
        else:  # a later rank: the same documents, read only; rank 0's shard list arrives by broadcast
            if stream is None:
                stream = DocumentStream.from_corpus(build.corpus, build.corpus_format, build.dedupe)
            todo = None
        if model_dtype is not None:
            model.to(torch_dtype(model_dtype))
        writer = CacheShardWriter(Path(output), build, stream)
        quiet_lightning()
        # Lightning's bar shows nothing until the end off a terminal; the summary line says what was done.
        kwargs = dict(logger=False, enable_checkpointing=False, use_distributed_sampler=False, inference_mode=True,
                      enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)
        kwargs.update(trainer_kwargs or {})
        kwargs["callbacks"] = list(kwargs.get("callbacks", [])) + [writer]
        trainer = L.Trainer(**kwargs)
        trainer.predict(CacheCompressModule(model, build, stream), datamodule=CacheShardData(todo),
                        return_predictions=False)
    return writer


def build_parser(prog: str = "python -m arc_encoder_train.cache_predict") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build a compressed RAG cache with Lightning Trainer.predict (DDP across GPUs; "
        "rank r writes shards k with k % world_size == r). Same files as `arc-encoder cache build`.",
    )
    p.add_argument("checkpoint", help="arc-encoder checkpoint directory")
    p.add_argument("--decoder", required=True, help="projector name")
    p.add_argument("--corpus", required=True, help="JSONL/JSON, parquet or .txt (fields id, text)")
    p.add_argument("--format", choices=get_args(CorpusFormat), default="auto")
    p.add_argument("--output", required=True, help="cache directory")
    p.add_argument("--dtype", choices=get_args(StorageDtype), default="float16", help="storage dtype")
    p.add_argument("--docs-per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="documents compressed together")
    p.add_argument("--dedupe", action="store_true", help="keep the first of duplicate ids instead of failing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build")
    p.add_argument("--model-dtype", choices=DTYPE_CHOICES, help="cast the model (e.g. bfloat16 on GPU)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto", help="number of devices or 'auto'")
    p.add_argument("--strategy", default="auto", help="'ddp' for several GPUs")
    add_adaptive_args(p)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog) if prog else build_parser()
    args = parser.parse_args(argv)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    start = time.perf_counter()
    try:
        output_dir(args.output, "--output",
                   {"--corpus file": args.corpus, **checkpoint_inputs(args.checkpoint, args.decoder)})
        writer = build_cache_lightning(
            args.checkpoint, args.decoder, args.corpus, args.output, dtype=args.dtype,
            docs_per_shard=args.docs_per_shard, batch_size=args.batch_size, dedupe=args.dedupe,
            corpus_format=args.format, resume=args.resume, model_dtype=args.model_dtype,
            trainer_kwargs={"accelerator": args.accelerator, "devices": devices, "strategy": args.strategy},
            adaptive=adaptive_policy(args, read_config(args.checkpoint).encoder),
        )
    except (ValueError, OSError) as err:
        print(f"{parser.prog}: error: {rank_prefix()}{' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if writer.manifest is not None:
        m = writer.manifest
        print(f"wrote {args.output}: {m['num_docs']} docs, {m['tokens']} tokens -> {m['vectors']} vectors in "
              f"{m['num_shards']} shards ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
