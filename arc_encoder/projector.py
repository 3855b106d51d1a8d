"""Per-decoder projector: maps pooled encoder states into one decoder's embedding space.

It also owns that decoder's learned special-token embeddings (continuation / reconstruction
markers). They live here, not in the decoder's vocabulary, so the decoder stays frozen and
unmodified, and adapting to a new decoder trains exactly this module.
"""

from __future__ import annotations

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
            nn.Linear(config.input_dim, config.hidden_dim),
            _ACTIVATIONS[config.activation](),
            nn.Linear(config.hidden_dim, config.output_dim),
        )
        # [num_special, decoder_dim]; rows ordered as config.special_tokens.
        self.special_tokens = nn.Parameter(
            torch.randn(len(config.special_tokens), config.output_dim) * 0.02
        )

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """[..., input_dim] -> [..., output_dim] in the decoder's embedding space."""
        return self.net(encoder_states)

    def special_embedding(self, name: str) -> torch.Tensor:
        """The [output_dim] embedding of special token ``name``."""
        try:
            index = self.config.special_tokens.index(name)
        except ValueError:
            raise ValueError(
                f"projector has no special token {name!r}; it has {list(self.config.special_tokens)}"
            ) from None
        return self.special_tokens[index]

    @torch.no_grad()
    def match_decoder_embeddings(self, embedding_weight: torch.Tensor) -> None:
        """Initialise special tokens at the scale of the decoder's real token embeddings.

        A marker far off the decoder's embedding norm would be an outlier input at step 0.
        """
        std = embedding_weight.float().std().item()
        mean = embedding_weight.float().mean(0).to(self.special_tokens.device)
        self.special_tokens.copy_(
            mean + torch.randn_like(self.special_tokens, dtype=torch.float32) * std
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
