"""ARCEncoder: a Hugging Face transformer turned into a bidirectional, pooling text encoder.

Two backbone families are supported:

* "llama": the base transformer of any Llama-family causal LM (Llama, Mistral, Qwen2,
  Qwen3: pre-norm blocks with ``self_attn.{q,k,v,o}_proj``, ``input_layernorm``,
  ``post_attention_layernorm``, ``mlp``, rotary positions). This is the paper's setting.
* "neox": GPT-NeoX-family causal LMs (Pythia, GPT-NeoX: fused ``query_key_value``, partial
  rotary, parallel residual). In the pooled block the MLP reads the pooled block input
  when the residual is parallel.
* "bert": BERT-style post-norm encoders (BERT, MiniLM: ``attention.self.{query,key,value}``,
  absolute positions), so a real pretrained encoder shipped on PyPI can be the starting point.

We keep the backbone's own blocks and attention kernels for every layer but the last, called
with a padding-only (bidirectional) mask. The last block is run here, with its queries
averaged in groups of ``pooling_factor`` while keys and values stay full length, so a chunk
of n tokens becomes ceil(n / pooling_factor) vectors.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .config import EncoderConfig

_REQUIRED_BLOCK_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
_REQUIRED_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class EncoderOutput:
    """Pooled encoder states. Row b holds ``lengths[b]`` valid vectors, then padding."""

    hidden_states: torch.Tensor  # [batch, compressed_len, hidden]
    attention_mask: torch.Tensor  # [batch, compressed_len], bool, True = valid
    lengths: torch.Tensor  # [batch], long


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(requested: str) -> str:
    """'auto' means flash-attn 2 when it is installed and a GPU is present, else PyTorch SDPA."""
    if requested != "auto":
        if requested == "flash_attention_2" and not flash_attn_available():
            raise ValueError("attn_implementation='flash_attention_2' but flash_attn is not installed")
        return requested
    if flash_attn_available() and torch.cuda.is_available():
        return "flash_attention_2"
    return "sdpa"


def pool_groups(x: torch.Tensor, valid: torch.Tensor | None, pooling_factor: int) -> torch.Tensor:
    """Mean over consecutive groups of ``pooling_factor`` positions along dim -2.

    x: [batch, ..., n, d]; valid: [batch, n] bool (right padded), or None when no row is
    padded. Padding never enters a mean, so a sequence's shorter tail group is the mean of
    its real tokens only. Returns [batch, ..., ceil(n / pooling_factor), d].
    """
    n = x.shape[-2]
    groups = -(-n // pooling_factor)
    pad = groups * pooling_factor - n
    if valid is None:
        counts = torch.full((groups, 1), float(pooling_factor), dtype=x.dtype, device=x.device)
        counts[-1] = pooling_factor - pad  # the tail group is shorter
        x = F.pad(x, (0, 0, 0, pad)) if pad else x
        return x.unflatten(-2, (groups, pooling_factor)).sum(-2) / counts
    # Broadcast the [batch, n] mask over every middle dim of x.
    weight = valid.to(x.dtype).view(valid.shape[0], *([1] * (x.dim() - 3)), n, 1)
    x = x * weight
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        weight = F.pad(weight, (0, 0, 0, pad))
    x = x.unflatten(-2, (groups, pooling_factor)).sum(-2)  # [batch, ..., groups, d]
    counts = weight.unflatten(-2, (groups, pooling_factor)).sum(-2).clamp(min=1)
    return x / counts


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x [batch, heads, n, head_dim] with cos/sin [batch, n, rot_dim].

    Handles partial rotary (rot_dim < head_dim) by rotating the leading rot_dim channels.
    """
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


BackboneFamily = Literal["llama", "neox", "bert"]


def backbone_family(backbone: PreTrainedModel) -> BackboneFamily:
    """Which block layout the backbone has; ValueError naming the model type if neither."""
    model_type = getattr(backbone.config, "model_type", "?")
    if hasattr(backbone, "encoder") and hasattr(backbone, "embeddings") and hasattr(backbone.encoder, "layer"):
        block = backbone.encoder.layer[0]
        if all(hasattr(block.attention.self, p) for p in ("query", "key", "value")):
            return "bert"
        raise ValueError(f"backbone model_type={model_type!r}: BERT-like blocks without query/key/value")
    if hasattr(backbone, "embed_in") and hasattr(backbone, "layers"):
        block = backbone.layers[0]
        if hasattr(block, "attention") and hasattr(block.attention, "query_key_value"):
            return "neox"
        raise ValueError(f"backbone model_type={model_type!r}: GPT-NeoX-like blocks without query_key_value")
    _check_llama_like(backbone)
    return "llama"


def _check_llama_like(backbone: PreTrainedModel) -> None:
    model_type = getattr(backbone.config, "model_type", "?")
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(backbone, attr):
            raise ValueError(
                f"backbone model_type={model_type!r} has no '{attr}': only Llama-family causal "
                "LMs (Llama, Mistral, Qwen2, Qwen3, ...), GPT-NeoX-family LMs and BERT-style encoders "
                "are supported"
            )
    block = backbone.layers[0]
    missing = [p for p in _REQUIRED_BLOCK_PARTS if not hasattr(block, p)]
    missing += [f"self_attn.{p}" for p in _REQUIRED_ATTN_PARTS if not hasattr(block.self_attn, p)]
    if missing:
        raise ValueError(
            f"backbone model_type={model_type!r} blocks lack {missing}: only Llama-family "
            "blocks (pre-norm, separate q/k/v/o projections) can be pooled"
        )


def backbone_blocks(backbone: PreTrainedModel) -> nn.ModuleList:
    return backbone.encoder.layer if backbone_family(backbone) == "bert" else backbone.layers


def truncate_backbone(backbone: PreTrainedModel, keep: int) -> None:
    """Drop all blocks after the first ``keep`` (in place), keeping the config consistent."""
    blocks = nn.ModuleList(list(backbone_blocks(backbone))[:keep])
    if backbone_family(backbone) == "bert":
        backbone.encoder.layer = blocks
    else:
        backbone.layers = blocks
    backbone.config.num_hidden_layers = keep
    layer_types = getattr(backbone.config, "layer_types", None)
    if layer_types is not None:
        backbone.config.layer_types = list(layer_types)[:keep]


class ARCEncoder(nn.Module):
    """Bidirectional encoder whose last block pools queries by ``config.pooling_factor``."""

    def __init__(self, config: EncoderConfig, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.family: BackboneFamily = backbone_family(backbone)
        blocks = backbone_blocks(backbone)
        if backbone.config.num_hidden_layers != len(blocks):
            raise ValueError(
                f"backbone config says {backbone.config.num_hidden_layers} layers but has {len(blocks)}"
            )
        max_pos = getattr(backbone.config, "max_position_embeddings", None)
        if self.family == "bert" and max_pos is not None and config.chunk_len > max_pos:
            raise ValueError(
                f"chunk_len={config.chunk_len} exceeds the BERT backbone's "
                f"max_position_embeddings={max_pos}; set chunk_len <= {max_pos}"
            )
        if self.family == "bert" and getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # the [CLS] pooler is never used; keep it out of the weights
        self.config = config
        self.backbone = backbone
        # Every attention module must run non-causally (read by HF's SDPA/flash paths).
        for layer in blocks:
            attn = {"llama": lambda: layer.self_attn, "neox": lambda: layer.attention,
                    "bert": lambda: layer.attention.self}[self.family]()
            attn.is_causal = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base_model(
        cls,
        config: EncoderConfig,
        torch_dtype: torch.dtype | None = None,
        backbone_config: PretrainedConfig | None = None,
    ) -> ARCEncoder:
        """Load ``config.base_model`` (weights) and cut it down to an encoder.

        With ``backbone_config`` the backbone is built with random weights from that config
        instead (tests, speed benchmarks at real shapes).
        """
        attn = resolve_attn_implementation(config.attn_implementation)
        if backbone_config is None:
            backbone = AutoModel.from_pretrained(
                config.base_model, dtype=torch_dtype, attn_implementation=attn
            )
        else:
            backbone = AutoModel.from_config(
                backbone_config, dtype=torch_dtype, attn_implementation=attn
            )
        keep = config.check_backbone(backbone.config.num_hidden_layers)
        truncate_backbone(backbone, keep)
        return cls(config, backbone)

    @classmethod
    def from_backbone_config(
        cls, config: EncoderConfig, backbone_config: PretrainedConfig | dict
    ) -> ARCEncoder:
        """Build an (already truncated) encoder skeleton from a saved backbone config."""
        if isinstance(backbone_config, dict):
            data = dict(backbone_config)
            backbone_config = AutoConfig.for_model(data.pop("model_type"), **data)
        attn = resolve_attn_implementation(config.attn_implementation)
        backbone = AutoModel.from_config(backbone_config, attn_implementation=attn)
        return cls(config, backbone)

    @property
    def blocks(self) -> nn.ModuleList:
        return backbone_blocks(self.backbone)

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    @property
    def pooling_factor(self) -> int:
        return self.config.pooling_factor

    def compile_blocks(self) -> None:
        """``torch.compile`` every full-length block (in place; the pooled block stays eager).

        On an H100 this lifts a 3B-shaped encoder forward from 56% to 74% of the measured bf16
        matmul peak (benchmarks/README.md): compilation fuses the memory-bound norm, rotary and
        activation kernels around the matmuls. Blocks share one shape, so one compile serves all.
        """
        for block in self.blocks[:-1]:
            block.compile()

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )

    # ------------------------------------------------------------------ forward
    def _layer_mask(self, valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Padding-only mask in the form the backbone's attention implementation expects."""
        impl = self.backbone.config._attn_implementation
        if valid is None:
            return None
        if impl == "flash_attention_2":
            return valid.long()  # [batch, n]; HF unpads with it
        b, n = valid.shape
        keys = valid[:, None, None, :].expand(b, 1, n, n)  # [batch, 1, query, key]
        if impl == "sdpa":
            return keys
        additive = torch.zeros(keys.shape, dtype=dtype, device=valid.device)
        return additive.masked_fill(~keys, torch.finfo(dtype).min)

    def row_pooling_factors(self, batch: int, pooling_factors: int | Sequence[int] | None) -> list[int]:
        """One pooling factor per row: the config's by default, one int for all, or a list."""
        if pooling_factors is None:
            return [self.config.pooling_factor] * batch
        if isinstance(pooling_factors, int):
            pooling_factors = [pooling_factors] * batch
        pfs = list(pooling_factors)
        if len(pfs) != batch:
            raise ValueError(f"pooling_factors has {len(pfs)} entries for {batch} rows")
        for pf in pfs:
            if isinstance(pf, bool) or not isinstance(pf, int) or pf < 1:
                raise ValueError(f"pooling factors must be integers >= 1, got {pf!r}")
        return pfs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pooling_factors: int | Sequence[int] | None = None,
    ) -> EncoderOutput:
        """Encode right-padded token ids [batch, n] into [batch, ceil(n / pf), hidden].

        ``pooling_factors``: None (the config's), one int, or one int per row. Rows with
        different factors share every full-length layer; only the pooled block runs once per
        distinct factor (entropy-adaptive compression, ``arc_encoder.adaptive``). Row b then
        holds ceil(n_b / pf_b) valid vectors (``lengths``); positions after them are padding.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        pfs = self.row_pooling_factors(input_ids.shape[0], pooling_factors)
        if attention_mask is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
            valid = attention_mask.bool()
        lengths = valid.sum(-1)
        # One device sync for all three checks (each bool() on a GPU tensor stalls the queue).
        all_valid, left_padded, empty_row = torch.stack(
            [valid.all(), (valid[:, 1:] & ~valid[:, :-1]).any(), (lengths == 0).any()]
        ).tolist()
        if left_padded:
            raise ValueError("attention_mask must be right-padded (valid tokens first)")
        if empty_row:
            raise ValueError("every sequence needs at least one token; got an empty row")
        if all_valid:
            valid = None  # no padding: masks can be dropped (lets SDPA pick its fastest kernel)

        if self.family == "bert":
            pooled = self._forward_bert(input_ids, valid, pfs)
        else:
            pooled = self._forward_rotary(input_ids, valid, pfs)
        if len(set(pfs)) == 1:
            compressed_lengths = -(-lengths // pfs[0])
        else:
            compressed_lengths = -(-lengths // torch.tensor(pfs, device=lengths.device))
        out_mask = torch.arange(pooled.shape[1], device=pooled.device)[None, :] < compressed_lengths[:, None]
        return EncoderOutput(pooled, out_mask, compressed_lengths)

    @staticmethod
    def _pool_rows(
        pooled_fn: Callable[..., torch.Tensor],
        hidden: torch.Tensor,
        valid: torch.Tensor | None,
        pfs: list[int],
        per_row: tuple[torch.Tensor, ...] = (),
    ) -> torch.Tensor:
        """Run ``pooled_fn(hidden, valid, pf, *per_row)`` once per distinct factor, rows scattered back.

        One factor (the common case) is a single call. Mixed factors give [batch, max_m, d]
        with zeros after each row's own ceil(n / pf_b) vectors.
        """
        if len(set(pfs)) == 1:
            return pooled_fn(hidden, valid, pfs[0], *per_row)
        b, n, _ = hidden.shape
        out: torch.Tensor | None = None
        for pf in sorted(set(pfs)):
            idx = torch.tensor([i for i, p in enumerate(pfs) if p == pf], device=hidden.device)
            sub_valid = None if valid is None else valid[idx]
            part = pooled_fn(hidden[idx], sub_valid, pf, *(t[idx] for t in per_row))  # [rows, m_pf, d]
            if out is None:
                out = part.new_zeros(b, -(-n // min(pfs)), part.shape[-1])
            out = out.index_put((idx[:, None], torch.arange(part.shape[1], device=idx.device)[None, :]), part)
        return out

    def _forward_rotary(self, input_ids: torch.Tensor, valid: torch.Tensor | None, pfs: list[int]) -> torch.Tensor:
        """Llama-family and GPT-NeoX backbones: rotary positions, pre-norm blocks, final norm."""
        bb = self.backbone
        hidden = bb.get_input_embeddings()(input_ids)  # [batch, n, hidden]
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        position_ids = position_ids.unsqueeze(0).expand_as(input_ids)
        position_embeddings = bb.rotary_emb(hidden, position_ids=position_ids)
        mask = self._layer_mask(valid, hidden.dtype)
        for layer in bb.layers[:-1]:
            out = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            hidden = out[0] if isinstance(out, tuple) else out

        cos, sin = position_embeddings

        def pooled_fn(h, v, pf, c, s):
            return self.pooled_block(bb.layers[-1], h, v, (c, s), pf)

        pooled = self._pool_rows(pooled_fn, hidden, valid, pfs, (cos, sin))
        if self.config.final_norm:
            pooled = (bb.final_layer_norm if self.family == "neox" else bb.norm)(pooled)
        return pooled

    def _forward_bert(self, input_ids: torch.Tensor, valid: torch.Tensor | None, pfs: list[int]) -> torch.Tensor:
        """BERT-style post-norm backbone: absolute positions, so pooled queries need no RoPE.

        The pooled block mirrors the Llama path: attention output projection with no residual
        (unless ``pooled_residual``), then the block's own LayerNorms and feed-forward. BERT
        has no final norm (every block ends in one), so ``final_norm`` does not apply.
        """
        bb = self.backbone
        hidden = bb.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        mask = self._layer_mask(valid, hidden.dtype)
        for layer in bb.encoder.layer[:-1]:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return self._pool_rows(self._bert_pooled_block, hidden, valid, pfs)

    def _bert_pooled_block(self, hidden: torch.Tensor, valid: torch.Tensor | None, pf: int) -> torch.Tensor:
        """BERT's last block with pooled queries: [batch, n, hidden] -> [batch, ceil(n / pf), hidden]."""
        layer = self.backbone.encoder.layer[-1]
        sa = layer.attention.self
        b, n, _ = hidden.shape
        hd = sa.attention_head_size
        q = pool_groups(sa.query(hidden).view(b, n, -1, hd).transpose(1, 2), valid, pf)  # [b, h, m, hd]
        k = sa.key(hidden).view(b, n, -1, hd).transpose(1, 2)
        v = sa.value(hidden).view(b, n, -1, hd).transpose(1, 2)
        key_mask = None if valid is None else valid[:, None, None, :]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=hd**-0.5)
        ctx = ctx.transpose(1, 2).reshape(b, q.shape[2], -1)  # [b, m, hidden]
        attn_out = layer.attention.output
        h = attn_out.dense(ctx)
        if self.config.pooled_residual:
            h = h + pool_groups(hidden, valid, pf)
        h = attn_out.LayerNorm(h)
        return layer.output(layer.intermediate(h), h)

    def pooled_block(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        valid: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        pooling_factor: int | None = None,
    ) -> torch.Tensor:
        """The last block with pooled queries: [batch, n, hidden] -> [batch, m, hidden]."""
        pf = pooling_factor or self.config.pooling_factor
        attn_out = self.pooled_attention(layer, hidden, valid, position_embeddings, pf)
        if getattr(layer, "use_parallel_residual", False):  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
            pooled_in = pool_groups(hidden, valid, pf)
            out = attn_out + layer.mlp(layer.post_attention_layernorm(pooled_in))
            return out + pooled_in if self.config.pooled_residual else out
        if self.config.pooled_residual:
            attn_out = attn_out + pool_groups(hidden, valid, pf)
        return attn_out + layer.mlp(layer.post_attention_layernorm(attn_out))

    def pooled_attention(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        valid: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        pooling_factor: int | None = None,
    ) -> torch.Tensor:
        """Self-attention with group-mean queries and full-length keys/values (no residual)."""
        pf = pooling_factor or self.config.pooling_factor
        b, n, _ = hidden.shape
        x = layer.input_layernorm(hidden)
        if self.family == "neox":
            attn = layer.attention
            head_dim = attn.head_size
            qkv = attn.query_key_value(x).view(b, n, -1, 3 * head_dim).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=-1)  # each [b, heads, n, hd]
            out_proj = attn.dense
        else:
            attn = layer.self_attn
            head_dim = attn.head_dim
            q = attn.q_proj(x).view(b, n, -1, head_dim)  # [b, n, heads, hd]
            k = attn.k_proj(x).view(b, n, -1, head_dim)  # [b, n, kv_heads, hd]
            v = attn.v_proj(x).view(b, n, -1, head_dim).transpose(1, 2)  # [b, kv_heads, n, hd]
            if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, heads, n, hd]
            out_proj = attn.o_proj
        cos, sin = position_embeddings
        k = apply_rope(k, cos, sin)
        if self.config.pooled_query_positions == "group_mean":
            q = pool_groups(apply_rope(q, cos, sin), valid, pf)
        else:  # "pooled_index": pool raw queries, then rotate at positions 0..m-1
            q = pool_groups(q, valid, pf)
            m = q.shape[-2]
            pos = torch.arange(m, device=hidden.device).unsqueeze(0).expand(b, m)
            cos_p, sin_p = self.backbone.rotary_emb(hidden, position_ids=pos)
            q = apply_rope(q, cos_p, sin_p)
        key_mask = None if valid is None else valid[:, None, None, :]  # [b, 1, 1, n]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=key_mask,
            scale=getattr(attn, "scaling", head_dim**-0.5),
            enable_gqa=q.shape[1] != k.shape[1],
        )  # [b, heads, m, hd]
        out = out.transpose(1, 2).reshape(b, out.shape[2], -1)  # [b, m, heads * hd]
        return out_proj(out)
