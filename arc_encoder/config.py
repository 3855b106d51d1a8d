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

from .chunking import check_pooling_factor, compressed_len

# Where the pooled queries sit in RoPE space.
#   "pooled_index": the m pooled queries take positions 0..m-1 (ARC-Encoder reference).
#   "group_mean":   each token query is rotated at its own position, then the group is
#                   averaged (pooling happens after RoPE; needs pooled_query_input="pooled_queries").
PooledQueryPositions = Literal["pooled_index", "group_mean"]
# What the pooled block's queries are computed from.
#   "pooled_hidden":  queries from attention_norm(mean of the block's INPUT states per group)
#                     (ARC-Encoder reference, ``forward_embedder`` + ``TransformerBlock``).
#   "pooled_queries": the mean of the per-token queries (after norm and projection): format-1 behaviour.
PooledQueryInput = Literal["pooled_hidden", "pooled_queries"]
# How n tokens are cut into m = ceil(n / pf) groups.
#   "balanced":   sizes differ by at most one, larger first (reference ``split_integer(n, -pf)``:
#                 17 tokens at pf 8 -> 6, 6, 5).
#   "fixed_tail": groups of pf tokens and a shorter tail (17 at pf 8 -> 8, 8, 1): format-1 behaviour.
PoolingGroups = Literal["balanced", "fixed_tail"]
# How a backbone's sliding-window layers (Gemma 3) attend in the bidirectional encoder.
#   "full": every token sees the whole chunk, as in full-attention layers. The default: over
#           1,024-token chunks it beat "band" on all 16 held-out windows (continuation -0.84,
#           reconstruction -0.51 nats/token; benchmarks/results/gemma3_sliding_window_cpu.json).
#   "band": token i sees j when |i - j| < sliding_window // 2 + 1: 256 tokens each side for
#           Gemma 3's 512 (HF's bidirectional Gemma 3, ``use_bidirectional_attention``, as in
#           EmbeddingGemma). Identical to "full" for chunks up to the half-window.
SlidingWindowLayers = Literal["full", "band"]
ProjectorActivation = Literal["none", "gelu", "silu"]
# How a new projector's weights start.
#   "reference":     torch's default Linear init (the reference's).
#   "match_decoder": the output layer rescaled so that the projection of the encoder's states
#                    (on a fixed random token batch) has the median norm of the decoder's input
#                    embeddings: compressed context then starts at the scale the decoder reads.
ProjectorInit = Literal["reference", "match_decoder"]
# Where the special tokens live.
#   "encoder": one vector per token in ENCODER space, mapped by the projector (reference:
#              ``rec_tok`` / ``cont_tok`` embeddings of the encoder width, initialised to ones).
#   "decoder": free vectors in the decoder's embedding space: format-1 behaviour.
SpecialTokenSpace = Literal["encoder", "decoder"]
SpecialToken = Literal["continuation", "reconstruction"]
# Whether the decoder's BOS token starts its input (before the compressed context).
#   "reference": before fine-tuning rows and generation, not before pretraining windows (the
#                reference's layout: a window continues its document).
#   "always":    before every input, windows too: decoders that need it (Gemma 3: 6.00 -> 3.85
#                nats/token on held-out text with its BOS; benchmarks/results/bos_real_cpu.json).
#   "never":     no BOS anywhere.
#   "auto" (an option, resolved when the projector is created): "always" when the decoder's
#                tokenizer starts every text with BOS by itself, else "reference".
DecoderBos = Literal["reference", "always", "never"]
DecoderBosOption = Literal["auto", "reference", "always", "never"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
# What of the encoder trains, and so what a checkpoint stores.
#   "full": every encoder weight; the checkpoint holds them all.
#   "lora": the base model's weights stay frozen; low-rank adapters on the blocks' linear layers
#           and the last ``full_blocks`` blocks train; the checkpoint holds only those (a small
#           delta applied to the base model at load time, checked against ``base_sha256``).
EncoderTuning = Literal["full", "lora"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DtypeName = Literal["float32", "bfloat16", "float16"]

CONFIG_NAME = "arc_config.json"
# 2: the reference-faithful encoder and projector. 1: the earlier semantics, still loaded with
# their recorded settings (``upgrade_v1``). What changed, and how each older file loads: CHANGELOG.md.
FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)

# What format 1 computed, for the settings it had no key for (CHANGELOG.md).
LEGACY_ENCODER_OPTIONS: dict[str, Any] = {
    "pooled_residual": False,
    "final_norm": True,
    "pooled_query_input": "pooled_queries",
    "pooling_groups": "fixed_tail",
}
LEGACY_PROJECTOR_OPTIONS: dict[str, Any] = {"bias": True, "special_token_space": "decoder"}
_V1_ENCODER_KEYS = frozenset({
    "base_model", "layers_removed", "pooling_factor", "pooled_query_positions", "pooled_residual",
    "final_norm", "chunk_len", "max_chunks", "attn_implementation", "pooling_factors",
})
_V1_PROJECTOR_KEYS = frozenset({
    "input_dim", "output_dim", "hidden_dim", "activation", "decoder", "decoder_vocab_size", "special_tokens",
})


def torch_dtype(name: str):
    """The torch dtype a config or command line names (``DtypeName``); the one dtype map."""
    import torch

    _check_literal("dtype", name, DtypeName)
    return getattr(torch, name)


def _check_literal(name: str, value: Any, allowed_type: Any) -> None:
    allowed = get_args(allowed_type)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def is_int(value: Any, minimum: int) -> bool:
    """An int (never a bool or a string) >= minimum: JSON and YAML hold "96" and true as well as 96."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_int(name: str, value: Any, minimum: int) -> None:
    """`is_int`, or a ValueError naming ``name`` and the value."""
    if not is_int(value, minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    """A real bool: a YAML/JSON string such as "no" is an error, not a truthy value."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


class ArcEncoderWarning(UserWarning):
    """A condition the user should see but that does not stop the command (the CLIs print
    these as one ``warning:`` line)."""


def _check_number(name: str, value: Any, positive: bool = True) -> None:
    """A real number (an int or float, never a bool or a string), > 0 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
        raise ValueError(f"{name} must be a number{' > 0' if positive else ''}, got {value!r}")


# Keys of Hugging Face model configs that decide shapes and numerics; each must have its JSON type.
HF_INT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "max_position_embeddings", "head_dim")
HF_FLOAT_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_pct",
                 "partial_rotary_factor")
HF_BOOL_KEYS = ("tie_word_embeddings", "use_parallel_residual", "attention_bias", "mlp_bias")


def check_hf_config(data: Any, where: str) -> None:
    """A Hugging Face ``config.json`` dict whose shape and numeric keys have their real types.

    ``AutoConfig`` keeps whatever the JSON holds, so ``"hidden_size": "96"`` or
    ``"tie_word_embeddings": "no"`` would fail deep inside torch or silently mean true.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if not isinstance(data.get("model_type"), str) or not data["model_type"]:
        raise ValueError(f"{where}: model_type is missing or not a string")
    try:
        for key in HF_INT_KEYS:
            if data.get(key) is not None:
                check_int(key, data[key], 1)
        for key in HF_FLOAT_KEYS:
            if data.get(key) is not None:
                _check_number(key, data[key])
        for key in HF_BOOL_KEYS:
            if data.get(key) is not None:
                _check_bool(key, data[key])
        rope = data.get("rope_parameters")
        if rope is not None:
            if not isinstance(rope, dict):
                raise ValueError(f"rope_parameters must be a mapping, got {rope!r}")
            for key in ("rope_theta", "partial_rotary_factor"):
                if rope.get(key) is not None:
                    _check_number(f"rope_parameters.{key}", rope[key])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def dataclass_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)``, but unknown keys are a ValueError naming ``where`` and the allowed keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    return cls(**data)


@dataclass
class EncoderConfig:
    """How the encoder is cut out of a pretrained LM and how its last block pools.

    ``base_model`` is a local path (or hub id) of a Llama-family causal LM (Llama, Mistral,
    Qwen2, Qwen3), a Gemma 3 text model, a GPT-NeoX-family LM or a BERT-style encoder. The
    last ``layers_removed`` blocks are dropped (paper: 2); the last remaining block pools by
    ``pooling_factor``.

    The defaults compute what the ARC-Encoder reference computes (README "How it works"): in
    the last block ``pooled_h`` = mean of the block input over balanced groups, queries from
    ``attention_norm(pooled_h)``, ``h' = pooled_h + attn``, ``out = h' + FFN(ffn_norm(h'))``,
    no final norm. ``pooled_residual``, ``pooled_query_input``, ``pooling_groups`` and
    ``final_norm`` keep the earlier (format-1) semantics available as explicit options.
    """

    base_model: str
    """local HF causal-LM directory the encoder is cut from (training: or builtin:tiny-lm)"""
    layers_removed: int = 2
    """last blocks of the LM dropped (paper: 2)"""
    pooling_factor: int = 4
    """tokens per compressed vector (the default factor when several are trained)"""
    pooled_query_positions: PooledQueryPositions = "pooled_index"
    """RoPE positions of the pooled queries: 0..m-1 (reference), or per-token then averaged"""
    pooled_query_input: PooledQueryInput = "pooled_hidden"
    """pooled queries from the pooled block input (reference), or the mean of per-token queries (format 1)"""
    pooling_groups: PoolingGroups = "balanced"
    """n tokens -> ceil(n / pf) groups of balanced sizes (reference), or pf-sized with a short tail (format 1)"""
    pooled_residual: bool = True
    """residual of the pooled block = its pooled input (reference); false: none (format 1)"""
    final_norm: bool = False
    """apply the backbone's final norm to the pooled states (format 1); the reference does not"""
    chunk_len: int = 1024
    """long contexts are split into chunks of at most this many tokens (paper: 1024)"""
    max_chunks: int = 32
    """a context longer than chunk_len x max_chunks tokens is refused (paper: 32 x 1024)"""
    attn_implementation: AttnImplementation = "auto"
    """attention kernel of the regular blocks (auto: flash-attn 2 on a GPU when installed, else SDPA)"""
    pooling_factors: tuple[int, ...] = ()
    """mixed-pooling training: each sample draws its factor from these, e.g. [2, 4, 8]; empty: pooling_factor only"""
    tuning: EncoderTuning = "full"
    """full: every encoder weight trains and is saved; lora: base weights frozen, low-rank adapters + the last
    full_blocks blocks train, and checkpoints hold only those (a small delta on the base model)"""
    lora_rank: int = 16
    """tuning lora: rank of the adapters"""
    lora_alpha: float = 32.0
    """tuning lora: adapters scale by lora_alpha / lora_rank"""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """tuning lora: attribute names of the blocks' linear layers that get adapters"""
    full_blocks: int = 1
    """tuning lora: the last blocks trained in full, without adapters (1: the pooled block)"""
    base_sha256: str = ""
    """tuning lora: identity of the base model's weights (set when the encoder is built; a delta loads on no other)"""
    sliding_window_layers: SlidingWindowLayers = "full"
    """Gemma 3's sliding layers: full: the whole chunk (measured better); band: |i - j| <= window // 2 (HF's
    bidirectional Gemma 3)"""

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError("base_model must be a non-empty path or model id")
        _check_literal("tuning", self.tuning, EncoderTuning)
        check_int("lora_rank", self.lora_rank, 1)
        check_int("full_blocks", self.full_blocks, 0)
        _check_number("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_targets, (str, bytes)) or not isinstance(self.lora_targets, (list, tuple)) or not all(
                isinstance(t, str) and t for t in self.lora_targets) or not self.lora_targets:
            raise ValueError(f"lora_targets must be a non-empty list of layer names, got {self.lora_targets!r}")
        self.lora_targets = tuple(self.lora_targets)
        if not isinstance(self.base_sha256, str) or (self.base_sha256 and not (
                len(self.base_sha256) == 64 and all(c in "0123456789abcdef" for c in self.base_sha256))):
            raise ValueError(f"base_sha256 must be empty or 64 lowercase hex digits, got {self.base_sha256!r}")
        check_int("pooling_factor", self.pooling_factor, 1)
        check_int("layers_removed", self.layers_removed, 0)
        check_int("chunk_len", self.chunk_len, 1)
        check_int("max_chunks", self.max_chunks, 1)
        _check_bool("pooled_residual", self.pooled_residual)
        _check_bool("final_norm", self.final_norm)
        if self.chunk_len < self.pooling_factor:
            raise ValueError(
                f"chunk_len ({self.chunk_len}) must be >= pooling_factor ({self.pooling_factor})"
            )
        if isinstance(self.pooling_factors, (str, bytes)) or not isinstance(self.pooling_factors, (list, tuple)):
            raise ValueError(f"pooling_factors must be a list of integers, got {self.pooling_factors!r}")
        self.pooling_factors = tuple(self.pooling_factors)
        for pf in self.pooling_factors:
            check_pooling_factor(pf, self.chunk_len, "pooling_factors: ")
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
        _check_literal("pooled_query_input", self.pooled_query_input, PooledQueryInput)
        _check_literal("pooling_groups", self.pooling_groups, PoolingGroups)
        _check_literal("attn_implementation", self.attn_implementation, AttnImplementation)
        _check_literal("sliding_window_layers", self.sliding_window_layers, SlidingWindowLayers)
        if self.pooled_query_positions == "group_mean" and self.pooled_query_input != "pooled_queries":
            raise ValueError(
                "pooled_query_positions='group_mean' rotates per-token queries before averaging them; "
                "it needs pooled_query_input='pooled_queries' (got "
                f"pooled_query_input={self.pooled_query_input!r})"
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
                f"{list(self.trained_pooling_factors)} (pretrain with --encoder.pooling_factors to mix factors)"
            )

    def compressed_len(self, num_tokens: int, pooling_factor: int | None = None) -> int:
        """Number of vectors a chunk of ``num_tokens`` tokens becomes (either grouping: ceil(n / pf))."""
        return compressed_len(num_tokens, pooling_factor or self.pooling_factor)


@dataclass
class ProjectorOptions:
    """What a user chooses about a decoder's projector (the rest of ``ProjectorConfig`` comes
    from the models: widths, the decoder's path and vocabulary).

    Defaults follow the reference (``EmbProjector`` type "mlp", ``rec_tok``/``cont_tok``):
    two linear layers without bias and no activation; the special tokens are encoder-space
    vectors that go through the same two layers. ``special_tokens`` lists the markers the
    projector has (reference ``cont_tok`` / ``rec_tok``); an empty list puts no special token
    in the decoder input (the paper's long-context setting). Training configs embed this
    class per decoder, so every option is settable from YAML and the command line.
    """

    hidden_dim: int = 2048
    """width of the projector's hidden layer (paper: 2048)"""
    activation: ProjectorActivation = "none"
    """between the two layers (none: the reference's)"""
    bias: bool = False
    """biases in the two layers (the reference has none)"""
    special_token_space: SpecialTokenSpace = "encoder"
    """encoder: the reference's ones-initialised vectors, projected like the context; decoder: free vectors"""
    special_tokens: tuple[str, ...] = ("continuation", "reconstruction")
    """the markers this projector has ([]: no marker in the decoder input, the long-context setting)"""
    init: ProjectorInit = "match_decoder"
    """reference: torch's default init; match_decoder: the output layer rescaled so that projected encoder states
    start at the norm of the decoder's own input embeddings (a real LM's final states are ~85x larger)"""
    bos: DecoderBosOption = "auto"
    """the decoder's BOS before its input: reference (fine-tuning rows and generation, not pretraining windows),
    always, never, or auto (always when the decoder's tokenizer adds BOS to every text itself, e.g. Gemma 3; else
    reference)"""

    def __post_init__(self) -> None:
        check_int("hidden_dim", self.hidden_dim, 1)
        _check_literal("bos", self.bos, DecoderBosOption)
        _check_literal("init", self.init, ProjectorInit)
        _check_bool("bias", self.bias)
        _check_literal("activation", self.activation, ProjectorActivation)
        _check_literal("special_token_space", self.special_token_space, SpecialTokenSpace)
        if isinstance(self.special_tokens, (str, bytes)) or not isinstance(self.special_tokens, (list, tuple)):
            raise ValueError(f"special_tokens must be a list of names, got {self.special_tokens!r}")
        self.special_tokens = tuple(self.special_tokens)
        for tok in self.special_tokens:
            _check_literal("special token", tok, SpecialToken)
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special_tokens has duplicates: {self.special_tokens}")

    def options(self) -> ProjectorOptions:
        """Only the chosen options (of a ``ProjectorConfig`` too)."""
        return ProjectorOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ProjectorOptions)})


@dataclass(kw_only=True)
class ProjectorConfig(ProjectorOptions):
    """One decoder's projector: ``ProjectorOptions`` plus what the models fix.

    encoder width ``input_dim`` -> ``hidden_dim`` -> decoder width ``output_dim``.
    ``decoder`` records where the frozen decoder lives and ``decoder_vocab_size`` lets loads
    refuse a projector paired with the wrong decoder.
    """

    input_dim: int
    output_dim: int
    decoder: str = ""
    decoder_vocab_size: int | None = None
    # The decoder's path relative to the checkpoint directory, written at save time, so a
    # project moved as a whole still finds its decoder ("": not local, or not recorded).
    decoder_relative: str = ""
    # Identity of the decoder the projector was trained for (``arc_encoder.decoders.decoder_identity``:
    # sha256 of its input embeddings); a different decoder of the same shape is refused.
    # "": checkpoints from before it was recorded (loaded with a warning).
    decoder_sha256: str = ""
    # Resolved when the projector is created (never "auto" once recorded). Checkpoints written
    # before it was recorded had the reference's layout, which is this default.
    bos: DecoderBos = "reference"
    # How the projector started (informational once created); checkpoints from before it was recorded
    # were created with torch's default init.
    init: ProjectorInit = "reference"

    def __post_init__(self) -> None:
        _check_literal("bos", self.bos, DecoderBos)
        for name in ("input_dim", "output_dim"):
            check_int(name, getattr(self, name), 1)
        if self.decoder_vocab_size is not None:
            check_int("decoder_vocab_size", self.decoder_vocab_size, 1)
        for name in ("decoder", "decoder_relative", "decoder_sha256"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        super().__post_init__()

    @property
    def special_token_dim(self) -> int:
        """Width of the stored special-token vectors (encoder or decoder space)."""
        return self.input_dim if self.special_token_space == "encoder" else self.output_dim


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 ``arc_config.json`` dict as format 2, with format 1's semantics stated explicitly.

    Format 1 wrote no key for ``pooled_query_input``, ``pooling_groups``, ``bias`` or
    ``special_token_space``; those get ``LEGACY_*_OPTIONS``. A format-1 file that does carry
    a format-2 key is not a file we wrote: refused, naming the key.
    """
    where = "format_version 1 config"
    encoder = data.get("encoder")
    if not isinstance(encoder, dict):
        raise ValueError(f"{where}: 'encoder' must be a mapping")
    _refuse_unknown(encoder, _V1_ENCODER_KEYS, f"{where}: encoder")
    projectors = data.get("projectors", {})
    if not isinstance(projectors, dict):
        raise ValueError(f"{where}: 'projectors' must be a mapping")
    upgraded = {}
    for name, proj in projectors.items():
        if not isinstance(proj, dict):
            raise ValueError(f"{where}: projectors.{name} must be a mapping")
        _refuse_unknown(proj, _V1_PROJECTOR_KEYS, f"{where}: projectors.{name}")
        upgraded[name] = {**LEGACY_PROJECTOR_OPTIONS, **proj}
    _refuse_unknown(data, {"encoder", "projectors", "format_version"}, where)
    return {
        "encoder": {**LEGACY_ENCODER_OPTIONS, **encoder},
        "projectors": upgraded,
        "format_version": FORMAT_VERSION,
    }


def _shown(value: Any) -> str:
    """A value as its JSON text (null, [], "x"), shortened."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_unknown(data: dict[str, Any], allowed: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


@dataclass
class ARCConfig:
    """The whole compressor: one encoder shared by named per-decoder projectors."""

    encoder: EncoderConfig
    projectors: dict[str, ProjectorConfig] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = dataclass_from_dict(EncoderConfig, self.encoder, "encoder")
        if not isinstance(self.encoder, EncoderConfig):  # a JSON null, list or string: one line naming the key
            raise ValueError(f"encoder must be a mapping of the encoder's settings, got {_shown(self.encoder)}")
        if not isinstance(self.projectors, dict):
            raise ValueError(f"projectors must be a mapping of decoder name -> projector settings, got "
                             f"{_shown(self.projectors)}")
        fixed: dict[str, ProjectorConfig] = {}
        for name, proj in dict(self.projectors).items():
            if not isinstance(proj, (dict, ProjectorConfig)):
                raise ValueError(f"projectors.{name} must be a mapping of the projector's settings, got {_shown(proj)}")
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
                f"format_version {self.format_version!r} is not supported here (expected {FORMAT_VERSION}; "
                "files of older formats go through ARCConfig.from_dict)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ARCConfig:
        """A config as read from JSON; older formats are mapped explicitly, never defaulted."""
        if not isinstance(data, dict):
            raise ValueError(f"ARCConfig: expected a mapping, got {type(data).__name__}")
        version = data.get("format_version")
        if "format_version" not in data:
            raise ValueError(
                "format_version is missing: every arc_config.json records it, and a config without "
                f"it cannot be told apart from an older format (current: {FORMAT_VERSION})"
            )
        if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"format_version {version!r} is not supported (supported: {list(SUPPORTED_FORMAT_VERSIONS)})"
            )
        if version == 1:
            data = upgrade_v1(data)
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


# Which ids the probe's random induction sequences are drawn from (arc_encoder.probe).
#   "text":       the distinct ids of the held-out passages: ids the tokenizer really produces.
#   "vocabulary": every id but the special ones (the earlier measure, which real LLMs failed).
InductionTokens = Literal["text", "vocabulary"]


@dataclass(frozen=True)
class ProbeConfig:
    """Sizes of the probe's three measurements and their relative gates (arc_encoder.probe).

    Relative gates, set between the readers and non-readers measured in
    benchmarks/results/probe_real_cpu.json: second-copy loss at most ``induction_ratio_max`` /
    ``copy_ratio_max`` of the first copy's, and the context removing at least ``gain_ratio_min``
    of the closed-book loss. 16 passages and 16 induction rows keep SmolLM2-135M's probe at ~30 s
    on 2 CPU cores; every number is reported with its standard error over rows.
    """

    induction_len: int = 64
    induction_rows: int = 16
    copy_len: int = 256
    context_len: int = 256
    continuation_len: int = 64
    passages: int = 16
    batch_size: int = 16
    seed: int = 0
    induction_tokens: InductionTokens = "text"
    induction_ratio_max: float = 0.5
    copy_ratio_max: float = 0.5
    gain_ratio_min: float = 0.1

    def __post_init__(self) -> None:
        for name in ("induction_len", "induction_rows", "copy_len", "context_len", "continuation_len", "passages",
                     "batch_size"):
            if getattr(self, name) < (2 if name.endswith("_len") else 1):
                raise ValueError(f"probe.{name} must be >= {2 if name.endswith('_len') else 1}, got {getattr(self, name)}")
        if self.induction_tokens not in get_args(InductionTokens):
            raise ValueError(f"probe.induction_tokens must be one of {get_args(InductionTokens)}, "
                             f"got {self.induction_tokens!r}")
        for name in ("induction_ratio_max", "copy_ratio_max", "gain_ratio_min"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"probe.{name} must be a number, got {value!r}")

    @property
    def window_len(self) -> int:
        """Tokens each held-out passage must have (copy and open-book rows share passages)."""
        return max(self.copy_len, self.context_len + self.continuation_len)
