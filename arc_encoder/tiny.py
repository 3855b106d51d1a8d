"""Tiny random models and a small trained tokenizer, for CPU quickstarts and tests.

Nothing here downloads: configs are built in code and the tokenizer is trained in a
second on the given text with the `tokenizers` library.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

Family = Literal["llama", "mistral", "qwen2", "gpt_neox", "gemma3_text"]
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def tiny_config(
    family: Family = "llama",
    vocab_size: int = 99,
    hidden_size: int = 32,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 37,
    max_position_embeddings: int = 4096,
    **overrides,
) -> PretrainedConfig:
    """A small HF causal-LM config of the given family (odd sizes catch swapped dims)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "gemma3_text":
        # Gemma 3's defaults are real-model sizes (head_dim 256, window 4096): tiny ones, both layer
        # types (a full layer every second one), a band narrower than a test sequence, and a score
        # scale (query_pre_attn_scalar) that is not head_dim.
        head_dim = hidden_size // num_heads
        kwargs.update(head_dim=head_dim, query_pre_attn_scalar=head_dim + 5, sliding_window=6,
                      layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)])
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_causal_lm(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """Randomly initialised causal LM (seeded, so tests are reproducible)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, add_bos: bool = False):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    ``add_bos``: the tokenizer starts every text with its BOS (as Gemma's does).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = SPECIAL_TOKENS["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **SPECIAL_TOKENS)
