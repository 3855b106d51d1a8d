"""Per-decoder input conventions: what a frozen decoder expects before the first token of a sequence.

A pretrained causal LM was trained on sequences that started the way its tokenizer starts them.
Gemma 3's tokenizer puts ``<bos>`` first, and the model depends on it: on held-out text its NLL
is 3.85 nats/token with the BOS and 6.00 without (DATA.md); in the probe, its closed-book loss is
4.15 vs 6.83 and the second copy of a random sequence 0.41 vs 3.65 nats/token without it
(benchmarks/results/probe_real_cpu.json).
SmolLM2's tokenizer adds nothing: its ``bos_token`` is the chat marker ``<|im_start|>``, which
starts a chat turn, not a document, and prepending it changes nothing useful (3.53 vs 3.55). GPT-2
style tokenizers add nothing either. So the prefix is read off the tokenizer's own behaviour, not
off the presence of a ``bos_token``, nor off ``tokenizer.add_bos_token``, which a fast tokenizer
may report as False while its post-processor adds the BOS anyway (Gemma 3's does).

Every place that builds decoder inputs from text (training samples, caches, generation, the
probe) uses ``decoder_prefix_ids`` so that a decoder always sees its own convention.

``attention_windows`` reads the other per-decoder fact that sizes and costs depend on: which
layers attend to a sliding window (the KV-cache bytes of ``arc-encoder cache info`` and the
planner's attention FLOPs). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping

SAMPLE_TEXT = "Hello world. A plain sentence."


def decoder_prefix_ids(tokenizer) -> list[int]:
    """``[tokenizer.bos_token_id]`` when the tokenizer's default encoding puts its BOS at the start of a
    sequence (``tokenizer(text)`` has it before the tokens of ``tokenizer(text, add_special_tokens=False)``),
    else ``[]``. Tokens it appends (an EOS) are not part of a prefix and are ignored."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = list(tokenizer(SAMPLE_TEXT)["input_ids"])
    plain = list(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"])
    # Where the plain tokens start inside the default encoding: everything before them was added in front.
    front = next((with_special[:i] for i in range(len(with_special) - len(plain) + 1)
                  if with_special[i : i + len(plain)] == plain), [])
    return [int(bos)] if int(bos) in front else []


def _field(config, name: str, default=None):
    """``config.name`` for a config object, ``config[name]`` for a config.json dict."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def attention_windows(config) -> list[int | None]:
    """Per decoder layer: how many of the most recent positions its attention reads and its KV cache
    keeps (a sliding-window layer: ``sliding_window``), or None for a layer that reads them all.

    ``config``: a Hugging Face config object or its config.json dict. Read as transformers does:
    ``layer_types`` when present (Gemma 2/3, recent Qwen2/Mistral configs: "sliding_attention" layers
    use the window, every other type is counted as full); else Gemma's ``sliding_window_pattern`` (every
    pattern-th layer full, the others sliding); else a ``sliding_window`` applies to every
    layer (Mistral), except with Qwen2's ``use_sliding_window: false`` (none) or ``max_window_layers``
    (the window from that layer on). Gemma 3 270M: 15 sliding layers of 512 positions, 3 full.
    """
    layers = _field(config, "num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"config: num_hidden_layers must be an integer >= 1, got {layers!r}")
    window = _field(config, "sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"config: sliding_window must be an integer >= 1 or null, got {window!r}")
    types = _field(config, "layer_types")
    if types is not None:
        if not isinstance(types, (list, tuple)) or len(types) != layers or not all(isinstance(t, str) for t in types):
            raise ValueError(f"config: layer_types must list one string per layer ({layers}), got {types!r}")
        return [window if t == "sliding_attention" else None for t in types]
    pattern = _field(config, "sliding_window_pattern") or _field(config, "_sliding_window_pattern")
    if window is not None and isinstance(pattern, int) and pattern >= 1:  # Gemma 2/3 configs before layer_types
        return [window if (i + 1) % pattern else None for i in range(layers)]
    if window is None or _field(config, "use_sliding_window", True) is False:
        return [None] * layers
    start = _field(config, "max_window_layers", 0) if _field(config, "use_sliding_window") is not None else 0
    return [window if i >= (start or 0) else None for i in range(layers)]
