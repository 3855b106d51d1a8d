"""Task-agnostic compression quality: how much of a text's information survives compression.

The compressor is treated as a noisy channel and the frozen decoder as the model of the text.
For a context x (N decoder tokens) compressed into V vectors z:

    H(x)     = -log2 p_dec(x)                 bits the decoder needs with no context
    H(x | z) = -log2 p_dec(x | z, <recon>)    bits it still needs when reading the vectors
    I        = H(x) - H(x | z)                bits recovered from the vectors

reported per original token (``bits_recovered_per_token``), per vector (``bits_per_vector``)
and as a share of H(x) (``info_retained``). Both terms are cross-entropies under the same
decoder, so I is a plug-in estimate of the information the vectors carry *for this decoder*
(no downstream task, no labels). Alongside it: the continuation loss with compressed, no
and full-text context (the distortion of a rate-distortion curve whose rate is vectors, or
bytes, per original token), the share of the closed-/open-book gap closed, and ``em_at_k``:
the share of rows whose first k continuation tokens greedy decoding reproduces exactly
(k teacher-forced argmax hits in a row are exactly what greedy generation emits).

Teacher-forced reconstruction accuracy (``recon_acc``) scores each context token given the true
ones before it; ``greedy_reconstruction`` lets the decoder run free from [prefix][vectors][<Rec>]
for as many tokens as the context has, and scores what it writes: exact match (the whole context
reproduced) and corpus BLEU-4 over token ids (``arc_encoder.bleu``). One early error derails a
free run, so these are the numbers that say whether the text can be read back, not only predicted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from .model import ARCModel
from .chunking import PoolingPlan
from .bleu import corpus_bleu
from .objectives import RowScores, target_scores
from .samples import Batch, collate, split_windows, text_sample
from .decoders import decoder_prefix

LN2 = math.log(2.0)


@dataclass
class InfoPoint:
    """One operating point (a pooling factor or an adaptive plan) on one evaluation set."""

    label: str
    pooling_factor: int | None  # None: adaptive (per-chunk factors)
    chunk_len: int
    adaptive: bool
    samples: int
    context_tokens: int  # decoder tokens of the original contexts
    vectors: int
    rate_vectors_per_token: float
    bytes_per_token: float  # fp16 storage of the vectors, per original decoder token
    bits_none_per_token: float
    bits_given_vectors_per_token: float
    bits_recovered_per_token: float
    bits_per_vector: float
    info_retained: float
    recon_acc: float
    loss_none: float
    loss_full: float
    loss_compressed: float
    gap_closed: float
    cont_acc: float
    em_at_k: float
    em_k: int
    factor_counts: dict[str, int]  # chunks per pooling factor
    # Free-running reconstruction of the first ``greedy_recon_samples`` windows (0: not measured).
    greedy_recon_samples: int = 0
    greedy_recon_exact: float | None = None
    greedy_recon_bleu4: float | None = None
    greedy_recon_token_match: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GreedyReconstruction:
    """How well the decoder writes contexts back out, running free (see the module docstring)."""

    samples: int
    exact_match: float  # share of contexts reproduced token for token
    bleu4: float  # corpus BLEU-4 over decoder token ids
    token_match: float  # share of positions whose token is the context's (no realignment)


def reconstruction_scores(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> GreedyReconstruction:
    """Exact match, BLEU-4 and position-wise token match of greedy reconstructions."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"{len(hypotheses)} reconstructions for {len(references)} contexts")
    exact = sum(list(h) == list(r) for h, r in zip(hypotheses, references))
    same = sum(a == b for h, r in zip(hypotheses, references) for a, b in zip(h, r))
    return GreedyReconstruction(len(references), exact / len(references), corpus_bleu(hypotheses, references).bleu,
                                same / max(sum(len(r) for r in references), 1))


@contextlib.contextmanager
def chunk_len_override(model: ARCModel, chunk_len: int | None) -> Iterator[None]:
    """Temporarily compress with another chunk length (quality-vs-chunk curves)."""
    cfg = model.encoder.config
    old = cfg.chunk_len
    if chunk_len is not None:
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
        cfg.chunk_len = chunk_len
    try:
        yield
    finally:
        cfg.chunk_len = old


def eval_batches(
    texts: Sequence[str],
    model: ARCModel,
    decoder_name: str,
    decoder_tokenizer,
    context_tokens: int,
    target_tokens: int,
    max_samples: int,
    batch_size: int,
) -> list[Batch]:
    """(context, continuation) windows from raw texts, in order, as batches for one decoder."""
    if model.tokenizer is None:
        raise ValueError("the checkpoint has no encoder tokenizer")
    same = model.tokenizer.get_vocab() == decoder_tokenizer.get_vocab()
    samples = []
    for text in texts:
        for ctx, cont in split_windows(text, decoder_tokenizer, context_tokens, target_tokens):
            samples.append(text_sample(ctx, cont, model.tokenizer, decoder_tokenizer, same))
            if len(samples) >= max_samples:
                break
        if len(samples) >= max_samples:
            break
    # The pretraining layout: BOS before a window only when the decoder's policy is "always"
    # (windows continue their documents, as in the reference; Gemma 3 needs its BOS first).
    prefix = decoder_prefix(model.projector(decoder_name).config.bos, decoder_tokenizer.bos_token_id, "continuation")
    return [collate(samples[i : i + batch_size], decoder_name, "continuation", prefix, index=i // batch_size)
            for i in range(0, len(samples), batch_size)]


class InfoEvaluator:
    """Scores one model + decoder on fixed batches; the no-/full-context baselines are computed once."""

    def __init__(self, model: ARCModel, decoder: PreTrainedModel, batches: Sequence[Batch], em_k: int = 4,
                 autocast_dtype: torch.dtype | None = None) -> None:
        if not batches:
            raise ValueError("no evaluation batches (is the data too short for one context + continuation?)")
        self.model, self.decoder, self.batches, self.em_k = model, decoder, list(batches), em_k
        self.autocast_dtype = autocast_dtype
        self._baseline: dict[str, RowScores] | None = None
        self.last_rows: dict[str, RowScores] = {}

    def _autocast(self):
        device = next(self.decoder.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def _scores(self, batch: Batch, context: str, targets: str) -> RowScores:
        with self._autocast():
            inputs = self.model.decoder_inputs(self.decoder, batch, context, targets, comparable=True)  # type: ignore[arg-type]
            return target_scores(self.decoder, inputs, self.em_k)

    @staticmethod
    def _merge(scores: list[RowScores]) -> RowScores:
        return RowScores(*([x for s in scores for x in getattr(s, f.name)] for f in dataclasses.fields(RowScores)))

    def baseline(self) -> dict[str, RowScores]:
        """Recon NLL with no context (H(x)), continuation with no / full-text context."""
        if self._baseline is None:
            self._baseline = {
                "recon_none": self._merge([self._scores(b, "none", "reconstruction") for b in self.batches]),
                "cont_none": self._merge([self._scores(b, "none", "continuation") for b in self.batches]),
                "cont_full": self._merge([self._scores(b, "full", "continuation") for b in self.batches]),
            }
        return self._baseline

    def all_encoder_ids(self) -> list[list[int]]:
        return [ids for b in self.batches for ids in b.encoder_ids]

    @torch.no_grad()
    def greedy_reconstruction(self, samples: int, pooling_factors: int | PoolingPlan | None = None,
                              chunk_len: int | None = None, pad_token_id: int | None = None) -> GreedyReconstruction:
        """Greedy reconstruction of the first ``samples`` windows: [prefix][vectors][<Rec>] -> exactly as
        many tokens as each context has (EOS suppressed), scored against the context's decoder tokens.
        ``pooling_factors``: as in ``point`` (a plan covers ALL samples, in order)."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        hyps: list[list[int]] = []
        refs: list[list[int]] = []
        offset = 0
        emb = self.decoder.get_input_embeddings()
        with chunk_len_override(self.model, chunk_len):
            for batch in self.batches:
                k = min(len(batch), samples - len(refs))
                if k <= 0:
                    break
                plan = pooling_factors
                if plan is not None and not isinstance(plan, int):
                    plan = list(plan[offset : offset + k])
                offset += len(batch)
                with self._autocast():
                    ctx = self.model.compress(batch.encoder_ids[:k], batch.decoder, plan)
                    inputs = self.model.build_decoder_inputs(emb, ctx, batch.prompt_ids[:k], None, "reconstruction",
                                                             batch.prefix_ids[:k], "left")
                    n = max(len(c) for c in batch.context_ids[:k])
                    out = self.decoder.generate(inputs_embeds=inputs.inputs_embeds,
                                                attention_mask=inputs.attention_mask, max_new_tokens=n,
                                                min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id)
                refs += [list(c) for c in batch.context_ids[:k]]
                hyps += [row[: len(ref)] for row, ref in zip(out[:, -n:].tolist(), refs[-k:])]
        return reconstruction_scores(hyps, refs)

    @torch.no_grad()
    def point(self, pooling_factors: int | PoolingPlan | None = None, chunk_len: int | None = None,
              label: str = "", greedy_samples: int = 0, pad_token_id: int | None = None) -> InfoPoint:
        """Score one operating point. ``pooling_factors``: one int, or a plan for ALL samples in order.
        ``greedy_samples`` > 0 adds greedy reconstruction of that many windows (``pad_token_id``: the
        decoder tokenizer's, for generation)."""
        base = self.baseline()
        n_samples = sum(len(b) for b in self.batches)
        plan = pooling_factors
        if plan is not None and not isinstance(plan, int) and len(plan) != n_samples:
            raise ValueError(f"the pooling plan has {len(plan)} entries for {n_samples} samples")
        recon, cont, vectors = [], [], 0
        counts: dict[str, int] = {}
        offset = 0
        with chunk_len_override(self.model, chunk_len):
            for batch in self.batches:
                part = plan if plan is None or isinstance(plan, int) else list(plan[offset : offset + len(batch)])
                offset += len(batch)
                cfg = self.model.encoder.config
                per_chunk = self.model.chunk_pooling(batch.encoder_ids, cfg.pooling_factor if part is None else part)
                for ids, pfs in zip(batch.encoder_ids, per_chunk):
                    vectors += sum(cfg.compressed_len(len(c), pf) for c, pf in zip(self.model.chunk(ids), pfs))
                    for pf in pfs:
                        counts[str(pf)] = counts.get(str(pf), 0) + 1
                scored = dataclasses.replace(batch, pooling_factors=per_chunk)
                recon.append(self._scores(scored, "compressed", "reconstruction"))
                cont.append(self._scores(scored, "compressed", "continuation"))
            chunk = self.model.encoder.config.chunk_len
        r, c = self._merge(recon), self._merge(cont)
        self.last_rows = {"recon": r, "cont": c}  # per-row scores of this point (paired comparisons)
        # Per original context token. The bits are summed over every context token but each
        # window's first, which nothing precedes without context (comparable scoring), so they
        # count that token as recovering nothing: a slight underestimate, never an overestimate.
        ctx_tokens = sum(len(x) for b in self.batches for x in b.context_ids)
        h0, h1 = sum(base["recon_none"].nll) / LN2, sum(r.nll) / LN2
        cont_tokens = sum(c.tokens)
        loss_none = sum(base["cont_none"].nll) / cont_tokens
        loss_full = sum(base["cont_full"].nll) / cont_tokens
        loss_comp = sum(c.nll) / cont_tokens
        gap = loss_none - loss_full
        width = self.model.projector(self.batches[0].decoder).config.output_dim
        fixed = isinstance(plan, int) or plan is None
        pf_value = (plan if isinstance(plan, int) else self.model.encoder.config.pooling_factor) if fixed else None
        point = InfoPoint(
            label=label or (f"pf{pf_value}" if fixed else "adaptive"),
            pooling_factor=pf_value, chunk_len=chunk, adaptive=not fixed, samples=n_samples,
            context_tokens=ctx_tokens, vectors=vectors,
            rate_vectors_per_token=vectors / ctx_tokens,
            bytes_per_token=vectors * width * 2 / ctx_tokens,
            bits_none_per_token=h0 / ctx_tokens,
            bits_given_vectors_per_token=h1 / ctx_tokens,
            bits_recovered_per_token=(h0 - h1) / ctx_tokens,
            bits_per_vector=(h0 - h1) / max(vectors, 1),
            info_retained=(h0 - h1) / h0 if h0 > 0 else float("nan"),
            recon_acc=sum(r.correct) / max(sum(r.tokens), 1),
            loss_none=loss_none, loss_full=loss_full, loss_compressed=loss_comp,
            gap_closed=(loss_none - loss_comp) / gap if gap > 0 else float("nan"),
            cont_acc=sum(c.correct) / max(cont_tokens, 1),
            em_at_k=sum(c.prefix_exact) / max(len(c.prefix_exact), 1), em_k=self.em_k,
            factor_counts=dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        )
        if greedy_samples > 0:
            g = self.greedy_reconstruction(greedy_samples, plan, chunk_len, pad_token_id)
            point.greedy_recon_samples, point.greedy_recon_exact = g.samples, g.exact_match
            point.greedy_recon_bleu4, point.greedy_recon_token_match = g.bleu4, g.token_match
        return point


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    if n != len(ys) or n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    return pearson(_ranks(xs), _ranks(ys))
