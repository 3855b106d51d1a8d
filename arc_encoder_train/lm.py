"""The `lm` job: train a small plain causal LM (+ BPE tokenizer) to serve as a frozen decoder.

No pretrained decoder can be downloaded here, and a frozen decoder must be a trained LM for
compression to mean anything, so the quickstart and the quality benchmark train one first.
Saved with `save_pretrained` + the tokenizer, written to a temp dir and renamed into place.

Several processes (``lm.devices``, ``lm.num_nodes``, ``lm.strategy: ddp``): global batch ``i``
is rows ``[i * G, (i + 1) * G)`` of one block stream (G = batch_size x processes) and each rank
trains on its slice; every rank trains the same tokenizer (checked), rank 0 saves.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from arc_encoder.loading import quiet_transformers
from arc_encoder.objectives import mean_loss
from arc_encoder.storage import atomic_write_json, make_temp_dir
from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer

from .config import TinyLMConfig
from .data import _CACHE, DataRank, DataConfig, iter_texts, worker_builds
from .distributed import RankAgreement, all_reduce_sum, launched_as_rank_zero, stop_launched_ranks
from .progress import TrainProgress, quiet_lightning


class _TokenBlocks(IterableDataset):
    """Endless [batch, seq_len + 1] blocks of concatenated documents: this rank's slice of every
    global batch of ``batch_size * world_size`` blocks (loader worker w builds every W-th)."""

    def __init__(self, data: DataConfig, tokenizer, spec: TinyLMConfig, rank: DataRank = DataRank()) -> None:
        self.data, self.tok, self.spec, self.rank = data, tokenizer, spec, rank

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.spec.seq_len + 1
        size = self.spec.batch_size * self.rank.world_size
        buf: list[int] = []
        rows: list[list[int]] = []
        index = 0
        for epoch in itertools.count():
            for text in iter_texts(self.data, "train", epoch, shuffle=True):
                buf += _CACHE(self.tok, text) + [self.tok.eos_token_id]
                while len(buf) >= n:
                    rows.append(buf[:n])
                    buf = buf[n:]
                    if len(rows) == size:
                        if worker_builds(index, 0):
                            yield torch.tensor(self.rank.part(rows, self.spec.batch_size))
                        rows, index = [], index + 1


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The LM's LR multiplier at ``step``: a cosine from 1 at step 0 to ``min_ratio`` at ``total``,
    scaled by a linear warm-up over ``warmup`` steps."""
    progress = min(1.0, step / total)
    return min(1.0, (step + 1) / warmup) * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class CausalLMModule(L.LightningModule):
    def __init__(self, model, spec: TinyLMConfig, data: DataConfig, tokenizer) -> None:
        super().__init__()
        self.model, self.spec, self.data, self.tokenizer = model, spec, data, tokenizer
        self.losses: list[torch.Tensor] = []  # detached; read once at the end (no per-step sync)

    def train_dataloader(self) -> DataLoader:
        # Built once the ranks are known; one loader process tokenizes ahead of the accelerator.
        rank = DataRank(self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(_TokenBlocks(self.data, self.tokenizer, self.spec, rank), batch_size=None,
                          num_workers=self.data.num_workers)

    def training_step(self, block: torch.Tensor, idx: int) -> torch.Tensor:
        logits = self.model(input_ids=block[:, :-1]).logits
        loss = mean_loss(logits.float(), block[:, 1:])
        # Every rank's rows are equally long, so the global batch's loss is the mean over ranks.
        world = self.trainer.world_size
        global_loss = loss.detach() if world == 1 else all_reduce_sum(loss.detach()) / world
        self.log("lm/loss", global_loss, prog_bar=True)
        self.losses.append(global_loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.spec.lr, weight_decay=0.01)
        total = self.spec.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, 20, total, 0.05))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def is_decoder_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file() and (
        path / "model.safetensors"
    ).is_file()


def train_lm(spec: TinyLMConfig, data: DataConfig, accelerator: str = "auto", progress: bool = True) -> dict | None:
    """Train and save the LM to ``spec.out_dir`` (which must not exist); return a summary
    (None on ranks other than global rank 0, which neither save nor report)."""
    import time

    out = Path(spec.out_dir)
    if out.exists() and launched_as_rank_zero():
        raise FileExistsError(f"{out} exists; remove it or choose another --lm.out_dir")
    data.check()
    start = time.time()
    L.seed_everything(spec.seed, verbose=False)
    docs = list(itertools.islice(iter_texts(data, "train"), spec.tokenizer_docs))
    if not docs:
        raise ValueError("the LM training data has no text")
    tokenizer = train_tokenizer(docs, vocab_size=spec.vocab_size)
    cfg = tiny_config(spec.family, vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                      num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
                      intermediate_size=spec.intermediate_size, max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = tiny_causal_lm(cfg, seed=spec.seed)
    module = CausalLMModule(model, spec, data, tokenizer)
    vocab = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    agree = RankAgreement(lambda trainer, m: {"tokenizer": vocab, "spec": spec.__dict__})
    quiet_lightning()
    trainer = L.Trainer(max_steps=spec.max_steps, accelerator=accelerator, devices=spec.devices,
                        num_nodes=spec.num_nodes, strategy=spec.strategy, logger=False,
                        callbacks=[agree, *([TrainProgress("lm/loss")] if progress else [])],
                        enable_checkpointing=False, enable_progress_bar=False, gradient_clip_val=1.0,
                        enable_model_summary=False, use_distributed_sampler=False,
                        precision="bf16-mixed" if torch.cuda.is_available() and accelerator != "cpu" else "32-true")
    try:
        trainer.fit(module)
    except BaseException:
        stop_launched_ranks(trainer)
        raise
    if not trainer.is_global_zero:
        return None
    model = model.cpu().float()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        with quiet_transformers():  # no "Writing model shards" bar
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        losses = [float(x) for x in module.losses]
        k = max(1, len(losses) // 10)
        summary = {"steps": len(losses), "seconds": round(time.time() - start, 1),
                   "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                   "parameters": sum(p.numel() for p in model.parameters()), "spec": spec.__dict__,
                   "world_size": trainer.world_size, "global_batch": spec.batch_size * trainer.world_size}
        atomic_write_json(tmp / "lm_summary.json", summary)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
