"""The `lm` job: train a small plain causal LM (+ BPE tokenizer) to serve as a frozen decoder.

No pretrained decoder can be downloaded here, and a frozen decoder must be a trained LM for
compression to mean anything, so the quickstart and the quality benchmark train one first.
Saved with `save_pretrained` + the tokenizer, written to a temp dir and renamed into place.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from arc_encoder.objectives import mean_loss
from arc_encoder.storage import atomic_write_json
from arc_encoder.tiny import tiny_causal_lm, tiny_config, train_tokenizer

from .data import _CACHE, DataSpec, iter_texts
from .module import cosine_with_warmup


@dataclass
class LMSpec:
    """Shape and schedule of the small decoder LM (defaults: ~0.6M params, ~20 s on 2 cores)."""

    out_dir: str = "runs/tiny-decoder"
    family: str = "llama"
    vocab_size: int = 1024
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    seq_len: int = 128
    batch_size: int = 16
    max_steps: int = 300
    lr: float = 3e-3
    tokenizer_docs: int = 2000  # documents used to train the tokenizer
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "seq_len", "batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"lm.{name} must be >= 1, got {getattr(self, name)}")


class _TokenBlocks(IterableDataset):
    """Endless [batch, seq_len + 1] blocks of concatenated documents."""

    def __init__(self, data: DataSpec, tokenizer, spec: LMSpec) -> None:
        self.data, self.tok, self.spec = data, tokenizer, spec

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.spec.seq_len + 1
        buf: list[int] = []
        rows: list[list[int]] = []
        for epoch in itertools.count():
            for text in iter_texts(self.data, "train", epoch, shuffle=True):
                buf += _CACHE(self.tok, text) + [self.tok.eos_token_id]
                while len(buf) >= n:
                    rows.append(buf[:n])
                    buf = buf[n:]
                    if len(rows) == self.spec.batch_size:
                        yield torch.tensor(rows)
                        rows = []


class CausalLMModule(L.LightningModule):
    def __init__(self, model, spec: LMSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.losses: list[torch.Tensor] = []  # detached; read once at the end (no per-step sync)

    def training_step(self, block: torch.Tensor, idx: int) -> torch.Tensor:
        logits = self.model(input_ids=block[:, :-1]).logits
        loss = mean_loss(logits.float(), block[:, 1:])
        self.log("lm/loss", loss, prog_bar=True)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.spec.lr, weight_decay=0.01)
        total = self.spec.max_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, 20, total, 0.05, overlap=True))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def is_decoder_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file() and (
        path / "model.safetensors"
    ).is_file()


def train_lm(spec: LMSpec, data: DataSpec, accelerator: str = "auto", progress: bool = True) -> dict:
    """Train and save the LM to ``spec.out_dir`` (which must not exist); return a summary."""
    import time

    out = Path(spec.out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another lm.out_dir")
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
    module = CausalLMModule(model, spec)
    trainer = L.Trainer(max_steps=spec.max_steps, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=progress, gradient_clip_val=1.0,
                        enable_model_summary=False, precision="bf16-mixed" if torch.cuda.is_available() else "32-true")
    # One loader process tokenizes ahead while the accelerator trains (order is unchanged).
    loader = DataLoader(_TokenBlocks(data, tokenizer, spec), batch_size=None, num_workers=data.num_workers)
    trainer.fit(module, loader)
    model = model.cpu().float()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        losses = [float(x) for x in module.losses]
        k = max(1, len(losses) // 10)
        summary = {"steps": len(losses), "seconds": round(time.time() - start, 1),
                   "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
                   "parameters": sum(p.numel() for p in model.parameters()), "spec": spec.__dict__}
        atomic_write_json(tmp / "lm_summary.json", summary)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
