"""Convert a checkpoint of the ARC-Encoder reference code into an ``ARCModel.from_pretrained`` one.

The reference (kyutai-labs/ARC-Encoder) stores a trained encoder as (README, ``Checkpointer``,
``load_and_save_released_models``)::

    <checkpoint>/params.json                              PipelineArgs: embedder_params, bridge_module
    <checkpoint>/embedder/consolidated.safetensors        tok_embeddings.weight,
                                                          layers.N.attention.{wq,wk,wv,wo}.weight,
                                                          layers.N.{attention_norm,ffn_norm}.weight,
                                                          layers.N.feed_forward.{w1,w2,w3}.weight,
                                                          {rec_tok,cont_tok}.J.weight [1, dim]
    <checkpoint>/bridge_module/consolidated.safetensors   layer1.weight, layer2.weight
                                                          (bridge_type "multi_module": J.layer1.weight, ...)

J is the decoder's ``llm_number`` (the order of ``llm_paths`` in training; for the released
ARC8_Encoder_multi: 0 = Llama-3.1-8B, 1 = Mistral-7B). The Hub form that ``EmbedAugModel``
(a ``PyTorchModelHubMixin``) writes -- ``model.safetensors`` with ``embedder.`` /
``bridge_module.`` prefixes and ``config.json`` with its ``embedder_args`` / ``bridge_args`` /
``model_args`` -- is read too.

The encoder becomes a Hugging Face Llama backbone. The reference rotates channel pairs
(2i, 2i+1) (complex RoPE, ``models/utils/rope.py``); HF rotates (i, i + head_dim/2), so the
rows of every head of wq and wk are reordered (``interleaved_to_half``), which leaves every
attention score unchanged. No RoPE scaling is applied, as in the reference (it ignores
``use_scaled_rope``). The encoder config keeps the reference semantics (the defaults) and
each decoder gets a bias-free projector with its encoder-space special tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ARCConfig, EncoderConfig, ProjectorConfig, is_int
from .encoder import ARCEncoder, resolve_attn_implementation
from .model import ARCModel
from .storage import check_state_dict, load_tensors, read_json_file

PathLike = str | os.PathLike
EMBEDDER_FILE = "embedder/consolidated.safetensors"
BRIDGE_FILE = "bridge_module/consolidated.safetensors"
HUB_WEIGHTS = "model.safetensors"
# The reference's special-token modules and the names ProjectorConfig gives them.
_SPECIAL = {"cont_tok": "continuation", "rec_tok": "reconstruction"}
_LAYER_TENSORS = {  # reference name -> HF Llama name, per block
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


@dataclass(frozen=True)
class ReferenceDecoder:
    """A decoder the reference checkpoint was trained for, in ``llm_number`` order.

    ``name`` becomes the projector's name; ``path`` (the frozen HF decoder's directory or hub
    id) and ``vocab_size`` are recorded so loads can refuse a mismatched decoder.
    """

    name: str
    path: str = ""
    vocab_size: int | None = None


@dataclass(frozen=True)
class ReferenceBackbone:
    """The encoder backbone's shape before truncation (the reference's ``ModelArgs``)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    vocab_size: int
    rope_theta: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str = "params") -> ReferenceBackbone:
        """Meta Llama ``params.json`` (multiple_of / ffn_dim_multiplier), Mistral-style
        ``params.json`` / ``model_args`` (head_dim, hidden_dim) or a Hugging Face ``config.json``,
        read as the reference's ``load_args`` reads them."""
        try:
            if "hidden_size" in params:  # Hugging Face config
                heads = params["num_attention_heads"]
                theta = params.get("rope_theta") or (params.get("rope_parameters") or {}).get("rope_theta", 10000.0)
                return cls(dim=params["hidden_size"], n_layers=params["num_hidden_layers"], n_heads=heads,
                           n_kv_heads=params.get("num_key_value_heads") or heads,
                           head_dim=params.get("head_dim") or params["hidden_size"] // heads,
                           hidden_dim=params["intermediate_size"], norm_eps=params["rms_norm_eps"],
                           vocab_size=params["vocab_size"], rope_theta=float(theta))
            if "head_dim" in params and "hidden_dim" in params:  # args_type "mistral" / released model_args
                theta = params.get("rope_theta") or 1000000.0  # Transformer.freqs_cis: rope_theta or 1e6
                return cls(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                           n_kv_heads=params["n_kv_heads"], head_dim=params["head_dim"],
                           hidden_dim=params["hidden_dim"], norm_eps=params["norm_eps"],
                           vocab_size=params["vocab_size"], rope_theta=float(theta))
            # args_type "llama": the FFN width is derived as Meta's code derives it
            hidden = int(2 * 4 * params["dim"] / 3)
            if params.get("ffn_dim_multiplier") is not None:
                hidden = int(params["ffn_dim_multiplier"] * hidden)
            hidden = params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"])
            return cls(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                       head_dim=params["dim"] // params["n_heads"], hidden_dim=hidden,
                       norm_eps=params["norm_eps"], vocab_size=params["vocab_size"],
                       rope_theta=float(params.get("rope_theta", 10000)))
        except KeyError as err:
            raise ValueError(f"{where}: missing key {err} for the encoder backbone's shape") from None

    @classmethod
    def from_file(cls, path: PathLike) -> ReferenceBackbone:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file (the encoder backbone's params.json or config.json)")
        return cls.from_params(_json_object(Path(path)), str(path))


# configs/released_pt_configs/ARC8_Encoder_*.yaml model_args: the Llama-3.2-3B backbone of every
# released ARC encoder. Used when no backbone shape is given and the tensors fit it.
RELEASED_ARC_BACKBONE = ReferenceBackbone(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
                                          hidden_dim=8192, norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0)


@dataclass
class ReferenceCheckpoint:
    """What a reference checkpoint holds, validated against what ``ARCEncoder`` can compute."""

    pooling_factor: int
    layers_removed: int
    special_tokens: tuple[str, ...]  # ProjectorConfig names, in ProjectorConfig order
    num_decoders: int
    embedder: dict[str, torch.Tensor]
    bridges: list[dict[str, torch.Tensor]]  # per decoder: layer1.weight, layer2.weight
    backbone: ReferenceBackbone | None  # from the checkpoint itself (Hub config.json model_args)


def interleaved_to_half(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder wq/wk rows per head from pair-interleaved RoPE (reference) to rotate-half (HF).

    Row 2i+t of a head (pair i, part t) moves to t * head_dim/2 + i.
    """
    if weight.shape[0] != heads * head_dim or head_dim % 2:
        raise ValueError(f"cannot permute a [{weight.shape[0]}, ...] projection as {heads} heads of {head_dim}")
    return weight.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(heads * head_dim, -1)


def _setting(where: str, name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{where}: {name}={value!r} is not supported: {why}")


def _pipeline_settings(embedder: Mapping[str, Any], where: str) -> tuple[int, int, tuple[str, ...]]:
    """(pooling factor, layers removed, special tokens) from ``embedder_params``; refuse the rest.

    Missing keys take ``EmbedderArgs``' defaults, as the reference's ``load_args`` does.
    """
    if not isinstance(embedder, Mapping):
        raise ValueError(f"{where}: embedder_params must be a mapping")
    pooling = embedder.get("pooling_module") or {}
    pool_type, place = pooling.get("pool_type", "mean_pooled_queries"), pooling.get("where", "before")
    if pool_type != "mean_pooled_queries":
        raise _setting(where, "embedder_params.pooling_module.pool_type", pool_type,
                       "only 'mean_pooled_queries' (mean-pooled queries over full-length keys) is")
    if place != "before":
        raise _setting(where, "embedder_params.pooling_module.where", place, "only 'before' is")
    if embedder.get("causal_embedder", False):
        raise _setting(where, "embedder_params.causal_embedder", True, "the encoder is bidirectional")
    if embedder.get("memory_tokens", 0):
        raise _setting(where, "embedder_params.memory_tokens", embedder["memory_tokens"], "memory tokens are not")
    rates = list(embedder.get("compress_rates") or [])
    if len(rates) > 1:
        raise _setting(where, "embedder_params.compress_rates", rates, "pooling in one block only (one rate)")
    rate = rates[0] if rates else -1  # no rate: no pooling
    if isinstance(rate, bool) or not isinstance(rate, int) or rate > -1:
        raise _setting(where, "embedder_params.compress_rates", rates,
                       "only a negative rate -pf (pool groups of about pf tokens)")
    removed = embedder.get("n_truncated_layers", 16)
    if not is_int(removed, 0):
        raise _setting(where, "embedder_params.n_truncated_layers", removed, "expected an integer >= 0")
    tokens = tuple(_SPECIAL[k] for k in ("cont_tok", "rec_tok") if embedder.get(k, False))
    return -rate, removed, tokens


def _split_indexed(tensors: dict[str, torch.Tensor], prefix: str, where: str) -> dict[int, torch.Tensor]:
    """``{prefix}.J.weight`` (or the old unindexed ``{prefix}.weight`` = J 0) -> {J: [dim] vector}."""
    out = {}
    for key in [k for k in tensors if k.startswith(prefix + ".")]:
        parts = key.split(".")
        if len(parts) == 2 and parts[1] == "weight":
            j = 0
        elif len(parts) == 3 and parts[1].isdigit() and parts[2] == "weight":
            j = int(parts[1])
        else:
            raise ValueError(f"{where}: unexpected tensor {key!r}")
        value = tensors.pop(key)
        if value.dim() != 2 or value.shape[0] != 1:
            raise ValueError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, expected [1, dim]")
        out[j] = value[0]
    return out


def _bridges(tensors: dict[str, torch.Tensor], bridge: Mapping[str, Any], where: str) -> list[dict[str, torch.Tensor]]:
    kind = bridge.get("bridge_type")
    if kind == "mlp":
        if set(tensors) != {"layer1.weight", "layer2.weight"}:
            raise ValueError(f"{where}: expected tensors ['layer1.weight', 'layer2.weight'], got {sorted(tensors)}")
        return [dict(tensors)]
    if kind == "multi_module":
        count = len({k.split(".")[0] for k in tensors})
        expected = {f"{j}.layer{i}.weight" for j in range(count) for i in (1, 2)}
        if set(tensors) != expected:
            raise ValueError(f"{where}: expected tensors {sorted(expected)}, got {sorted(tensors)}")
        return [{f"layer{i}.weight": tensors[f"{j}.layer{i}.weight"] for i in (1, 2)} for j in range(count)]
    raise _setting(where, "bridge_module.bridge_type", kind, "only 'mlp' and 'multi_module' (two bias-free linear layers) are")


def _json_object(path: Path) -> dict[str, Any]:
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_reference_checkpoint(src: PathLike) -> ReferenceCheckpoint:
    """Read and validate a reference checkpoint (``params.json`` layout or the Hub layout)."""
    src = Path(src)
    if (src / "params.json").is_file():
        params = _json_object(src / "params.json")
        where = str(src / "params.json")
        embedder_args, bridge_args = params.get("embedder_params"), params.get("bridge_module")
        for rel in (EMBEDDER_FILE, BRIDGE_FILE):
            if not (src / rel).is_file():
                raise FileNotFoundError(f"{src / rel}: missing (a reference checkpoint has {EMBEDDER_FILE} and {BRIDGE_FILE})")
        embedder = load_tensors(src / EMBEDDER_FILE)
        bridge_tensors = load_tensors(src / BRIDGE_FILE)
        model_args = None
    elif (src / HUB_WEIGHTS).is_file() and (src / "config.json").is_file():
        params = _json_object(src / "config.json")
        where = str(src / "config.json")
        embedder_args, bridge_args, model_args = (params.get(k) for k in ("embedder_args", "bridge_args", "model_args"))
        tensors = load_tensors(src / HUB_WEIGHTS)
        embedder = {k.removeprefix("embedder."): v for k, v in tensors.items() if k.startswith("embedder.")}
        bridge_tensors = {k.removeprefix("bridge_module."): v for k, v in tensors.items() if k.startswith("bridge_module.")}
        other = sorted(k for k in tensors if not k.startswith(("embedder.", "bridge_module.")))
        if other:
            raise ValueError(f"{src / HUB_WEIGHTS}: unexpected tensors {other[:5]} (only embedder.* and bridge_module.*)")
    else:
        hint = " (point at one of its checkpoints/checkpoint_NNNNNN directories)" if (src / "checkpoints").is_dir() else ""
        raise FileNotFoundError(
            f"{src}: not a reference ARC-Encoder checkpoint{hint}: expected params.json + {EMBEDDER_FILE} + "
            f"{BRIDGE_FILE}, or the Hub files config.json + {HUB_WEIGHTS}"
        )
    if not isinstance(embedder_args, Mapping) or not isinstance(bridge_args, Mapping):
        raise ValueError(f"{where}: embedder and bridge settings are missing (embedder_params/bridge_module "
                         "or embedder_args/bridge_args)")
    pf, removed, tokens = _pipeline_settings(embedder_args, where)
    bridges = _bridges(bridge_tensors, bridge_args, f"{where} bridge")
    specials = {name: _split_indexed(embedder, module, f"{src}: embedder") for module, name in _SPECIAL.items()}
    count = max([len(bridges)] + [max(v) + 1 for v in specials.values() if v])
    for module, name in _SPECIAL.items():
        present = sorted(specials[name])
        wanted = list(range(count)) if name in tokens else []
        if present != wanted:
            raise ValueError(f"{src}: embedder has {module} for decoders {present}, params say {wanted}")
    if len(bridges) == 1 and count > 1:
        bridges = bridges * count  # one shared "mlp" bridge for every decoder
    if len(bridges) != count:
        raise ValueError(f"{where}: {len(bridges)} bridge modules for {count} decoders' special tokens")
    for j, b in enumerate(bridges):
        b.update({f"special.{name}": specials[name][j] for name in tokens})
    backbone = None if model_args is None else ReferenceBackbone.from_params(model_args, f"{where} model_args")
    return ReferenceCheckpoint(pf, removed, tokens, count, embedder, bridges, backbone)


def _backbone_shape(ckpt: ReferenceCheckpoint, backbone: ReferenceBackbone | PathLike | None) -> ReferenceBackbone:
    if isinstance(backbone, ReferenceBackbone):
        return backbone
    if backbone is not None:
        return ReferenceBackbone.from_file(backbone)
    if ckpt.backbone is not None:
        return ckpt.backbone
    emb = ckpt.embedder.get("tok_embeddings.weight")
    fits = emb is not None and tuple(emb.shape) == (RELEASED_ARC_BACKBONE.vocab_size, RELEASED_ARC_BACKBONE.dim)
    if not fits:
        raise ValueError("the encoder backbone's shape is not in the checkpoint and its tensors do not fit the "
                         "released ARC encoders' Llama-3.2-3B: pass the backbone's params.json or config.json")
    return RELEASED_ARC_BACKBONE


def _encoder_tensors(ckpt: ReferenceCheckpoint, shape: ReferenceBackbone, where: str) -> dict[str, torch.Tensor]:
    """Reference embedder tensors -> ``ARCEncoder`` state dict (HF Llama names, RoPE-permuted wq/wk)."""
    kept = shape.n_layers - ckpt.layers_removed
    if kept < 1:
        raise ValueError(f"{where}: n_truncated_layers={ckpt.layers_removed} leaves {kept} of {shape.n_layers} layers")
    src = dict(ckpt.embedder)
    out = {}
    missing = []
    for i in range(kept):
        for ref_name, hf_name in _LAYER_TENSORS.items():
            t = src.pop(f"layers.{i}.{ref_name}", None)
            if t is None:
                missing.append(f"layers.{i}.{ref_name}")
                continue
            if ref_name == "attention.wq.weight":
                t = interleaved_to_half(t, shape.n_heads, shape.head_dim)
            elif ref_name == "attention.wk.weight":
                t = interleaved_to_half(t, shape.n_kv_heads, shape.head_dim)
            out[f"backbone.layers.{i}.{hf_name}"] = t
    emb = src.pop("tok_embeddings.weight", None)
    if emb is None:
        missing.append("tok_embeddings.weight")
    else:
        out["backbone.embed_tokens.weight"] = emb
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]} ({len(missing)} in all; a checkpoint that "
                         "stores only its trained layers cannot be converted alone)")
    if src:
        raise ValueError(f"{where}: unexpected tensors {sorted(src)[:5]} for an encoder of {kept} kept layers")
    return out


def _llama_config(shape: ReferenceBackbone, kept: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.dim, intermediate_size=shape.hidden_dim,
        num_hidden_layers=kept, num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim, rms_norm_eps=shape.norm_eps, rope_theta=shape.rope_theta,
        max_position_embeddings=128_000,  # the reference precomputes RoPE for 128k positions
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def reference_to_model(
    src: PathLike,
    decoders: Sequence[ReferenceDecoder],
    backbone: ReferenceBackbone | PathLike | None = None,
    tokenizer: str | None = None,
    base_model: str = "",
    chunk_len: int = 1024,
    max_chunks: int = 32,
    dtype: torch.dtype | None = None,
) -> ARCModel:
    """The reference checkpoint at ``src`` as an in-memory ``ARCModel`` (eval mode).

    ``decoders``: one per decoder the checkpoint holds, in ``llm_number`` order. ``backbone``:
    the encoder backbone's shape (a ``ReferenceBackbone``, or its params.json / HF config.json);
    None takes it from the checkpoint, else the released encoders' Llama-3.2-3B when the tensors
    fit. ``tokenizer``: a directory with the encoder's HF tokenizer (Llama 3's, for the released
    encoders), saved with the model. ``dtype``: None keeps the checkpoint's.
    """
    src = Path(src)
    ckpt = read_reference_checkpoint(src)
    decoders = list(decoders)
    if len(decoders) != ckpt.num_decoders:
        raise ValueError(f"{src}: the checkpoint holds {ckpt.num_decoders} decoder(s) (llm_number "
                         f"0..{ckpt.num_decoders - 1}); {len(decoders)} decoder name(s) given")
    if len({d.name for d in decoders}) != len(decoders):
        raise ValueError(f"decoder names must differ, got {[d.name for d in decoders]}")
    shape = _backbone_shape(ckpt, backbone)
    kept = shape.n_layers - ckpt.layers_removed
    tensors = _encoder_tensors(ckpt, shape, str(src))
    dtype = dtype or tensors["backbone.embed_tokens.weight"].dtype

    enc_cfg = EncoderConfig(base_model=base_model or str(src.resolve()), layers_removed=ckpt.layers_removed,
                            pooling_factor=ckpt.pooling_factor, chunk_len=chunk_len, max_chunks=max_chunks)
    from transformers import AutoModel, AutoTokenizer

    backbone_model = AutoModel.from_config(_llama_config(shape, kept), dtype=dtype,
                                           attn_implementation=resolve_attn_implementation(enc_cfg.attn_implementation))
    encoder = ARCEncoder(enc_cfg, backbone_model)
    check_state_dict(src, tensors, encoder.state_dict(), dtype_check=lambda got, want: got.is_floating_point)
    encoder.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})

    projectors = {}
    for dec, bridge in zip(decoders, ckpt.bridges):
        hidden, width = bridge["layer1.weight"].shape
        out_dim = bridge["layer2.weight"].shape[0]
        if width != shape.dim or bridge["layer2.weight"].shape[1] != hidden:
            raise ValueError(f"{src}: bridge for {dec.name!r} maps {width} -> {hidden} -> {out_dim}, "
                             f"but the encoder width is {shape.dim}")
        projectors[dec.name] = ProjectorConfig(input_dim=shape.dim, output_dim=out_dim, hidden_dim=hidden,
                                               decoder=dec.path, decoder_vocab_size=dec.vocab_size,
                                               special_tokens=ckpt.special_tokens)
    tok = None
    if tokenizer is not None:
        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            reason = " ".join(str(err).split())  # one line
            raise ValueError(f"cannot load a tokenizer from {tokenizer!r} ({reason})") from err
        if len(tok) > shape.vocab_size:
            raise ValueError(f"tokenizer {tokenizer!r} has {len(tok)} tokens; the encoder embeds {shape.vocab_size}")
    model = ARCModel(ARCConfig(encoder=enc_cfg, projectors=projectors), encoder, tok).to(dtype)
    for dec, bridge in zip(decoders, ckpt.bridges):
        special = [bridge[f"special.{name}"] for name in ckpt.special_tokens]
        state = {"net.0.weight": bridge["layer1.weight"], "net.2.weight": bridge["layer2.weight"],
                 "special_tokens": torch.stack(special) if special else torch.empty(0, shape.dim)}
        model.projector(dec.name).load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.eval()


def convert_reference(src: PathLike, dst: PathLike, decoders: Sequence[ReferenceDecoder], overwrite: bool = False,
                      **options: Any) -> Path:
    """Convert ``src`` and write it to ``dst`` with ``save_pretrained``; ``options``: see ``reference_to_model``."""
    return reference_to_model(src, decoders, **options).save_pretrained(dst, overwrite=overwrite)
