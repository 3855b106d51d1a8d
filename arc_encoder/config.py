"""Typed configuration for the ARC encoder, its projectors and the whole model.

Every config is a dataclass that validates itself in ``__post_init__`` (a bad value is a
``ValueError`` naming the field) and round-trips through JSON. ``from_dict`` rejects unknown
keys, so a typo in a YAML/JSON file fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

# Where the pooled queries sit in RoPE space.
#   "pooled_index": the m pooled queries take positions 0..m-1 (ARC-Encoder reference).
#   "group_mean":   each token query is rotated at its own position, then the group is
#                   averaged (pooling happens after RoPE).
PooledQueryPositions = Literal["pooled_index", "group_mean"]
ProjectorActivation = Literal["none", "gelu", "silu"]
SpecialToken = Literal["continuation", "reconstruction"]

DtypeName = Literal["float32", "bfloat16", "float16"]

CONFIG_NAME = "arc_config.json"
FORMAT_VERSION = 1


def torch_dtype(name: str):
    """The torch dtype a config or command line names (``DtypeName``); the one dtype map."""
    import torch

    _check_literal("dtype", name, DtypeName)
    return getattr(torch, name)


def _check_literal(name: str, value: Any, allowed_type: Any) -> None:
    allowed = get_args(allowed_type)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)``, but unknown keys are a ValueError naming ``where`` and the allowed keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    return cls(**data)


@dataclass
class EncoderConfig:
    """How the encoder is cut out of a causal LM and where it pools.

    ``base_model`` is a local path (or hub id) of any HF causal LM of the Llama family
    (Llama, Mistral, Qwen2, Qwen3...). The last ``layers_removed`` transformer blocks are
    dropped (paper: 2); the last remaining block pools its queries by ``pooling_factor``.
    """

    base_model: str
    layers_removed: int = 2
    pooling_factor: int = 4
    pooled_query_positions: PooledQueryPositions = "pooled_index"
    # Reference: the pooled block has no residual around attention (input is full length).
    pooled_residual: bool = False
    # Apply the backbone's final norm to the pooled states (keeps the projector's input scale fixed).
    final_norm: bool = True
    # Long contexts are split into chunks of at most this many tokens (paper: 1024).
    chunk_len: int = 1024
    # A context longer than chunk_len * max_chunks tokens is refused (paper: 32 x 1024).
    max_chunks: int = 32
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    # Mixed-pooling training: every sample draws its factor from this set, so one encoder
    # serves entropy-adaptive compression (arc_encoder.adaptive). Empty: pooling_factor only.
    pooling_factors: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError("base_model must be a non-empty path or model id")
        if not isinstance(self.pooling_factor, int) or self.pooling_factor < 1:
            raise ValueError(f"pooling_factor must be an integer >= 1, got {self.pooling_factor!r}")
        if not isinstance(self.layers_removed, int) or self.layers_removed < 0:
            raise ValueError(f"layers_removed must be an integer >= 0, got {self.layers_removed!r}")
        if not isinstance(self.chunk_len, int) or self.chunk_len < 1:
            raise ValueError(f"chunk_len must be an integer >= 1, got {self.chunk_len!r}")
        if not isinstance(self.max_chunks, int) or self.max_chunks < 1:
            raise ValueError(f"max_chunks must be an integer >= 1, got {self.max_chunks!r}")
        if self.chunk_len < self.pooling_factor:
            raise ValueError(
                f"chunk_len ({self.chunk_len}) must be >= pooling_factor ({self.pooling_factor})"
            )
        self.pooling_factors = tuple(self.pooling_factors)
        for pf in self.pooling_factors:
            if isinstance(pf, bool) or not isinstance(pf, int) or not 1 <= pf <= self.chunk_len:
                raise ValueError(f"pooling_factors must be integers in [1, chunk_len={self.chunk_len}], got {pf!r}")
        if self.pooling_factors:
            if len(set(self.pooling_factors)) != len(self.pooling_factors):
                raise ValueError(f"pooling_factors has duplicates: {list(self.pooling_factors)}")
            if self.pooling_factor not in self.pooling_factors:
                raise ValueError(
                    f"pooling_factor={self.pooling_factor} (the default) must be one of "
                    f"pooling_factors={list(self.pooling_factors)}"
                )
            self.pooling_factors = tuple(sorted(self.pooling_factors))
        _check_literal("pooled_query_positions", self.pooled_query_positions, PooledQueryPositions)
        _check_literal(
            "attn_implementation",
            self.attn_implementation,
            Literal["auto", "sdpa", "eager", "flash_attention_2"],
        )

    def check_backbone(self, num_hidden_layers: int) -> int:
        """Return the number of layers kept; ValueError when the backbone is too shallow."""
        kept = num_hidden_layers - self.layers_removed
        if kept < 1:
            raise ValueError(
                f"layers_removed={self.layers_removed} leaves {kept} of the backbone's "
                f"{num_hidden_layers} layers; at least 1 must remain"
            )
        return kept

    @property
    def trained_pooling_factors(self) -> tuple[int, ...]:
        """Every factor this encoder was trained to produce."""
        return self.pooling_factors or (self.pooling_factor,)

    def untrained_factors(self, factors) -> list[int]:
        """The factors among ``factors`` this encoder was never trained to produce (sorted)."""
        return sorted(set(factors) - set(self.trained_pooling_factors))

    def check_trained(self, factors, where: str = "") -> None:
        """ValueError naming the untrained factors (every adaptive or overridden plan checks here)."""
        untrained = self.untrained_factors(factors)
        if untrained:
            raise ValueError(
                f"{where}pooling factors {untrained} were never trained: this encoder knows "
                f"{list(self.trained_pooling_factors)} (pretrain with encoder.pooling_factors to mix factors)"
            )

    def compressed_len(self, num_tokens: int, pooling_factor: int | None = None) -> int:
        """Number of vectors a chunk of ``num_tokens`` tokens becomes."""
        return -(-num_tokens // (pooling_factor or self.pooling_factor))


@dataclass
class ProjectorConfig:
    """One decoder's projector: encoder width -> hidden -> decoder width (paper: no activation).

    ``decoder`` records where the frozen decoder lives and ``decoder_vocab_size`` /
    ``decoder_hidden_size`` let loads refuse a projector paired with the wrong decoder.
    """

    input_dim: int
    output_dim: int
    hidden_dim: int = 2048
    activation: ProjectorActivation = "none"
    decoder: str = ""
    decoder_vocab_size: int | None = None
    special_tokens: tuple[str, ...] = ("continuation", "reconstruction")

    def __post_init__(self) -> None:
        for name in ("input_dim", "output_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        _check_literal("activation", self.activation, ProjectorActivation)
        self.special_tokens = tuple(self.special_tokens)
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special_tokens has duplicates: {self.special_tokens}")
        for tok in self.special_tokens:
            _check_literal("special token", tok, SpecialToken)


@dataclass
class ARCConfig:
    """The whole compressor: one encoder shared by named per-decoder projectors."""

    encoder: EncoderConfig
    projectors: dict[str, ProjectorConfig] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = dataclass_from_dict(EncoderConfig, self.encoder, "encoder")
        fixed: dict[str, ProjectorConfig] = {}
        for name, proj in dict(self.projectors).items():
            if not name or not name.replace("-", "_").replace(".", "_").isidentifier():
                raise ValueError(
                    f"projector name {name!r} must be letters, digits, '_', '-' or '.' "
                    "(it becomes a file name)"
                )
            fixed[name] = (
                dataclass_from_dict(ProjectorConfig, proj, f"projectors.{name}")
                if isinstance(proj, dict)
                else proj
            )
        self.projectors = fixed
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (expected {FORMAT_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ARCConfig:
        return dataclass_from_dict(cls, data, "ARCConfig")

    @classmethod
    def from_json(cls, text: str) -> ARCConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config is not valid JSON: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ARCConfig:
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err
