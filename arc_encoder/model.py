"""ARCModel: the shared encoder plus one projector per frozen decoder.

Data flows one way, and ``forward`` reads top-down:

    text -> encoder tokenizer -> chunks -> ARCEncoder -> pooled states -> projector(decoder)
         -> the decoder's ``inputs_embeds`` (``arc_encoder.layout``) -> loss or generate

``compress`` turns texts into decoder-space vectors (``chunking`` cuts them, the encoder pools
each chunk, the decoder's projector maps the pooled states); ``decoder_inputs`` lays them out
with the projected marker after every document; ``forward`` scores the target tokens
(``arc_encoder.objectives``); ``generate`` answers from them. The decoder is never modified:
callers pass it in (``arc_encoder.decoders`` loads, identifies and freezes it).
``save_pretrained`` / ``from_pretrained`` write and read the directory layout of
``arc_encoder.checkpoint``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import checkpoint, decoders
from .chunking import PoolingPlan, TokenIds, chunk, per_chunk_factors
from .config import ARCConfig, EncoderConfig, ProjectorConfig, ProjectorOptions, SpecialToken
from .encoder import ARCEncoder, EncoderOutput
from .layout import CompressedContext, DecoderInputs, build_decoder_inputs
from .objectives import ContextMode, Targets, decoder_loss
from .projector import Projector
from .samples import Batch
from .storage import PathLike, read_consistently

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

    # ------------------------------------------------------------------ the data path
    def forward(self, batch: Batch, decoder: PreTrainedModel) -> torch.Tensor:
        """The training loss: compress the batch's contexts, lay them out before its prompts and targets,
        and score the targets (mean cross-entropy over the target tokens only)."""
        context = self.compress(batch.encoder_ids, batch.decoder, batch.pooling_factors)  # [b, m, decoder_dim]
        inputs = self.build_decoder_inputs(decoder.get_input_embeddings(), context, batch.prompt_ids,
                                           batch.target_ids, batch.marker, batch.prefix_ids)
        return decoder_loss(decoder, inputs)

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
        """Split one context into chunks of at most ``chunk_len`` tokens (`chunking.chunk`)."""
        return chunk(ids, self.encoder.config.chunk_len, self.encoder.config.max_chunks, index)

    def chunk_pooling(
        self, contexts: Sequence[TokenIds], pooling_factors: int | PoolingPlan | None
    ) -> list[list[int]] | None:
        """Resolve ``pooling_factors`` into one factor per chunk per context (None: the config's)."""
        if pooling_factors is None:
            return None
        counts = [len(self.chunk(ids, i)) for i, ids in enumerate(contexts)]
        return per_chunk_factors(counts, pooling_factors, self.encoder.config.chunk_len)

    def encode_ids(
        self, contexts: Sequence[TokenIds], pooling_factors: int | PoolingPlan | None = None
    ) -> tuple[EncoderOutput, list[int]]:
        """Encode every chunk of every context as ONE batch; also return each chunk's owner.

        ``pooling_factors``: None (the config's), one int, or per context an int or a list
        with one factor per chunk (see ``arc_encoder.adaptive``).
        """
        per_context = [self.chunk(ids, i) for i, ids in enumerate(contexts)]
        plan = None if pooling_factors is None else per_chunk_factors(
            [len(c) for c in per_context], pooling_factors, self.encoder.config.chunk_len)
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
        """`layout.build_decoder_inputs` with ``context.decoder``'s projected ``marker`` after every
        document (none when ``marker`` is None or that projector has no such special token)."""
        projector = self.projector(context.decoder)
        has_marker = marker is not None and marker in projector.config.special_tokens
        return build_decoder_inputs(decoder_embeddings, context, prompt_ids, target_ids,
                                    projector.special_embedding(marker) if has_marker else None,
                                    prefix_ids, padding_side, skip_first_target)

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
        empty = CompressedContext.empty(len(batch), emb.weight.shape[1], batch.decoder, emb.weight)
        prefix = batch.prefix_ids
        if context == "full":
            prefix = [p + c for p, c in zip(batch.prefix_ids, batch.context_ids)]
        return self.build_decoder_inputs(emb, empty, batch.prompt_ids, target_ids, None, prefix,
                                         skip_first_target=skip)

    # ------------------------------------------------------------------ generation
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
        bos = self.projector(decoder_name).config.bos
        prefix = [decoders.decoder_prefix(bos, decoder_tokenizer.bos_token_id, "qa") for _ in prompts]
        inputs = self.build_decoder_inputs(
            decoder.get_input_embeddings(), context, prompt_ids, None, marker, prefix, "left"
        )
        decoders.check_generation_length(decoder, inputs.inputs_embeds.shape[1], max_new_tokens)
        pad = decoder_tokenizer.pad_token_id
        if pad is None:
            pad = decoder_tokenizer.eos_token_id
        generate_kwargs.setdefault("eos_token_id", decoders.stop_token_ids(decoder_tokenizer))
        out = decoder.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **generate_kwargs,
        )
        return decoder_tokenizer.batch_decode(out, skip_special_tokens=True)

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
        ``tokenizer`` (the decoder's) resolves ``bos="auto"`` (`decoders.resolve_bos`).
        """
        if name in self.projectors:
            raise ValueError(f"a projector named {name!r} already exists")
        chosen = dataclasses.replace((options or ProjectorOptions()).options(), **option_values)
        chosen.bos = decoders.resolve_bos(chosen.bos, tokenizer)
        cfg = ProjectorConfig(
            **dataclasses.asdict(chosen),
            input_dim=self.encoder.hidden_size,
            output_dim=decoder.config.hidden_size,
            decoder=decoders.absolute_if_local(decoder_path or getattr(decoder.config, "_name_or_path", "")),
            decoder_vocab_size=decoder.get_input_embeddings().weight.shape[0],
            decoder_sha256=decoders.decoder_identity(decoder),
        )
        self.config.projectors[name] = cfg
        self.config.__post_init__()  # validates the name
        projector = Projector(cfg)
        projector.match_decoder_embeddings(decoder.get_input_embeddings().weight)
        param = next(self.encoder.parameters())
        self.projectors[name] = projector = projector.to(device=param.device)
        if cfg.init == "match_decoder":
            generator = torch.Generator().manual_seed(0)  # one seeded stream: the tokens, then the decoder's
            projector.match_decoder_scale(self._probe_states(generator), decoder.get_input_embeddings(), generator)
        return projector

    @torch.no_grad()
    def _probe_states(self, generator: torch.Generator, rows: int = 4) -> torch.Tensor:
        """Encoder states [rows, m, enc] of random tokens (eval mode): what a new projector's scale is
        matched on (`Projector.match_decoder_scale`), no data needed."""
        param = next(self.encoder.parameters())
        vocab = self.encoder.backbone.get_input_embeddings().weight.shape[0]
        n = min(64, self.encoder.config.chunk_len)
        ids = torch.randint(0, vocab, (rows, n), generator=generator).to(param.device)
        was_training = self.encoder.training
        self.encoder.eval()
        states = self.encoder(ids).hidden_states  # [rows, m, enc]
        self.encoder.train(was_training)
        return states

    def projector(self, name: str) -> Projector:
        if name not in self.projectors:
            known = sorted(self.projectors.keys())
            raise ValueError(f"unknown decoder {name!r}; this model has projectors for {known}")
        return self.projectors[name]

    def check_decoder(self, name: str, decoder: PreTrainedModel, allow_other_decoder: bool = False) -> None:
        """Refuse a decoder that projector ``name`` was not trained for (`decoders.check_decoder`)."""
        decoders.check_decoder(name, self.projector(name).config, decoder, allow_other_decoder)

    def set_pooling_factor(self, pooling_factor: int) -> None:
        """Compress at ``pooling_factor`` from now on, recorded in the config (a save keeps it).

        The pooled block runs at any factor: e.g. fine-tune an encoder pretrained at x8 at x4
        (the paper's ARC4). A mixed-pooling encoder accepts only one of its trained factors.
        """
        cfg = dataclasses.replace(self.config.encoder, pooling_factor=pooling_factor)  # validated
        self.config.encoder = self.encoder.config = cfg

    # ------------------------------------------------------------------ decoders on disk
    def load_decoder(
        self,
        name: str,
        path: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        allow_other_decoder: bool = False,
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
        """Projector ``name``'s frozen decoder (from ``path``, else where the checkpoint records it:
        `decoders.resolve_decoder_path`), its tokenizer and the path used; refused when it does not
        match the projector (`check_decoder`)."""
        path = decoders.resolve_decoder_path(name, self.projector(name).config, self.checkpoint_dir, path)
        if device is None:
            device = next(self.encoder.parameters()).device
        decoder, tokenizer = decoders.load_frozen_decoder(path, device, dtype, what=f"decoder {name!r}")
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


def _encoder_from_delta(directory: Path, manifest: dict, config: ARCConfig, backbone_config, dtype: torch.dtype,
                        verify: bool, base_model: str | None) -> ARCEncoder:
    """The base model's encoder with the checkpoint's trained tensors applied (identity checked)."""
    from .gguf import resolve_base_model

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
