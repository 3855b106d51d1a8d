"""The training jobs' config sections that the command line's parser needs: optimiser, data, tiny LM.

They live here, apart from the Lightning modules that use them, so that building the parser
(`arc-encoder-train JOB --help`) imports neither torch nor Lightning. ``arc_encoder_train.module``,
``.data`` and ``.lm`` re-export them under their old names. No ``if TYPE_CHECKING:`` imports here:
jsonargparse executes those blocks to resolve annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal


@dataclass
class OptimSpec:
    """AdamW and torch's one-cycle schedule, as the reference trains (``train.py``; paper Table 10).

    Two parameter groups: the encoder with its special tokens (the reference keeps
    ``rec_tok``/``cont_tok`` in the encoder, so they train at ``lr``) and the projector MLPs at
    ``projector_lr`` (default ``lr * projector_lr_ratio``; the paper: 1e-5 and 5e-5). Weight
    decay applies to every trained parameter, as the reference's one AdamW ``weight_decay``.
    The schedule is ``torch.optim.lr_scheduler.OneCycleLR`` with the reference's arguments:
    ``pct_start = warmup_steps / total``, ``div_factor = lr / initial_lr``, ``final_div_factor
    = lr / final_lr``, cosine annealing, and torch's default momentum cycling (AdamW's beta1
    goes 0.95 -> 0.85 -> 0.95 over the cycle, replacing ``beta1``). Under torch's semantics
    each group starts at its max lr / div_factor and ends at that / final_div_factor (with the
    paper's values: 1e-20, then about 1e-25: zero in practice).
    """

    lr: float = 1.0e-5
    """encoder + special tokens learning rate (max of the cycle; paper 1e-5)"""
    projector_lr: float | None = None
    """projector MLPs' learning rate; None: lr x projector_lr_ratio"""
    projector_lr_ratio: float = 5.0
    """projector lr / encoder lr when projector_lr is None (paper: 5)"""
    weight_decay: float = 0.1
    """AdamW weight decay on every trained parameter (paper 0.1)"""
    beta1: float = 0.9
    """AdamW beta1, used only with cycle_momentum false"""
    beta2: float = 0.95
    """AdamW beta2"""
    eps: float = 1.0e-8
    """AdamW eps"""
    warmup_steps: int = 1000
    """steps of the one-cycle warm-up (paper 1000)"""
    initial_lr: float = 1.0e-20
    """the cycle's starting lr (reference initial_lr: div_factor = lr / initial_lr)"""
    final_lr: float = 1.0e-10
    """the cycle's final lr (reference final_lr: final_div_factor = lr / final_lr)"""
    anneal: Literal["cos", "linear"] = "cos"
    """annealing shape of the cycle"""
    cycle_momentum: bool = True
    """torch's OneCycleLR default (kept by the reference): beta1 cycles 0.95 -> 0.85 -> 0.95"""
    total_steps: int = 0
    """length of the cycle (0: trainer.max_steps); set it to stop early and resume on the same curve"""

    def __post_init__(self) -> None:
        for name in ("lr", "projector_lr_ratio", "initial_lr", "final_lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if self.projector_lr is not None and not self.projector_lr > 0:
            raise ValueError(f"optim.projector_lr must be > 0 (or null: lr * projector_lr_ratio), got {self.projector_lr}")
        if self.initial_lr > self.lr:
            raise ValueError(f"optim.initial_lr ({self.initial_lr}) must be <= optim.lr ({self.lr})")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.total_steps < 0:
            raise ValueError(f"optim.warmup_steps and optim.total_steps must be >= 0, got "
                             f"{self.warmup_steps}, {self.total_steps}")
        if self.warmup_steps == 1:  # OneCycleLR's warm-up phase ends at step warmup - 1 and divides by it
            raise ValueError("optim.warmup_steps must be 0 or >= 2 (torch's OneCycleLR cannot warm up over one step)")
        if self.anneal not in ("cos", "linear"):
            raise ValueError(f"optim.anneal must be 'cos' or 'linear', got {self.anneal!r}")

    @property
    def max_projector_lr(self) -> float:
        return self.projector_lr if self.projector_lr is not None else self.lr * self.projector_lr_ratio

    def cycle_length(self, max_steps: int) -> int:
        """Steps of the one-cycle schedule: ``total_steps``, else the trainer's ``max_steps``.

        Refused when training would step past the cycle (torch's OneCycleLR raises then) or
        when warm-up would not end inside it.
        """
        total = self.total_steps or max_steps
        if max_steps > total:
            raise ValueError(f"optim.total_steps={total} is shorter than trainer.max_steps={max_steps}: the "
                             "one-cycle schedule ends at total_steps (0 = trainer.max_steps)")
        if self.warmup_steps >= total:
            length = "optim.total_steps" if self.total_steps else "trainer.max_steps"
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be < the schedule's {total} steps "
                             f"({length}); set --optim.warmup_steps lower (0, or 2 to {total - 1})")
        return total

    def scheduler(self, optimizer: torch.optim.Optimizer, max_steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
        """The reference's ``OneCycleLR`` over ``optimizer``'s groups (max lr = each group's "lr")."""
        import torch

        total = self.cycle_length(max_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=self.warmup_steps / total, anneal_strategy=self.anneal, cycle_momentum=self.cycle_momentum,
            div_factor=self.lr / self.initial_lr, final_div_factor=self.lr / self.final_lr,
        )


def bundled_corpus(split: str) -> str:
    """Path of the bundled pydoc_small split (train / validation / test)."""
    path = resources.files("arc_encoder.resources") / "pydoc_small" / f"{split}.jsonl.gz"
    return str(path)


@dataclass
class DataSpec:
    """Where the text comes from and how it is cut into samples."""

    train_files: list[str] | str = field(default_factory=list)
    """training text: one file or a list of .txt / .json / .jsonl / .parquet files, optionally .gz (empty: the bundled Python docs)"""
    validation_files: list[str] | str = field(default_factory=list)
    """validation text: one file or a list, same formats (empty: the bundled Python docs' validation split)"""
    dataset_dir: str = ""
    """a `datasets.save_to_disk` directory with train/validation splits (instead of the files)"""
    text_field: str = "text"
    """the field of JSON/parquet records that holds the text"""
    context_tokens: int = 64
    """decoder tokens compressed per sample"""
    target_tokens: int = 32
    """decoder tokens to continue after the compressed context"""
    max_context_tokens: int = 512
    """finetune: QA contexts are cut to this many tokens"""
    batch_size: int = 8
    """samples per batch and device"""
    val_batches: int = 4
    """validation batches per decoder and device"""
    reconstruction_ratio: float = 0.3
    """share of reconstruction batches, the rest continue (paper: 0.2-0.5 works best)"""
    shuffle_buffer: int = 1000
    """documents in the streaming shuffle buffer"""
    seed: int = 0
    """seed of the data order"""
    # Worker w of W builds every W-th batch, so the stream order (and exact resume) is the
    # same for any number. Each reads the whole stream to find its samples' windows.
    num_workers: int = 1
    """loader processes per rank, overlapping the training step (0: in the training process)"""

    def __post_init__(self) -> None:
        for name in ("train_files", "validation_files"):  # one file given as a string
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name in ("context_tokens", "target_tokens", "batch_size", "val_batches", "max_context_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.reconstruction_ratio <= 1.0:
            raise ValueError(f"data.reconstruction_ratio must be in [0, 1], got {self.reconstruction_ratio}")

    def files(self, split: str) -> list[str]:
        files = self.train_files if split == "train" else self.validation_files
        if not files and not self.dataset_dir:
            files = [bundled_corpus(split)]
        for f in files:
            if not Path(f).is_file():
                raise FileNotFoundError(f"data file {f!r} ({split}) does not exist")
            if Path(f).stat().st_size == 0:
                raise ValueError(f"{split} data {f}: the file is empty")
        return list(files)

    def check(self) -> None:
        """Fail before training when a source is missing."""
        if self.dataset_dir:
            if not Path(self.dataset_dir).is_dir():
                raise FileNotFoundError(f"data.dataset_dir {self.dataset_dir!r} does not exist")
        else:
            self.files("train")
            self.files("validation")


@dataclass
class LMSpec:
    """Shape and schedule of the small decoder LM (defaults: ~0.6M params, ~20 s on 2 cores)."""

    out_dir: str = "runs/tiny-decoder"
    """directory the LM and its tokenizer are saved to (must not exist)"""
    family: str = "llama"
    """architecture (llama, mistral, qwen2, ...)"""
    vocab_size: int = 1024
    """BPE vocabulary trained on the data"""
    hidden_size: int = 96
    """model width"""
    num_layers: int = 4
    """transformer blocks"""
    num_heads: int = 4
    """attention heads"""
    num_kv_heads: int = 2
    """key/value heads (grouped-query attention)"""
    intermediate_size: int = 256
    """MLP width"""
    seq_len: int = 128
    """tokens per training sequence"""
    batch_size: int = 16
    """sequences per batch and device"""
    max_steps: int = 300
    """optimizer steps"""
    lr: float = 3e-3
    """peak learning rate (warm-up, then cosine)"""
    tokenizer_docs: int = 2000
    """documents the tokenizer is trained on"""
    seed: int = 0
    """seed of the weights and the data order"""
    devices: int | str = 1
    """devices per node; with several, batch_size is per device"""
    num_nodes: int = 1
    """nodes"""
    strategy: str = "auto"
    """auto, or ddp for several devices"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "seq_len", "batch_size", "max_steps", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"lm.{name} must be >= 1, got {getattr(self, name)}")
        if self.strategy == "fsdp":
            raise ValueError("lm.strategy fsdp is not supported (the LM is small); use ddp")
