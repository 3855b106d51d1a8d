"""Low-rank adapters on a frozen backbone: an encoder whose trained part is small enough to keep.

A full SmolLM2-based encoder is ~270 MB; the weights a run actually changes can be a few MB.
With ``EncoderConfig.tuning = "lora"`` the backbone's weights stay as the base model has them;
every listed linear layer of its blocks gets ``W x + (alpha / r) B A x`` with trained A [r, in]
(small random init) and B [out, r] (zeros: the adapted encoder starts as the base), and the
last ``full_blocks`` blocks (the pooled block learns to pool) train in full. A checkpoint then
stores only those tensors (``encoder/delta.safetensors``), applied at load time to the base
model named by its weights' identity (``arc_encoder.gguf.weights_identity``). The ARC paper
reports a LoRA-tuned encoder slightly below a fully trained one.

Adapters stay unmerged, so a loaded delta trains on exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T``; ``base`` is frozen and keeps its parameter names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, and as peft's default

    @property
    def weight(self) -> torch.Tensor:  # what callers that read ``.weight`` (dtype, device, shapes) expect
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t().to(x.dtype)) @ (self.lora_B.t().to(x.dtype) * self.scale)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in (what the adapted layer computes)."""
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A).to(self.base.weight.dtype)


def add_lora(blocks: Iterable[nn.Module], targets: Iterable[str], rank: int, alpha: float) -> int:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` inside ``blocks`` by a
    `LoRALinear`; returns how many were wrapped (0 is an error: the names match nothing)."""
    targets = set(targets)
    wrapped = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
                    wrapped += 1
    if not wrapped:
        raise ValueError(f"lora_targets {sorted(targets)} name no linear layer of the encoder's blocks")
    return wrapped


def is_lora_parameter(name: str) -> bool:
    return name.endswith(("lora_A", "lora_B"))
