"""Per-decoder projector: maps pooled encoder states into one decoder's embedding space.

It also owns that decoder's learned special tokens (continuation / reconstruction markers).
They live here, not in the decoder's vocabulary, so the decoder stays frozen and unmodified,
and adapting to a new decoder trains exactly this module.

As in the reference (``EmbProjector`` type "mlp", ``rec_tok``/``cont_tok`` in
``enhanced_transformer.py``): ``Linear(enc, hidden, bias=False) -> Linear(hidden, dec,
bias=False)``, no activation, and one ENCODER-space vector per special token, initialised
to ones, that goes through the same two layers as the compressed states. Tensors:

    net.0.weight     [hidden_dim, input_dim]
    net.2.weight     [output_dim, hidden_dim]
    special_tokens   [len(special_tokens), input_dim]   rows in ProjectorConfig.special_tokens order

Format-1 projectors (CHANGELOG.md) add ``net.0.bias`` and ``net.2.bias`` and store
``special_tokens`` as [n, output_dim] decoder-space vectors used as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import ProjectorConfig

_ACTIVATIONS = {"none": nn.Identity, "gelu": nn.GELU, "silu": nn.SiLU}


class Projector(nn.Module):
    """MLP encoder_dim -> hidden_dim -> decoder_dim, plus special-token embeddings."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden_dim, bias=config.bias),
            _ACTIVATIONS[config.activation](),
            nn.Linear(config.hidden_dim, config.output_dim, bias=config.bias),
        )
        count, width = len(config.special_tokens), config.special_token_dim
        if config.special_token_space == "encoder":
            init = torch.ones(count, width)  # reference: torch.ones_like(rec_tok / cont_tok)
        else:
            init = torch.randn(count, width) * 0.02  # rescaled by match_decoder_embeddings
        self.special_tokens = nn.Parameter(init)  # [num_special, special_token_dim]

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """[..., input_dim] -> [..., output_dim] in the decoder's embedding space."""
        return self.net(encoder_states)

    def special_index(self, name: str) -> int:
        """Row of special token ``name`` in ``special_tokens``; ValueError naming the ones it has."""
        try:
            return self.config.special_tokens.index(name)
        except ValueError:
            raise ValueError(
                f"projector has no special token {name!r}; it has {list(self.config.special_tokens)}"
            ) from None

    def special_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """[len(names), output_dim]: the decoder-space embeddings of ``names`` (repeats allowed).

        Encoder-space tokens go through the projector, exactly as the reference appends them to
        the compressed sequence before its bridge module; a per-vector MLP makes "project,
        then insert" identical to "insert, then project".
        """
        if isinstance(names, str):
            raise ValueError("names must be a list of special-token names, not one string")
        index = torch.tensor([self.special_index(n) for n in names], dtype=torch.long,
                             device=self.special_tokens.device)
        raw = self.special_tokens.index_select(0, index)  # [len(names), special_token_dim]
        return self.net(raw) if self.config.special_token_space == "encoder" else raw

    def special_embedding(self, name: str) -> torch.Tensor:
        """The [output_dim] decoder-space embedding of special token ``name``."""
        return self.special_embeddings([name])[0]

    @torch.no_grad()
    def match_decoder_embeddings(self, embedding_weight: torch.Tensor) -> None:
        """Initialise decoder-space special tokens at the scale of the decoder's real token embeddings.

        A marker far off the decoder's embedding norm would be an outlier input at step 0.
        Encoder-space tokens (the default) keep the reference's ones init: the projector
        sets their scale, so they are left unchanged here.
        """
        if self.config.special_token_space == "encoder":
            return
        std = embedding_weight.float().std().item()
        mean = embedding_weight.float().mean(0).to(self.special_tokens.device)
        self.special_tokens.copy_(
            mean + torch.randn_like(self.special_tokens, dtype=torch.float32) * std
        )

    @torch.no_grad()
    def match_decoder_scale(self, encoder_states: torch.Tensor, decoder_embeddings: nn.Embedding,
                            generator: torch.Generator | None = None) -> float:
        """Rescale the output layer so that projected ``encoder_states`` [..., input_dim] have the median
        norm of the decoder's input embeddings (of 1,024 random tokens drawn with ``generator``, default
        seeded 0); returns the factor.

        The embeddings are taken as the decoder's embedding module returns them, so a decoder that
        scales them (Gemma: by sqrt(hidden)) is matched at the scale its blocks read.
        """
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        projected = self(encoder_states.reshape(-1, encoder_states.shape[-1]).to(self.net[0].weight.dtype))
        weight = decoder_embeddings.weight
        dec_ids = torch.randint(0, weight.shape[0], (1024,), generator=generator).to(weight.device)
        target = decoder_embeddings(dec_ids).float().norm(dim=-1).median()
        current = projected.float().norm(dim=-1).median()
        factor = float(target / current.clamp(min=1e-12))
        self.net[-1].weight.mul_(factor)
        if self.net[-1].bias is not None:
            self.net[-1].bias.mul_(factor)
        return factor

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
