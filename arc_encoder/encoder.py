"""ARCEncoder: a pretrained Hugging Face transformer turned into a bidirectional, pooling text encoder.

Every block but the last is the backbone's own block (and attention kernel), called with a
padding-only mask (Gemma 3's sliding layers: also their band), so attention is bidirectional. The last block pools, as the ARC-Encoder
reference does (kyutai-labs/ARC-Encoder, ``embed_llm/models/enhanced_transformer.py``
``forward_embedder`` + ``transformer_layers.py`` ``TransformerBlock``; README "How it works"):

    pooled_h = mean of the block INPUT h over m = ceil(n / pf) groups   (balanced sizes)
    r        = attention(queries from attention_norm(pooled_h) at RoPE positions 0..m-1,
                         keys/values from attention_norm(h) at positions 0..n-1)
    h'       = pooled_h + r;   out = h' + FFN(ffn_norm(h'))            (no final norm)

so a chunk of n tokens becomes ceil(n / pf) vectors. ``EncoderConfig`` keeps the earlier
semantics as explicit options (no residual, mean of per-token queries, fixed-size groups
with a short tail, final norm).

Four backbone families share that one pooled block through the adapters in ``ADAPTERS``:

* "llama": Llama-family causal LMs (Llama, Mistral, Qwen2, Qwen3 with its per-head q/k
  norms): pre-norm blocks, ``self_attn.{q,k,v,o}_proj``, rotary positions. The paper's setting.
* "gemma3": Gemma 3 text models: Llama's attention plus per-head q/k norms and the
  ``query_pre_attn_scalar`` score scale, embeddings scaled by sqrt(hidden) (HF's own module),
  four (1 + weight) RMSNorms per block, the attention and MLP outputs normed before their
  residual adds, so ``h' = pooled_h + post_attention_norm(r)`` and
  ``out = h' + post_feedforward_norm(FFN(pre_feedforward_norm(h')))``; each block takes its own
  layer type's RoPE table (sliding layers the local one, full layers the global one, the pooled
  queries too). Sliding-window layers read the whole chunk by default
  (``sliding_window_layers="full"``); ``"band"`` keeps HF's bidirectional band (token i reads j
  when |i - j| < 512 // 2 + 1, as ``use_bidirectional_attention`` / EmbeddingGemma). With the real
  270M model frozen at x4 over 1,024-token chunks and a projector trained into SmolLM2, full beat
  band on all 16 held-out windows (continuation 3.79 vs 4.63, reconstruction 3.37 vs 3.88
  nats/token; benchmarks/results/gemma3_sliding_window_cpu.json).
* "neox": GPT-NeoX-family LMs (Pythia): fused ``query_key_value``, partial rotary, and a
  parallel residual, whose pooled analogue is ``out = pooled_h + r + FFN(ffn_norm(pooled_h))``.
* "bert": BERT-style post-norm encoders (BERT, MiniLM): absolute positions, so pooled queries
  need no rotation; ``h' = LN1(pooled_h + r)``, ``out = LN2(h' + FFN(h'))``.

An adapter accepts only the ``config.model_type`` values it was checked against (Gemma 1,
Granite and Llama share module names, not math) and only blocks whose every parameter lives in a
module it runs; any other backbone is refused with one ValueError naming its model type and the
supported ones.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from .chunking import check_pooling_factor
from .config import EncoderConfig, PoolingGroups
from .lora import add_lora, is_lora_parameter
from .storage import check_model_dir


@dataclass
class EncoderOutput:
    """Pooled encoder states. Row b holds ``lengths[b]`` valid vectors, then zeros."""

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


# ---------------------------------------------------------------------------- grouping
def group_membership(
    lengths: torch.Tensor, pooling_factors: torch.Tensor, n: int, m: int, groups: PoolingGroups
) -> torch.Tensor:
    """[batch, m, n] bool: token t of row b belongs to pooled vector g.

    Row b has ``lengths[b]`` real tokens (right padded) cut into ceil(length / pf_b) groups;
    padding belongs to no group, and groups past a row's own count are empty.
    "balanced": sizes differ by at most one, larger first (reference ``split_integer(n, -pf)``:
    17 @ 8 -> 6, 6, 5; 7 @ 4 -> 4, 3; n < pf -> one group). "fixed_tail": pf, pf, ..., rest.
    """
    t = torch.arange(n, device=lengths.device)[None, :]  # [1, n]
    length, pf = lengths[:, None], pooling_factors[:, None]  # [batch, 1]
    if groups == "fixed_tail":
        gid = t // pf
    else:
        count = -(-length // pf)  # groups in this row
        size, larger = length // count, length % count  # the first `larger` groups hold size + 1
        head = larger * (size + 1)
        gid = torch.where(t < head, t // (size + 1), larger + (t - head) // size)
    gid = gid.masked_fill(t >= length, -1)  # [batch, n]
    return gid[:, None, :] == torch.arange(m, device=lengths.device)[None, :, None]


class GroupPooling:
    """Means over each row's token groups, built once and applied to states or per-head queries."""

    def __init__(
        self,
        valid: torch.Tensor | None,
        n: int,
        pooling_factors: Sequence[int],
        groups: PoolingGroups,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        pfs = list(pooling_factors)
        self.num_groups = -(-n // min(pfs))  # the widest row's group count, for any lengths
        if all(pf == 1 for pf in pfs):
            self.weights = self.counts = None  # every token is its own group
            return
        b = len(pfs)
        lengths = valid.sum(-1) if valid is not None else torch.full((b,), n, device=device)
        member = group_membership(lengths, torch.tensor(pfs, device=device), n, self.num_groups, groups)
        # 0/1 weights are exact in any dtype; the sum is divided by the count afterwards.
        self.weights = member.to(dtype)  # [batch, m, n]
        self.counts = self.weights.sum(-1, keepdim=True).clamp(min=1)  # [batch, m, 1]; empty groups -> 0

    def reach(self, window: int, n: int, device: torch.device) -> torch.Tensor:
        """[batch or 1, m, n] bool: key j lies within ``window`` of some token of group g (|i - j| < window).

        Groups are contiguous, so group g (tokens first..last) reaches first - window < j < last + window.
        A group with no token (past its row's count) reaches nothing.
        """
        t = torch.arange(n, device=device)
        if self.weights is None:  # every token is its own group
            first = last = t[None, :]  # [1, n]
        else:
            member = self.weights > 0  # [batch, m, n]
            first = torch.where(member, t, n).amin(-1)  # [batch, m]
            last = torch.where(member, t, -1).amax(-1)
        return (t > first[..., None] - window) & (t < last[..., None] + window) & (last >= 0)[..., None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, ..., n, d] -> [batch, ..., m, d]."""
        if self.weights is None:
            return x
        middle = [1] * (x.dim() - 3)  # broadcast over heads
        w = self.weights.view(x.shape[0], *middle, *self.weights.shape[1:]).to(x.dtype)
        c = self.counts.view(x.shape[0], *middle, *self.counts.shape[1:]).to(x.dtype)
        return (w @ x) / c


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x [batch, heads, n, head_dim] with cos/sin [batch, n, rot_dim].

    Hugging Face's rotate-half convention; partial rotary (rot_dim < head_dim) rotates the
    leading rot_dim channels.
    """
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------- adapters
BackboneFamily = Literal["llama", "gemma3", "neox", "bert"]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, n, heads * head_dim] -> [batch, heads, n, head_dim]."""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def _lacks(obj: object, dotted: str) -> bool:
    """True when the dotted attribute path is absent (or None) on obj."""
    for name in dotted.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return True
    return False


def _model_type(backbone: PreTrainedModel) -> str:
    return getattr(backbone.config, "model_type", None) or "?"


class BackboneAdapter:
    """Where one backbone family keeps the parts the encoder needs.

    ``ARCEncoder`` is written once over these methods: the full-length blocks run as the
    backbone runs them, and the pooled block is assembled from the family's own modules.
    An adapter accepts only the ``model_types`` it was checked against (layouts alike in
    their module names can differ in their math: Gemma 1, Granite and Llama share names), and
    only blocks whose every parameter lives in a module it runs (``block_modules``).
    """

    family: ClassVar[BackboneFamily]
    model_types: ClassVar[tuple[str, ...]]  # the config.model_type values this adapter computes correctly
    rotary: ClassVar[bool] = True  # positions enter through RoPE in every block
    final_norm_name: ClassVar[str | None] = None  # attribute of the norm after the last block
    # Dotted attributes the encoder uses: on the backbone, or on its first block ("block.").
    required: ClassVar[tuple[str, ...]] = ()
    # Block submodules the encoder runs (each as a whole: what it holds is computed by HF's code).
    # A block parameter outside all of them would be ignored by the pooled block: refused.
    block_modules: ClassVar[tuple[str, ...]] = ()

    def check(self, backbone: PreTrainedModel) -> None:
        """ValueError naming the model type, every missing part and every part the adapter would ignore."""
        blocks = self.blocks(backbone)
        missing = [p for p in self.required
                   if (_lacks(blocks[0], p.removeprefix("block.")) if p.startswith("block.") else _lacks(backbone, p))]
        ignored = sorted({name.rsplit(".", 1)[0] for block in blocks for name, _ in block.named_parameters()
                          if not any(name.startswith(m + ".") for m in self.block_modules)})
        problems = ([f"lacks {missing}"] if missing else []) + (
            [f"has block modules the {self.family!r} encoder would ignore: {ignored}"] if ignored else [])
        problems += self.config_problems(backbone.config)
        if problems:
            raise ValueError(
                f"backbone model_type={_model_type(backbone)!r} ({self.family!r} family) "
                f"{'; '.join(problems)}: {supported_backbones()}"
            )

    def config_problems(self, config: PretrainedConfig) -> list[str]:
        """Settings of the backbone config the encoder would not compute (each a short phrase)."""
        return []

    def prepare(self, backbone: PreTrainedModel, config: EncoderConfig) -> None:
        """Checks and trimming when an encoder is built.

        Without ``final_norm`` (the reference) the backbone's final norm is never used: it
        becomes an identity, so its weight is neither saved nor handed to an optimiser (DDP
        refuses parameters that get no gradient), as the truncated blocks are.
        """
        if self.final_norm_name and not config.final_norm:
            setattr(backbone, self.final_norm_name, nn.Identity())

    def blocks(self, backbone: PreTrainedModel) -> nn.ModuleList:
        return backbone.layers

    def set_blocks(self, backbone: PreTrainedModel, blocks: nn.ModuleList) -> None:
        backbone.layers = blocks

    def self_attention(self, block: nn.Module) -> nn.Module:
        """The module whose ``is_causal`` HF's attention kernels read."""
        raise NotImplementedError

    def layer_kind(self, block: nn.Module) -> str:
        """Which RoPE table and attention window the block uses (one kind unless the family mixes them)."""
        return "all"

    def rope(self, backbone: PreTrainedModel, hidden: torch.Tensor, position_ids: torch.Tensor, kind: str):
        """The backbone's RoPE (cos, sin) at ``position_ids`` for blocks of ``kind``."""
        return backbone.rotary_emb(hidden, position_ids=position_ids)

    def window(self, backbone: PreTrainedModel, kind: str) -> int | None:
        """Sliding-window band of blocks of ``kind`` in a bidirectional encoder: token i sees j
        when |i - j| < window; None: every token (the family has no sliding layers)."""
        return None

    def embed(self, backbone: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
        return backbone.get_input_embeddings()(input_ids)

    def run_block(self, block, hidden, mask, position_ids, position_embeddings) -> torch.Tensor:
        out = block(hidden, attention_mask=mask, position_ids=position_ids,
                    position_embeddings=position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    def attention_norm(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block.input_layernorm(x)

    def queries(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[batch, n, hidden] -> [batch, heads, n, head_dim], before RoPE."""
        raise NotImplementedError

    def keys_values(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[batch, n, hidden] -> keys, values [batch, kv_heads, n, head_dim], keys before RoPE."""
        raise NotImplementedError

    def attention_scale(self, block: nn.Module) -> float:
        raise NotImplementedError

    def attention_output(self, block: nn.Module, context: torch.Tensor) -> torch.Tensor:
        """[batch, m, heads * head_dim] -> [batch, m, hidden] (the output projection)."""
        raise NotImplementedError

    def block_output(
        self, block: nn.Module, attn: torch.Tensor, pooled_in: torch.Tensor, residual: bool
    ) -> torch.Tensor:
        """Pre-norm block end: ``h' = pooled_in + attn``, ``out = h' + FFN(ffn_norm(h'))``."""
        h = attn + pooled_in if residual else attn
        return h + block.mlp(block.post_attention_layernorm(h))

    def final_norm(self, backbone: PreTrainedModel) -> nn.Module | None:
        """The backbone's norm after its last block (None: the family has none)."""
        return getattr(backbone, self.final_norm_name) if self.final_norm_name else None


class LlamaAdapter(BackboneAdapter):
    family = "llama"
    # Granite (residual multipliers), Gemma 1 (embedding scale in the model's forward), SmolLM3
    # (NoPE layers) and others share these module names but not the math: not listed.
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    final_norm_name = "norm"
    required = ("embed_tokens", "layers", "norm", "rotary_emb", "block.self_attn.q_proj",
                "block.self_attn.k_proj", "block.self_attn.v_proj", "block.self_attn.o_proj",
                "block.input_layernorm", "block.post_attention_layernorm", "block.mlp")
    block_modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "self_attn.q_norm", "self_attn.k_norm", "input_layernorm", "post_attention_layernorm", "mlp")

    def self_attention(self, block):
        return block.self_attn

    def queries(self, block, x):
        attn = block.self_attn
        q = attn.q_proj(x).view(*x.shape[:2], -1, attn.head_dim)  # [b, n, heads, hd]
        if getattr(attn, "q_norm", None) is not None:  # Qwen3, Gemma 3: per-head RMSNorm before RoPE
            q = attn.q_norm(q)
        return q.transpose(1, 2)

    def keys_values(self, block, x):
        attn = block.self_attn
        k = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        return k.transpose(1, 2), _heads(attn.v_proj(x), attn.head_dim)

    def attention_scale(self, block):
        return getattr(block.self_attn, "scaling", block.self_attn.head_dim**-0.5)

    def attention_output(self, block, context):
        return block.self_attn.o_proj(context)


@functools.lru_cache(maxsize=None)
def _takes(fn, name: str) -> bool:
    """True when function ``fn`` has a parameter called ``name`` (signature read through decorators)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Gemma3Adapter(LlamaAdapter):
    """Gemma 3 text models: Llama's attention with q/k norms and ``query_pre_attn_scalar``
    scaling, four (1 + weight) RMSNorms per block (the attention and MLP outputs are normed before
    their residual adds), embeddings scaled by sqrt(hidden) inside HF's own embedding module, and
    two RoPE tables: sliding-window layers use the local one, full-attention layers the global one.

    The pooled block, by analogy with the reference's pre-norm block:
    ``r = post_attention_layernorm(o_proj(attention))``, ``h' = pooled_h + r``,
    ``out = h' + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h')))``.
    """

    family = "gemma3"
    model_types = ("gemma3_text",)  # "gemma3" is the image-text model: its text model is "gemma3_text"
    required = LlamaAdapter.required + ("block.self_attn.q_norm", "block.self_attn.k_norm",
                                        "block.pre_feedforward_layernorm", "block.post_feedforward_layernorm")
    block_modules = LlamaAdapter.block_modules + ("pre_feedforward_layernorm", "post_feedforward_layernorm")

    def check(self, backbone):
        super().check(backbone)
        # transformers 5.x (checked: 5.17, 5.25) keeps one RoPE table per layer type in one module and
        # takes the type as an argument; the 4.x layout (a second module, other block arguments) is refused.
        if not _takes(type(backbone.rotary_emb).forward, "layer_type"):
            raise ValueError(
                f"backbone model_type={_model_type(backbone)!r}: this transformers version's Gemma 3 rotary "
                "embedding takes no layer_type (the transformers 4.x layout); use transformers 5"
            )

    def config_problems(self, config):
        if getattr(config, "attn_logit_softcapping", None) is not None:  # Gemma 2's; SDPA cannot cap logits
            return [f"sets attn_logit_softcapping={config.attn_logit_softcapping} (not supported)"]
        return []

    def prepare(self, backbone, config):
        super().prepare(backbone, config)
        # HF's flash-attention path takes a sliding layer's band from its module (window (w-1, w-1)
        # when is_causal is False), SDPA and eager from the mask: keep both on the encoder's band.
        for block in self.blocks(backbone):
            kind = self.layer_kind(block)
            block.self_attn.sliding_window = (
                self.window(backbone, kind) if config.sliding_window_layers == "band" else None)

    def layer_kind(self, block):
        attn = block.self_attn
        kind = getattr(attn, "layer_type", None) or getattr(block, "attention_type", None)
        if kind is None:
            kind = "sliding_attention" if getattr(attn, "is_sliding", False) else "full_attention"
        return kind

    def rope(self, backbone, hidden, position_ids, kind):
        return backbone.rotary_emb(hidden, position_ids, layer_type=kind)  # the local or the global table

    def window(self, backbone, kind):
        """HF's bidirectional Gemma 3 band (``use_bidirectional_attention``, EmbeddingGemma): its
        config halves the causal window, ``w = sliding_window // 2 + 1``, and a token sees
        ``|i - j| < w`` (512 -> 256 tokens on each side): the same span as the causal window."""
        window = getattr(backbone.config, "sliding_window", None)
        if kind != "sliding_attention" or window is None:
            return None
        if getattr(backbone.config, "use_bidirectional_attention", False):
            return window  # the config already holds the halved window
        return window // 2 + 1

    def block_output(self, block, attn, pooled_in, residual):
        r = block.post_attention_layernorm(attn)
        h = r + pooled_in if residual else r
        return h + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))


class NeoXAdapter(BackboneAdapter):
    family = "neox"
    model_types = ("gpt_neox",)
    final_norm_name = "final_layer_norm"
    required = ("embed_in", "layers", "final_layer_norm", "rotary_emb", "block.attention.query_key_value",
                "block.attention.dense", "block.input_layernorm", "block.post_attention_layernorm", "block.mlp")
    block_modules = ("attention.query_key_value", "attention.dense", "input_layernorm", "post_attention_layernorm",
                     "mlp")

    def self_attention(self, block):
        return block.attention

    def _qkv(self, block, x):
        hd = block.attention.head_size
        qkv = block.attention.query_key_value(x).view(*x.shape[:2], -1, 3 * hd).transpose(1, 2)
        return qkv.chunk(3, dim=-1)  # each [b, heads, n, hd]

    def queries(self, block, x):
        return self._qkv(block, x)[0]

    def keys_values(self, block, x):
        _, k, v = self._qkv(block, x)
        return k, v

    def attention_scale(self, block):
        return block.attention.scaling

    def attention_output(self, block, context):
        return block.attention.dense(context)

    def block_output(self, block, attn, pooled_in, residual):
        if not block.use_parallel_residual:
            return super().block_output(block, attn, pooled_in, residual)
        # x + attn(ln1 x) + mlp(ln2 x), with the pooled input in the place of x
        out = attn + block.mlp(block.post_attention_layernorm(pooled_in))
        return out + pooled_in if residual else out



class BertAdapter(BackboneAdapter):
    family = "bert"
    model_types = ("bert",)
    rotary = False
    required = ("embeddings", "encoder.layer", "block.attention.self.query", "block.attention.self.key",
                "block.attention.self.value", "block.attention.output.dense",
                "block.attention.output.LayerNorm", "block.intermediate", "block.output")
    block_modules = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate", "output")

    def prepare(self, backbone, config):
        super().prepare(backbone, config)
        max_pos = getattr(backbone.config, "max_position_embeddings", None)
        if max_pos is not None and config.chunk_len > max_pos:
            raise ValueError(
                f"chunk_len={config.chunk_len} exceeds the BERT backbone's "
                f"max_position_embeddings={max_pos}; set chunk_len <= {max_pos}"
            )
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # the [CLS] pooler is never used; keep it out of the weights

    def blocks(self, backbone):
        return backbone.encoder.layer

    def set_blocks(self, backbone, blocks):
        backbone.encoder.layer = blocks

    def self_attention(self, block):
        return block.attention.self

    def embed(self, backbone, input_ids):
        return backbone.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))

    def run_block(self, block, hidden, mask, position_ids, position_embeddings):
        out = block(hidden, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    def attention_norm(self, block, x):
        return x  # post-norm: attention reads the block input as is

    def queries(self, block, x):
        sa = block.attention.self
        return _heads(sa.query(x), sa.attention_head_size)

    def keys_values(self, block, x):
        sa = block.attention.self
        return _heads(sa.key(x), sa.attention_head_size), _heads(sa.value(x), sa.attention_head_size)

    def attention_scale(self, block):
        return block.attention.self.attention_head_size**-0.5

    def attention_output(self, block, context):
        return block.attention.output.dense(context)

    def block_output(self, block, attn, pooled_in, residual):
        h = block.attention.output.LayerNorm(attn + pooled_in if residual else attn)
        return block.output(block.intermediate(h), h)  # LN2(h + FFN(h))


ADAPTERS: dict[BackboneFamily, BackboneAdapter] = {
    "llama": LlamaAdapter(),
    "gemma3": Gemma3Adapter(),
    "neox": NeoXAdapter(),
    "bert": BertAdapter(),
}


def supported_backbones() -> str:
    """One phrase listing every family and the model types it accepts."""
    listed = "; ".join(f"{family}: {', '.join(a.model_types)}" for family, a in ADAPTERS.items())
    return f"supported backbone model types ({listed})"


def backbone_adapter(backbone: PreTrainedModel) -> BackboneAdapter:
    """The adapter for ``backbone``'s ``config.model_type``, after checking its layout.

    ValueError naming the model type (and the supported ones) when no adapter accepts it or when
    its blocks lack a part the adapter needs or hold one it would ignore.
    """
    model_type = _model_type(backbone)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            adapter.check(backbone)
            return adapter
    raise ValueError(f"backbone model_type={model_type!r} is not supported: {supported_backbones()}")


def truncate_backbone(backbone: PreTrainedModel, keep: int) -> None:
    """Drop all blocks after the first ``keep`` (in place), keeping the config consistent."""
    adapter = backbone_adapter(backbone)
    adapter.set_blocks(backbone, nn.ModuleList(list(adapter.blocks(backbone))[:keep]))
    backbone.config.num_hidden_layers = keep
    layer_types = getattr(backbone.config, "layer_types", None)
    if layer_types is not None:
        backbone.config.layer_types = list(layer_types)[:keep]


# ---------------------------------------------------------------------------- encoder
class ARCEncoder(nn.Module):
    """Bidirectional encoder whose last block pools by ``config.pooling_factor``."""

    def __init__(self, config: EncoderConfig, backbone: PreTrainedModel) -> None:
        super().__init__()
        self.adapter = backbone_adapter(backbone)
        self.family: BackboneFamily = self.adapter.family
        blocks = self.adapter.blocks(backbone)
        if backbone.config.num_hidden_layers != len(blocks):
            raise ValueError(
                f"backbone config says {backbone.config.num_hidden_layers} layers but has {len(blocks)}"
            )
        self.adapter.prepare(backbone, config)
        self.config = config
        self.backbone = backbone
        # Every attention module must run non-causally (read by HF's SDPA/flash paths).
        for block in blocks:
            self.adapter.self_attention(block).is_causal = False
        if config.tuning == "lora":
            if config.full_blocks > len(blocks):
                raise ValueError(f"full_blocks={config.full_blocks} but the encoder has {len(blocks)} blocks")
            add_lora(list(blocks)[: len(blocks) - config.full_blocks], config.lora_targets, config.lora_rank,
                     config.lora_alpha)

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
            from .loading import load_pretrained

            # The LM head in the files is unused here (expected); missing weights are reported.
            source = check_model_dir(config.base_model, "base model", allow_hub_id=True)
            backbone = load_pretrained(AutoModel, str(source), "encoder base_model",
                                       dtype=torch_dtype, attn_implementation=attn)
        else:
            backbone = AutoModel.from_config(
                backbone_config, dtype=torch_dtype, attn_implementation=attn
            )
        keep = config.check_backbone(backbone.config.num_hidden_layers)
        truncate_backbone(backbone, keep)
        if config.tuning == "lora" and backbone_config is None:  # a delta names the weights it applies to
            from .gguf import weights_identity

            identity = weights_identity(source)
            if config.base_sha256 and config.base_sha256 != identity:
                raise ValueError(f"base model {source}: its weights (sha256 {identity[:12]}...) are not the base "
                                 f"this encoder was trained on ({config.base_sha256[:12]}...)")
            config = dataclasses.replace(config, base_sha256=identity)
        return cls(config, backbone)

    def set_trainable(self, enabled: bool) -> None:
        """Gradients on what ``config.tuning`` trains (everything, or the adapters and the last
        ``full_blocks`` blocks) when ``enabled``; off everywhere otherwise."""
        self.requires_grad_(False)
        if not enabled:
            return
        if self.config.tuning == "full":
            self.requires_grad_(True)
            return
        for name, param in self.named_parameters():
            if is_lora_parameter(name):
                param.requires_grad_(True)
        for block in list(self.blocks)[len(self.blocks) - self.config.full_blocks:]:
            block.requires_grad_(True)

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """What a "lora" encoder's checkpoint stores: the adapters and the fully trained last blocks."""
        if self.config.tuning != "lora":
            raise ValueError("only an encoder with tuning='lora' has a delta")
        full = {id(p) for block in list(self.blocks)[len(self.blocks) - self.config.full_blocks:]
                for p in block.parameters()}
        return {name: p.detach() for name, p in self.named_parameters() if is_lora_parameter(name) or id(p) in full}

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
        return self.adapter.blocks(self.backbone)

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
        kwargs = {"use_reentrant": False}
        if hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------ forward
    def _window(self, kind: str) -> int | None:
        """The attention band of the encoder's blocks of ``kind`` (None: the whole chunk)."""
        if self.config.sliding_window_layers == "full":
            return None
        return self.adapter.window(self.backbone, kind)

    def _layer_mask(
        self, valid: torch.Tensor | None, hidden: torch.Tensor, window: int | None = None
    ) -> torch.Tensor | None:
        """Padding-only mask in the form the backbone's attention implementation expects; with
        ``window``, keys also need |i - j| < window (a bidirectional sliding-window band)."""
        impl = self.backbone.config._attn_implementation
        b, n = hidden.shape[:2]
        banded = window is not None and window < n  # a band at least as wide as the chunk is no band
        if valid is None and not banded:
            return None
        if impl == "flash_attention_2":  # the band is the kernel's window (set by the adapter's prepare)
            return None if valid is None else valid.long()  # [batch, n]; HF unpads with it
        if banded:
            t = torch.arange(n, device=hidden.device)
            keys = ((t[:, None] - t[None, :]).abs() < window).expand(b, 1, n, n)  # [batch, 1, query, key]
            if valid is not None:  # a padding query keeps its band (never an empty row, whose NaNs would spread)
                keys = keys & (valid[:, None, None, :] | ~valid[:, None, :, None])
        else:
            keys = valid[:, None, None, :].expand(b, 1, n, n)
        if impl == "sdpa":
            return keys
        additive = torch.zeros(keys.shape, dtype=hidden.dtype, device=hidden.device)
        return additive.masked_fill(~keys, torch.finfo(hidden.dtype).min)

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
            check_pooling_factor(pf, self.config.chunk_len)
        return pfs

    def _positions(self, hidden: torch.Tensor, count: int, kind: str = "all"):
        """Position ids 0..count-1 per row and the backbone's RoPE (cos, sin) at them, for blocks of ``kind``."""
        pos = torch.arange(count, device=hidden.device).unsqueeze(0).expand(hidden.shape[0], count)
        return pos, self.adapter.rope(self.backbone, hidden, pos, kind)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pooling_factors: int | Sequence[int] | None = None,
    ) -> EncoderOutput:
        """Encode right-padded token ids [batch, n] into [batch, ceil(n / min pf), hidden].

        ``pooling_factors``: None (the config's), one int, or one int per row. Each row's
        groups come from its own length and factor, so rows with different factors share one
        pass (entropy-adaptive compression, ``arc_encoder.adaptive``). Row b holds
        ceil(n_b / pf_b) valid vectors (``lengths``); the positions after them are zeros.
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

        adapter, bb = self.adapter, self.backbone
        hidden = adapter.embed(bb, input_ids)  # [batch, n, hidden]
        blocks = self.blocks
        # One RoPE table and one mask per kind of block (Gemma 3: sliding / full; others: one kind).
        kinds = [adapter.layer_kind(block) for block in blocks]
        position_ids, tables = None, {}
        if adapter.rotary:
            position_ids = torch.arange(input_ids.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
            tables = {kind: adapter.rope(bb, hidden, position_ids, kind) for kind in dict.fromkeys(kinds)}
        masks = {kind: self._layer_mask(valid, hidden, self._window(kind)) for kind in dict.fromkeys(kinds[:-1])}
        for block, kind in zip(blocks[:-1], kinds):
            hidden = adapter.run_block(block, hidden, masks[kind], position_ids, tables.get(kind))
        pooling = self._pooling(hidden, valid, pfs)
        pooled = self._pooled_block(blocks[-1], hidden, valid, pooling, tables.get(kinds[-1]))
        norm = adapter.final_norm(bb) if self.config.final_norm else None
        if norm is not None:
            pooled = norm(pooled)

        if len(set(pfs)) == 1:
            compressed_lengths = -(-lengths // pfs[0])
        else:
            compressed_lengths = -(-lengths // torch.tensor(pfs, device=lengths.device))
        out_mask = torch.arange(pooled.shape[1], device=pooled.device)[None, :] < compressed_lengths[:, None]
        if valid is not None or len(set(pfs)) > 1:  # some rows end early: zero what follows
            pooled = pooled.masked_fill(~out_mask[..., None], 0.0)
        return EncoderOutput(pooled, out_mask, compressed_lengths)

    def _pooling(self, hidden, valid, pooling_factor) -> GroupPooling:
        pfs = self.row_pooling_factors(hidden.shape[0], pooling_factor)
        return GroupPooling(valid, hidden.shape[1], pfs, self.config.pooling_groups, hidden.dtype, hidden.device)

    def _pooled_block(self, layer, hidden, valid, pooling: GroupPooling, position_embeddings) -> torch.Tensor:
        pooled_in = pooling(hidden)  # [b, m, hidden]: the block input, averaged per group
        attn = self._pooled_attention(layer, hidden, pooled_in, valid, pooling, position_embeddings)
        return self.adapter.block_output(layer, attn, pooled_in, self.config.pooled_residual)

    def _pooled_attention(
        self, layer, hidden, pooled_in, valid, pooling: GroupPooling, position_embeddings
    ) -> torch.Tensor:
        """m pooled queries attend over all n valid keys, bidirectionally: [batch, m, hidden].

        In a sliding layer with ``sliding_window_layers="band"`` a group's query reads the keys
        any of its tokens would read (with pooling factor 1: exactly HF's band).
        """
        ad, cfg = self.adapter, self.config
        b, m = hidden.shape[0], pooling.num_groups
        kind = ad.layer_kind(layer)
        x = ad.attention_norm(layer, hidden)
        k, v = ad.keys_values(layer, x)  # [b, kv_heads, n, hd]
        if cfg.pooled_query_input == "pooled_hidden":  # reference: queries of the averaged input
            q = ad.queries(layer, ad.attention_norm(layer, pooled_in))  # [b, heads, m, hd]
            rotate_pooled = True
        else:  # format 1: average the per-token queries
            q = ad.queries(layer, x)  # [b, heads, n, hd]
            if position_embeddings is not None and cfg.pooled_query_positions == "group_mean":
                q = apply_rope(q, *position_embeddings)
                rotate_pooled = False
            else:
                rotate_pooled = True
            q = pooling(q)
        if position_embeddings is not None:
            k = apply_rope(k, *position_embeddings)
            if rotate_pooled:  # pooled queries sit at positions 0..m-1, in this block's RoPE table
                q = apply_rope(q, *self._positions(hidden, m, kind)[1])
        key_mask = None if valid is None else valid[:, None, None, :]  # [b, 1, 1, n]
        window = self._window(kind)
        n = hidden.shape[1]
        if window is not None and window < n:  # a sliding layer's band: a group sees what its tokens see
            keys = key_mask if valid is not None else torch.ones(1, 1, 1, n, dtype=torch.bool, device=hidden.device)
            allowed = pooling.reach(window, n, hidden.device)[:, None] & keys  # [b, 1, m, n]
            # a row that reaches no valid key holds no group (zeroed later): it reads every valid key, never NaN
            key_mask = allowed | (~allowed.any(-1, keepdim=True) & keys)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, scale=ad.attention_scale(layer), enable_gqa=q.shape[1] != k.shape[1]
        )  # [b, heads, m, hd]
        return ad.attention_output(layer, out.transpose(1, 2).reshape(b, m, -1))
