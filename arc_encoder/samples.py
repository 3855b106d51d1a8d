"""Samples and batches: raw text -> reconstruction, continuation and QA samples, windows, collate.

Pure functions over tokenizers (no Lightning), shared by training, benchmarks and caches.

A raw document is tokenized ONCE with the decoder's tokenizer and cut into windows of
``context_tokens + target_tokens`` decoder tokens. The context window is decoded back to
text and re-tokenized with the encoder's tokenizer, so encoder and decoder see the same
characters even when their vocabularies differ. Per window:

* reconstruction: target = the context's own decoder tokens (marker ``reconstruction``);
* continuation:   target = the next ``target_tokens`` decoder tokens (marker ``continuation``).

Both live in one ``Sample`` (``context_ids`` and ``continuation_ids``), so validation can
score the same window both ways and compare compressed context with the full text.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

Task = Literal["reconstruction", "continuation", "qa"]
TASKS: tuple[Task, ...] = ("reconstruction", "continuation", "qa")


@dataclass
class Sample:
    """One example for one decoder. Token ids only; the model builds embeddings."""

    encoder_ids: list[int]  # the context, in the encoder's vocabulary
    context_ids: list[int]  # the same context in the decoder's vocabulary (full-text reference)
    prompt_ids: list[int]  # decoder tokens after the marker, no loss (QA question)
    continuation_ids: list[int]  # what follows the context (continuation target / QA answer)


@dataclass
class Batch:
    """A batch for ONE decoder and ONE task (the marker is per batch)."""

    decoder: str
    task: Task
    encoder_ids: list[list[int]]
    context_ids: list[list[int]]
    prompt_ids: list[list[int]]
    continuation_ids: list[list[int]]
    prefix_ids: list[list[int]]  # e.g. [bos] per row
    index: int = 0  # position in the batch stream (reproducible task schedule)
    meta: dict = field(default_factory=dict)
    # Per sample a pooling factor, or one per chunk (mixed-pooling training, adaptive plans);
    # None: the encoder's default.
    pooling_factors: list[int] | list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.encoder_ids)

    @property
    def target_ids(self) -> list[list[int]]:
        """The tokens that carry loss for this batch's task."""
        return self.context_ids if self.task == "reconstruction" else self.continuation_ids

    @property
    def marker(self) -> str:
        return "reconstruction" if self.task == "reconstruction" else "continuation"

    @property
    def num_target_tokens(self) -> int:
        """Tokens that carry loss: a multi-process step weights each rank's loss by this."""
        return sum(len(t) for t in self.target_ids)


def check_tokenizer_pair(
    name: str, decoder_vocab: int, tokenizer: PreTrainedTokenizerBase, allow_padded_vocab: bool = False,
    what: str = "decoder",
) -> None:
    """Refuse a tokenizer that is not the model's own (its size must equal the vocabulary).

    ``allow_padded_vocab`` accepts an embedding table larger than the tokenizer (models that
    round their vocabulary up, e.g. Qwen); a smaller table would index out of range. ``what``:
    which model (the decoders, and the encoder, check here).
    """
    n = len(tokenizer)
    if n > decoder_vocab or (n != decoder_vocab and not allow_padded_vocab):
        raise ValueError(
            f"{what} {name!r}: its tokenizer has {n} tokens but the {what}'s embedding table "
            f"has {decoder_vocab} rows: mismatched tokenizer (set allow_padded_vocab for a "
            "vocabulary padded past the tokenizer)"
        )


def split_windows(
    text: str,
    decoder_tokenizer: PreTrainedTokenizerBase,
    context_tokens: int,
    target_tokens: int,
    min_context_tokens: int = 8,
    ids: list[int] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Cut one document into (context, continuation) decoder-token windows, no overlap.

    ``ids``: the document already tokenized with ``decoder_tokenizer`` (skips that work).
    """
    if context_tokens < 1 or target_tokens < 1:
        raise ValueError(f"context_tokens and target_tokens must be >= 1, got {context_tokens}, {target_tokens}")
    if ids is None:
        ids = decoder_tokenizer(text, add_special_tokens=False)["input_ids"]
    span = context_tokens + target_tokens
    out = []
    for start in range(0, len(ids), span):
        window = ids[start : start + span]
        ctx, cont = window[:context_tokens], window[context_tokens:]
        if len(ctx) < min_context_tokens or not cont:
            break
        out.append((ctx, cont))
    return out


def text_sample(
    context_ids: list[int],
    continuation_ids: list[int],
    encoder_tokenizer: PreTrainedTokenizerBase,
    decoder_tokenizer: PreTrainedTokenizerBase,
    same_tokenizer: bool = False,
) -> Sample:
    """A pretraining sample; the encoder re-tokenizes the decoded context text."""
    if same_tokenizer:
        enc = list(context_ids)
    else:
        enc = encoder_tokenizer(decoder_tokenizer.decode(context_ids), add_special_tokens=False)["input_ids"]
    return Sample(enc or [0], list(context_ids), [], list(continuation_ids))


def qa_sample(
    context: str,
    question: str,
    answer: str,
    encoder_tokenizer: PreTrainedTokenizerBase,
    decoder_tokenizer: PreTrainedTokenizerBase,
    max_context_tokens: int | None = None,
) -> Sample:
    """Fine-tuning sample: compressed context, question as prompt, answer (+eos) as target."""
    for key, value in (("context", context), ("question", question), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"QA sample field {key!r} must be a non-empty string, got {value!r}")
    enc = encoder_tokenizer(context, add_special_tokens=False)["input_ids"]
    ctx = decoder_tokenizer(context, add_special_tokens=False)["input_ids"]
    if max_context_tokens is not None:
        enc, ctx = enc[:max_context_tokens], ctx[:max_context_tokens]
    prompt = decoder_tokenizer(question.rstrip() + "\n", add_special_tokens=False)["input_ids"]
    target = decoder_tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if decoder_tokenizer.eos_token_id is not None:
        target = target + [decoder_tokenizer.eos_token_id]
    return Sample(enc, ctx, prompt, target)


def is_reconstruction(step: int, ratio: float) -> bool:
    """Deterministic schedule: exactly round(N * ratio) of the first N steps reconstruct.

    Reconstruction steps are spread evenly (Bresenham), so the ratio holds over any window
    and a resumed run continues the same schedule from its step index.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"reconstruction ratio must be in [0, 1], got {ratio}")
    return math.floor((step + 1) * ratio + 1e-9) > math.floor(step * ratio + 1e-9)


def mixed_pooling(index: int, batch_size: int, factors: Sequence[int]) -> list[int]:
    """Per-sample pooling factors for batch ``index``, drawn uniformly from ``factors``.

    Seeded by the batch index alone, so a resumed run draws the same factors again.
    """
    if not factors:
        raise ValueError("mixed_pooling needs at least one factor")
    rng = random.Random(f"arc-mixed-pooling-{index}")
    return [rng.choice(list(factors)) for _ in range(batch_size)]


def collate(
    samples: Sequence[Sample], decoder: str, task: Task, prefix: int | Sequence[int] | None, index: int = 0
) -> Batch:
    """Group samples for one decoder and task (padding happens in ``build_decoder_inputs``).

    ``prefix``: the decoder tokens before every row's compressed context (`decoders.decoder_prefix`;
    one int: that token, e.g. BOS; None: nothing).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {list(TASKS)}")
    prefix = [] if prefix is None else [prefix] if isinstance(prefix, int) else list(prefix)
    return Batch(
        decoder=decoder,
        task=task,
        encoder_ids=[s.encoder_ids for s in samples],
        context_ids=[s.context_ids for s in samples],
        prompt_ids=[s.prompt_ids for s in samples],
        continuation_ids=[s.continuation_ids for s in samples],
        prefix_ids=[list(prefix) for _ in samples],
        index=index,
    )

