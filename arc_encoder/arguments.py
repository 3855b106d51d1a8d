"""The argument groups and argument checks that both command lines share (argparse, torch-free).

`arc-encoder` (``arc_encoder.cli``) and `arc-encoder-train` (``arc_encoder_train.cli``) take some
arguments the same way: the cache build's (`add_cache_build_arguments`, read back by
`cache_build_settings`: one group for `arc-encoder cache build` and `arc-encoder-train cache-build`),
the one `--adaptive` group, device and dtype choices, and output paths that never replace an input.
They live in the library, below both command lines, so that the training package never imports
``arc_encoder.cli``. Also the FAIL/OK report and small argparse types.

torch and the adaptive module are imported only inside the functions that need them: building a
parser (``arc-encoder --help``) stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from .cache.names import StorageDtype
from .config import DtypeName
from .corpus import CorpusFormat
from .storage import check_apart

if TYPE_CHECKING:
    from .adaptive import AdaptivePooling
    from .config import ARCConfig, EncoderConfig

DTYPE_CHOICES = sorted(get_args(DtypeName))
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available)"


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available, else cpu; any other name must be a device this machine has."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type {device.type!r} (cpu, cuda, mps)")
    return name


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_allow_other_decoder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-other-decoder", action="store_true",
                   help="use a decoder other than the one the projector was trained for (its embeddings differ "
                   "from the recorded identity); a warning says so")


def output_file(path: str, flag: str = "--output", inputs: Mapping[str, str | None] | None = None) -> str:
    """A file path to write: not empty, not an existing directory, in a directory that exists (none
    is created), and neither one of the command's ``inputs`` ({what: path}) nor inside one.

    An existing file is replaced, so an output that names an input (the corpus, a checkpoint's
    weights, a curve) would destroy it: refused before anything is read or written.
    """
    if not path or not path.strip():
        raise ValueError(f"{flag}: empty path")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; give a file name")
    parent = p.parent
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist (it is not created; make it first)"
        raise FileNotFoundError(f"{flag} {path}: the directory {parent} {state}")
    check_apart(path, flag, inputs or {})
    return path


def output_dir(path: str, flag: str = "--output", inputs: Mapping[str, str | None] | None = None) -> str:
    """A directory to create or fill: not empty, its parent exists, and it neither is, holds nor lies
    inside one of ``inputs`` (a checkpoint written over its own base model would delete it)."""
    if not path or not path.strip():
        raise ValueError(f"{flag}: empty path (give a directory to create, e.g. cache/)")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    parent = p.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the directory {parent} does not exist (it is not created; make it "
                                "first)")
    check_apart(path, flag, inputs or {}, both_ways=True)
    return path


def checkpoint_inputs(checkpoint: str, decoder: str | None = None, decoder_path: str | None = None,
                      config: ARCConfig | None = None) -> dict:
    """A command's model inputs ({what: path}) that no output may replace: the checkpoint and the
    decoder, given or recorded (`output_file`; ``config``: the checkpoint's, when already read)."""
    inputs = {"checkpoint": checkpoint, "decoder": decoder_path}
    if decoder:
        if config is None:
            from .checkpoint import read_config

            config = read_config(checkpoint)
        projector = config.projectors.get(decoder)
        if projector is not None and projector.decoder:
            inputs["decoder recorded in the checkpoint"] = projector.decoder
    return inputs


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """'2,4,8' -> [2, 4, 8] (an argparse type: integers >= 1)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def density_list(text: str) -> list[str]:
    """'zlib' or 'zlib,decoder_nll' -> the chunk scores named (an argparse type)."""
    from .adaptive import Density

    allowed = get_args(Density)
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected one or more of {list(allowed)} (comma-separated), got {text!r}")
    return values


def add_adaptive_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    """The one entropy-adaptive pooling group (compress, cache build, eval info, cache-build on GPUs)."""
    g = p.add_argument_group("entropy-adaptive pooling (needs a mixed-pooling encoder)")
    g.add_argument("--adaptive", nargs="?", const=["zlib"], default=None, type=density_list, metavar="DENSITY",
                   help="score each chunk (zlib: compressed size, free; decoder_nll: the frozen decoder's NLL) and "
                   "give dense chunks finer factors, at the total vectors of fixed pooling at --adaptive-target "
                   "(bare --adaptive: zlib)" + ("; several, comma-separated, score one plan each" if several else ""))
    g.add_argument("--adaptive-factors", type=int_list, default=None,
                   help="factors to choose from, comma-separated (default: the trained ones)")
    g.add_argument("--adaptive-target", type=float, default=None,
                   help="average pooling factor to match (default: the checkpoint's pooling_factor)")
    g.add_argument("--adaptive-strength", type=float, default=1.0,
                   help="vectors per chunk ~ tokens * density**strength (0: uniform; default 1)")


def adaptive_policies(args: argparse.Namespace, encoder: EncoderConfig) -> list[AdaptivePooling]:
    """One AdaptivePooling per density named by --adaptive (none without it); defaults from ``encoder``."""
    if not args.adaptive:
        return []
    from .adaptive import AdaptivePooling

    factors = tuple(args.adaptive_factors or encoder.trained_pooling_factors)
    if len(set(factors)) < 2:  # one factor: every chunk would get it, a silent fixed pooling
        trained = ", ".join(f"x{f}" for f in encoder.trained_pooling_factors)
        raise ValueError(f"--adaptive needs a mixed-pooling encoder (several trained factors to choose from), "
                         f"but this checkpoint was trained at {trained} only (see `arc-encoder info`); train one "
                         "with `arc-encoder-train pretrain --encoder.pooling_factors '[2,4,8]'`")
    target = args.adaptive_target or float(encoder.pooling_factor)
    return [AdaptivePooling(factors, target, density, args.adaptive_strength) for density in args.adaptive]


def adaptive_policy(args: argparse.Namespace, encoder: EncoderConfig) -> AdaptivePooling | None:
    """The one AdaptivePooling of a command that builds one plan (None without --adaptive)."""
    policies = adaptive_policies(args, encoder)
    if len(policies) > 1:
        raise ValueError(f"--adaptive {','.join(args.adaptive)}: this command takes one density")
    return policies[0] if policies else None


def add_cache_build_arguments(p: argparse.ArgumentParser) -> None:
    """The cache build's arguments: `arc-encoder cache build` (one process) and `arc-encoder-train
    cache-build` (Lightning, several GPUs) add this one group; `cache_build_settings` reads it back."""
    p.add_argument("checkpoint", help="arc-encoder checkpoint directory")
    p.add_argument("--decoder", required=True, help="projector name (see `arc-encoder info`)")
    p.add_argument("--corpus", required=True,
                   help="JSONL/JSON, parquet or .txt (fields id, text; .txt: one doc per line)")
    p.add_argument("--format", choices=get_args(CorpusFormat), default="auto",
                   help="corpus format (default: from the suffix)")
    p.add_argument("--output", required=True, help="cache directory to create")
    p.add_argument("--dtype", choices=get_args(StorageDtype), default="float16",
                   help="storage: float16/bfloat16/float32, or int8 with one absmax scale per vector")
    p.add_argument("--docs-per-shard", type=positive_int, default=256,
                   help="documents per shard file (the unit of resuming; default 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="documents compressed together")
    p.add_argument("--dedupe", action="store_true", help="keep the first of duplicate ids instead of failing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build in OUTPUT")
    add_adaptive_args(p)


def cache_build_settings(args: argparse.Namespace) -> dict:
    """The cache build that `add_cache_build_arguments`' arguments ask for, checked before anything loads:
    the output apart from every input, the checkpoint's config read once, the adaptive policy. The keys
    are ``arc_encoder.cache.build.build_cache``'s (and the Lightning build's) arguments."""
    from .checkpoint import read_config

    config = read_config(args.checkpoint)
    output_dir(args.output, "--output",
               {"--corpus file": args.corpus, **checkpoint_inputs(args.checkpoint, args.decoder, config=config)})
    return dict(checkpoint=args.checkpoint, decoder=args.decoder, corpus=args.corpus, output=args.output,
                dtype=args.dtype, docs_per_shard=args.docs_per_shard, batch_size=args.batch_size,
                dedupe=args.dedupe, corpus_format=args.format, resume=args.resume,
                adaptive=adaptive_policy(args, config.encoder), config=config)


def pyplot(flag: str = "--plot"):
    """matplotlib.pyplot on the Agg backend; a clear error when matplotlib is missing.

    Called before a command does its work, so a run never ends without the plot it was asked for.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError(f"{flag} needs matplotlib, which is not installed here (pip install matplotlib)") from err
    return plt


def read_text_file(path: str, flag: str) -> str:
    """A whole UTF-8 text file, gzip-compressed when its name ends in .gz."""
    import gzip
    import zlib

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p}: is a directory; give a text file")
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: no such file")
    data = p.read_bytes()
    gz = p.name.endswith(".gz")
    try:
        return (gzip.decompress(data) if gz else data).decode("utf-8")
    except EOFError:
        raise ValueError(f"{flag} {p}: the gzip file is truncated (it ends before its end-of-stream marker)") from None
    except (OSError, zlib.error, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {p}: not a UTF-8 text file{' (gzip)' if gz else ''} ({err})") from err


def report_problems(problems: list[str], ok_message: str) -> int:
    """Print one FAIL line per problem (or OK); exit code 1 when anything failed."""
    for p in problems:
        print(f"FAIL {p}")
    if not problems:
        print(f"OK {ok_message}")
    return 1 if problems else 0
