"""arc-encoder: learned context compression for frozen LLMs (ARC-Encoder, arXiv 2510.20535)."""

from .config import ARCConfig, EncoderConfig, ProjectorConfig, ProjectorOptions
from .encoder import ARCEncoder, EncoderOutput
from .model import ARCModel, CompressedContext, freeze_decoder
from .objectives import DecoderInputs
from .projector import Projector

__version__ = "0.1.0"

__all__ = [
    "ARCConfig",
    "ARCEncoder",
    "ARCModel",
    "CompressedContext",
    "DecoderInputs",
    "EncoderConfig",
    "EncoderOutput",
    "Projector",
    "ProjectorConfig",
    "ProjectorOptions",
    "freeze_decoder",
]
