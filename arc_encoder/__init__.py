"""arc-encoder: learned context compression for frozen LLMs (ARC-Encoder, arXiv 2510.20535).

The names below load on first use (PEP 562), so that importing a torch-free part of the
package (the command line's parser, the planner) does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ARCConfig": "config",
    "EncoderConfig": "config",
    "ProjectorConfig": "config",
    "ProjectorOptions": "config",
    "ARCEncoder": "encoder",
    "EncoderOutput": "encoder",
    "ARCModel": "model",
    "CompressedContext": "layout",
    "freeze_decoder": "decoders",
    "DecoderInputs": "layout",
    "Projector": "projector",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .config import ARCConfig, EncoderConfig, ProjectorConfig, ProjectorOptions
    from .encoder import ARCEncoder, EncoderOutput
    from .decoders import freeze_decoder
    from .layout import CompressedContext, DecoderInputs
    from .model import ARCModel
    from .projector import Projector


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
