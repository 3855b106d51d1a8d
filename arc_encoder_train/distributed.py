"""Several training processes: which rank writes, FSDP sharding, gathered exports, rank agreement.

Launchers start ranks in two ways. Lightning's DDP launcher runs the user's command as
global rank 0 and re-executes that same command for every other local rank, with
``LOCAL_RANK`` (and ``NODE_RANK`` on other nodes) set; torchrun (``RANK``, ``LOCAL_RANK``,
``GROUP_RANK``) and SLURM's srun (``SLURM_PROCID``) start every rank themselves. Before the
process group exists, `launched_as_rank_zero` reads those variables so that only global rank 0
creates, validates and writes the run directory; every rank still checks its own inputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from arc_encoder.encoder import ARCEncoder
from arc_encoder.model import ARCModel
from arc_encoder.storage import atomic_write_json

from .ranks import RANK_VARIABLES, launched_as_rank_zero, rank_prefix  # noqa: F401 - re-exported


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over every rank (a new tensor; the input is left as it was)."""
    out = tensor.clone()
    torch.distributed.all_reduce(out)
    return out


# ---------------------------------------------------------------------------- strategies
class FSDP2Strategy(ModelParallelStrategy):
    """``trainer.strategy: fsdp``: FSDP2 (``fully_shard``) across every process.

    Each rank holds 1/world of the trained weights, gradients and optimizer state; the
    module shards itself in ``configure_model`` (`shard_for_fsdp`). Checkpoints are sharded
    (torch.distributed.checkpoint: ``last.ckpt/`` is a directory with one file per rank) and
    resume on any number of processes. Lightning's own ``FSDPStrategy`` (FSDP1) needs CUDA;
    this one also runs on CPU processes (gloo), which is how it is tested.
    """

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        # One data-parallel group over all processes (Lightning's default would make the
        # devices of a node a tensor-parallel group).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def trainer_strategy(name: str, unused_parameters: bool):
    """The Lightning strategy for ``trainer.strategy``: 'fsdp' -> `FSDP2Strategy`; 'ddp' with
    parameters that some steps do not use (one projector per decoder, round-robin) -> DDP that
    looks for them; anything else is passed to Lightning as is."""
    if name == "fsdp":
        return FSDP2Strategy()
    if name == "ddp" and unused_parameters:
        return DDPStrategy(find_unused_parameters=True)
    return name


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_for_fsdp(module: L.LightningModule, mesh, precision: str) -> None:
    """Shard ``module.model`` (encoder + projectors) over ``mesh`` with FSDP2; idempotent.

    Units: every full-length encoder block and the input embeddings (each called through its
    own forward); the root unit (the LightningModule) holds the rest: the pooled last block,
    whose sub-layers the encoder calls directly, the final norm and the projectors. The root's
    ``training_step`` / ``validation_step`` are registered as forward methods so its weights
    are gathered around them. Frozen decoders are not submodules: each rank keeps a full copy,
    never in the optimizer. With bf16 precision the gathered weights and gradients are bf16
    (reduced in fp32) while the sharded master weights and optimizer state stay fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if is_fsdp(module):
        return
    policy = MixedPrecisionPolicy()
    if precision.startswith("bf16"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    encoder = module.model.encoder
    for block in encoder.blocks[:-1]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(encoder.backbone.get_input_embeddings(), mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    for method in ("training_step", "validation_step"):
        register_fsdp_forward_method(module, method)


def model_with_weights(model: ARCModel, state: dict[str, torch.Tensor]) -> ARCModel:
    """A copy of ``model``'s structure holding ``state`` (full CPU tensors), built without allocating."""
    with torch.device("meta"):
        encoder = ARCEncoder.from_backbone_config(model.encoder.config, model.encoder.backbone.config)
        copy_ = ARCModel(copy.deepcopy(model.config), encoder, model.tokenizer)
    copy_.load_state_dict(state, strict=True, assign=True)
    return copy_


def gathered_model(module: L.LightningModule) -> ARCModel | None:
    """The trained ARCModel with full weights on global rank 0 (None on the others).

    Under FSDP this is a collective: every rank must call it; each sharded tensor is gathered
    in turn to rank 0's CPU, so no GPU ever holds the whole model at once.
    """
    if not is_fsdp(module):
        return module.model if module.trainer.is_global_zero else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not module.trainer.is_global_zero:
        return None
    return model_with_weights(module.model, {k.removeprefix("model."): v for k, v in state.items()})


# ---------------------------------------------------------------------------- run records, agreement, failure
def record_launch(run_dir: Path, job: str, cfg, trainer: L.Trainer, changes: dict | None = None, log=None) -> dict:
    """Print how many processes train and the global batch; append it to runs/<name>/launches.json
    (with ``changes``: the settings a resume changed, {key: [before, now]}) and to ``log`` (the run's log.txt)."""
    t = cfg.trainer
    world = trainer.num_devices * trainer.num_nodes
    entry = {"job": job, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resume": cfg.run.resume,
             "strategy": t.strategy, "num_nodes": trainer.num_nodes, "devices_per_node": trainer.num_devices,
             "world_size": world, "batch_size_per_device": cfg.data.batch_size,
             "accumulate_grad_batches": t.accumulate_grad_batches,
             "global_batch": cfg.data.batch_size * world * t.accumulate_grad_batches}
    if changes:
        entry["config_changes"] = changes
    line = (f"{job}: {world} process{'es' if world > 1 else ''} ({trainer.num_nodes} node(s) x {trainer.num_devices} "
            f"device(s), strategy {t.strategy}); global batch {entry['global_batch']} = {cfg.data.batch_size} per "
            f"device x {world} x {t.accumulate_grad_batches} accumulated")
    print(line, file=sys.stderr)
    if log is not None:
        log.write(("resumed " if cfg.run.resume else "launched ") + line)
    path = run_dir / "launches.json"
    launches = json.loads(path.read_text())["launches"] if path.is_file() else []
    atomic_write_json(path, {"launches": [*launches, entry]})
    return entry


def config_fingerprint(job: str, cfg) -> str:
    """sha256 of the resolved config: every rank must run the same one."""
    text = json.dumps({"job": job, **asdict(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_agreement(states: list[dict]) -> None:
    """Raise unless every rank reported the same state (config fingerprint, step, data position)."""
    differ = [r for r, state in enumerate(states) if state != states[0]]
    if differ:
        shown = "; ".join(f"rank {r}: {states[r]}" for r in [0, *differ])
        raise RuntimeError(f"the ranks disagree on the run's config or resumed state ({shown}); "
                           "launch every rank with the same command, config and run directory")


class RankAgreement(Callback):
    """At the start of training, after any checkpoint is restored, every rank's ``state_fn``
    must agree; otherwise every rank fails with the same error naming the difference."""

    def __init__(self, state_fn: Callable[[L.Trainer, L.LightningModule], dict]) -> None:
        self.state_fn = state_fn

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        states: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, self.state_fn(trainer, module))
        check_agreement(states)


def stop_launched_ranks(trainer: L.Trainer) -> None:
    """After a failure here, end the ranks that Lightning's launcher started from this process.

    They would otherwise wait in a collective. A failure on one of them ends this process
    through Lightning's process observer; under torchrun its agent, and under SLURM
    ``srun --kill-on-bad-exit=1``, end the other ranks.
    """
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
        launcher.kill(signal.SIGKILL)
