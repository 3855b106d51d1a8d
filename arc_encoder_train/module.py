"""LightningModule: trains the encoder + projectors against one or several frozen decoders.

Decoders are held in a plain dict (NOT registered submodules): Lightning checkpoints never
store them, optimizers never see them, FSDP never wraps them (every rank holds a full frozen
copy); they are moved to the module's device at fit/validation start and stay in eval mode
with gradients off.

With several processes every rank trains on its slice of each global batch (see data.py).
The loss weights every target token of the GLOBAL batch equally and validation metrics are
reduced over all ranks, so N processes train exactly as one process with the global batch.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedModel

from arc_encoder.model import ARCModel
from arc_encoder.decoders import freeze_decoder
from arc_encoder.metrics import evaluate_batch
from arc_encoder.samples import Batch, mixed_pooling

from .config import OptimConfig
from .data import DataPosition
from .distributed import all_reduce_sum, gathered_model, shard_for_fsdp


def param_groups(model: ARCModel, optim: OptimConfig) -> list[dict]:
    """The reference's AdamW groups over ``model``'s trainable parameters: the encoder and every
    projector's special tokens at ``optim.lr``, the projector MLPs at the projector rate (empty
    groups left out)."""
    special = {id(p.special_tokens) for p in model.projectors.values()}
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder += [p.special_tokens for p in model.projectors.values() if p.special_tokens.requires_grad]
    projector = [p for p in model.projectors.parameters() if p.requires_grad and id(p) not in special]
    groups = [{"params": encoder, "lr": optim.lr, "name": "encoder"},
              {"params": projector, "lr": optim.max_projector_lr, "name": "projector"}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], optim: OptimConfig,
                    max_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW over ``groups`` (`param_groups`) with the reference's betas, eps and weight decay, and its
    one-cycle schedule over ``max_steps`` (step the scheduler once per optimizer step)."""
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    opt = torch.optim.AdamW(groups, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay)
    return opt, optim.scheduler(opt, max_steps)


@torch.no_grad()
def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter without optimizer state its initial state (zero moments, step 0).

    AdamW creates a parameter's state at its first gradient, so a projector whose decoder has
    not had a step yet has none, and a sharded (FSDP) checkpoint saved then cannot be resumed:
    torch.distributed.checkpoint expects every parameter. One step at learning rate 0 with
    zero gradients creates the states; resetting their step to 0 gives exactly the numbers of
    lazy creation, so training is unchanged.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [p for p in params if p not in optimizer.state]
    if not missing:
        return
    grads, lrs = [p.grad for p in params], [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = None
    for p in missing:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad
    for p in missing:
        if "step" in optimizer.state[p]:
            optimizer.state[p]["step"].zero_()


class ARCTrainingModule(L.LightningModule):
    """One module for pretrain, adapt and finetune; they differ in data and what trains."""

    def __init__(
        self,
        model: ARCModel,
        decoders: dict[str, PreTrainedModel],
        optim: OptimConfig,
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
        self.max_steps = max_steps
        optim.cycle_length(max_steps)  # a schedule that cannot be built is refused before training
        self.train_encoder = train_encoder
        self.model.encoder.set_trainable(train_encoder)
        for name, projector in self.model.projectors.items():
            projector.requires_grad_(train_projectors is None or name in train_projectors)
        self.data_position = DataPosition()  # where the training stream stands, saved for exact resumption
        self._train_losses: list[torch.Tensor | float] = []  # tensors until read: no per-step sync
        self._val_totals: dict[str, list[float]] = {}  # metric -> [sum of value * batch size, batch sizes]

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

    def on_fit_start(self) -> None:
        # from_pretrained leaves models in eval mode and Lightning keeps each module's mode:
        # switch the trained side to train mode (dropout on, e.g. in BERT/MiniLM encoders).
        self.model.train()
        self._move_decoders()

    def on_validation_start(self) -> None:
        self._move_decoders()

    def on_train_start(self) -> None:
        # After any checkpoint was restored: parameters that have no state yet get their initial one.
        for optimizer in self.trainer.optimizers:
            initialize_optimizer_state(optimizer)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if not self.train_encoder:
            self.model.encoder.eval()  # frozen encoder: no dropout/noise while adapting

    def configure_model(self) -> None:
        """Under the "fsdp" strategy (a device mesh exists), shard the trained model; else nothing."""
        if self.device_mesh is not None:
            shard_for_fsdp(self, self.device_mesh["data_parallel"], self.trainer.precision)

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def _global_token_mean(self, loss: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, the global batch's mean loss), every target token weighted equally.

        Each rank's ``loss`` is the mean over its own ``tokens``, and DDP/FSDP average gradients
        over ranks, which would weight a token by 1 / its rank's token count. Scaling by
        tokens * world / global tokens makes the averaged gradient that of the global batch's
        token mean, as in one process. One small all-reduce, no host sync.
        """
        world = self._world_size()
        if world == 1:
            return loss, loss.detach()
        totals = all_reduce_sum(torch.stack([loss.detach() * tokens, loss.new_tensor(float(tokens))]))
        return loss * (tokens * world) / totals[1], totals[0] / totals[1]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        factors = self.model.encoder.config.pooling_factors
        if factors:  # mixed-pooling training: the global batch draws its factors (seeded by its index)
            offset, size = batch.meta.get("offset", 0), batch.meta.get("global_size", len(batch))
            batch.pooling_factors = mixed_pooling(batch.index, size, factors)[offset : offset + len(batch)]
        loss = self.model(batch, self.decoders[batch.decoder])
        loss, global_loss = self._global_token_mean(loss, batch.num_target_tokens)
        self.data_position.advance(batch)
        n = batch.meta.get("global_size", len(batch))
        self.log("train/loss", global_loss, prog_bar=True, batch_size=n)
        self.log(f"train/loss_{batch.task}", global_loss, batch_size=n)
        self._train_losses.append(global_loss)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_totals = {}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        metrics = evaluate_batch(self.model, self.decoders[batch.decoder], batch)
        prefixes = ["", f"{batch.decoder}/"] if len(self.decoders) > 1 else [""]
        for prefix, key in ((p, k) for p in prefixes for k in metrics):
            total = self._val_totals.setdefault(f"val/{prefix}{key}", [0.0, 0.0])
            total[0] += metrics[key] * len(batch)
            total[1] += len(batch)

    def on_validation_epoch_end(self) -> None:
        """Log each metric's batch-size-weighted mean over every rank's validation batches."""
        if not self._val_totals:
            return
        names = sorted(self._val_totals)  # every rank has the same names (each gets batches of every decoder)
        totals = torch.tensor([self._val_totals[k] for k in names], dtype=torch.float64, device=self.device)
        if self._world_size() > 1:
            totals = all_reduce_sum(totals)
        for name, (value, count) in zip(names, totals.tolist()):
            # Already the same on every rank; sync_dist (averaging equal values) keeps Lightning content.
            self.log(name, value / count, prog_bar=name == "val/loss_compressed", sync_dist=True)

    def param_groups(self) -> list[dict]:
        """The reference's AdamW groups over trainable parameters (`param_groups`)."""
        groups = param_groups(self.model, self.optim)
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if sum(p.numel() for g in groups for p in g["params"]) != trained:
            raise ValueError("a trainable parameter is neither in the encoder nor in a projector")
        return groups

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.param_groups(), self.optim, self.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["arc_next_batch_index"] = self.data_position.batch
        checkpoint["arc_data_position"] = self.data_position.to_dict()
        checkpoint["arc_train_losses"] = self.train_losses

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "arc_data_position" in checkpoint:
            self.data_position = DataPosition.from_dict(checkpoint["arc_data_position"])
        else:  # older checkpoints: the batch index only
            self.data_position = DataPosition(int(checkpoint.get("arc_next_batch_index", 0)), None)
        self._train_losses = list(checkpoint.get("arc_train_losses", []))


class ExportCallback(Callback):
    """Write the `from_pretrained` checkpoint at every validation and at the end (global rank 0).

    Under FSDP every rank takes part: the full weights are gathered to rank 0's CPU first.
    """

    def __init__(self, export) -> None:
        self.export = export  # callable(ARCModel) -> None, called on global rank 0 only

    def _run(self, trainer: L.Trainer, module: ARCTrainingModule) -> None:
        if trainer.sanity_checking:
            return
        model = gathered_model(module)
        if trainer.is_global_zero:
            self.export(model)

    def on_validation_end(self, trainer, module) -> None:
        self._run(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._run(trainer, module)
