"""LightningModule: trains the encoder + projectors against one or several frozen decoders.

Decoders are held in a plain dict (NOT registered submodules): Lightning checkpoints never
store them, optimizers never see them, FSDP never wraps them; they are moved to the
module's device at fit/validation start and stay in eval mode with gradients off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from transformers import PreTrainedModel

from arc_encoder.model import ARCModel, freeze_decoder
from arc_encoder.objectives import evaluate_batch
from arc_encoder.samples import Batch, mixed_pooling


@dataclass
class OptimSpec:
    """AdamW on trainable parameters, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    # Length of the cosine schedule; 0 = trainer.max_steps. Set it to stop a run early
    # (and resume it later) without changing its learning-rate curve.
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float, overlap: bool = False) -> float:
    """LR multiplier at ``step``: linear warm-up over ``warmup`` steps, cosine from 1 to ``min_ratio`` at ``total``.

    ``overlap=False`` (the ARC jobs): the cosine starts when warm-up ends. ``overlap=True`` (the
    ``lm`` job): the cosine runs from step 0 and warm-up scales it.
    """
    if overlap:
        progress = min(1.0, step / total)
        return min(1.0, (step + 1) / warmup) * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ARCTrainingModule(L.LightningModule):
    """One module for pretrain, adapt and finetune; they differ in data and what trains."""

    def __init__(
        self,
        model: ARCModel,
        decoders: dict[str, PreTrainedModel],
        optim: OptimSpec,
        max_steps: int,
        train_encoder: bool = True,
        train_projectors: list[str] | None = None,
    ) -> None:
        super().__init__()
        missing = sorted(set(decoders) - set(model.projectors.keys()))
        if missing:
            raise ValueError(f"decoders {missing} have no projector in the model")
        self.model = model
        self.decoders = {name: freeze_decoder(d) for name, d in decoders.items()}  # plain dict
        self.optim = optim
        self.max_steps = optim.total_steps or max_steps
        self.train_encoder = train_encoder
        self.model.encoder.requires_grad_(train_encoder)
        for name, projector in self.model.projectors.items():
            projector.requires_grad_(train_projectors is None or name in train_projectors)
        self.next_batch_index = 0  # position in the batch stream, saved for exact resumption
        self._train_losses: list[torch.Tensor | float] = []  # tensors until read: no per-step sync

    @property
    def train_losses(self) -> list[float]:
        """Every training step's loss so far (read at checkpoints and in the summary)."""
        self._train_losses = [float(x) for x in self._train_losses]
        return list(self._train_losses)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _move_decoders(self) -> None:
        for d in self.decoders.values():
            d.to(self.device)

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        """A `Batch` holds only token-id lists; the model moves the tensors it builds.

        Lightning's default walks every nested list looking for tensors: 120 ms per
        128-sample batch (measured on CPU), which dominated GPU steps at small model sizes.
        """
        return batch

    def on_fit_start(self) -> None:
        # from_pretrained leaves models in eval mode and Lightning keeps each module's mode:
        # switch the trained side to train mode (dropout on, e.g. in BERT/MiniLM encoders).
        self.model.train()
        self._move_decoders()

    def on_validation_start(self) -> None:
        self._move_decoders()

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if not self.train_encoder:
            self.model.encoder.eval()  # frozen encoder: no dropout/noise while adapting

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        factors = self.model.encoder.config.pooling_factors
        if factors:  # mixed-pooling training: every sample draws its factor (seeded by batch index)
            batch.pooling_factors = mixed_pooling(batch.index, len(batch), factors)
        loss = self.model(batch, self.decoders[batch.decoder])
        self.next_batch_index = batch.index + 1
        n = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log(f"train/loss_{batch.task}", loss, batch_size=n)
        self._train_losses.append(loss.detach())
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        metrics = evaluate_batch(self.model, self.decoders[batch.decoder], batch)
        several = len(self.decoders) > 1
        for key, value in metrics.items():
            self.log(f"val/{key}", value, batch_size=len(batch), prog_bar=key == "loss_compressed")
            if several:
                self.log(f"val/{batch.decoder}/{key}", value, batch_size=len(batch))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr, betas=(self.optim.beta1, self.optim.beta2),
        )
        o = self.optim
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cosine_with_warmup(step, o.warmup_steps, self.max_steps, o.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["arc_next_batch_index"] = self.next_batch_index
        checkpoint["arc_train_losses"] = self.train_losses

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.next_batch_index = int(checkpoint.get("arc_next_batch_index", 0))
        self._train_losses = list(checkpoint.get("arc_train_losses", []))


class ExportCallback(Callback):
    """Write the `from_pretrained` checkpoint at every validation and at the end (rank 0)."""

    def __init__(self, export) -> None:
        self.export = export  # callable(module) -> None

    @rank_zero_only
    def _run(self, trainer: L.Trainer, module: ARCTrainingModule) -> None:
        if not trainer.sanity_checking:
            self.export(module)

    def on_validation_end(self, trainer, module) -> None:
        self._run(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._run(trainer, module)
