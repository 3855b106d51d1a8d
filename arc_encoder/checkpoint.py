"""save_pretrained / from_pretrained for ARCModel, in safetensors beside JSON configs.

Layout of a checkpoint directory (see checkpoints/README.md):

    arc_config.json              ARCConfig: encoder + every projector's config
    manifest.json                format version, dtype, sha256 and size of every file below
    encoder/config.json          the truncated HF backbone config (no base model needed to load)
    encoder/model.safetensors    encoder weights
    encoder/tokenizer*.json ...  the encoder's tokenizer
    projectors/<name>.safetensors  one small file per decoder (adding a decoder adds one file)

A whole checkpoint is written into a temporary sibling directory and renamed into place;
adding a projector rewrites only its file and the two JSON files, each atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import CONFIG_NAME, FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, ARCConfig
from .encoder import ARCEncoder
from .model import ARCModel
from .projector import Projector
from .storage import (
    PathLike,
    atomic_save_tensors,
    atomic_write_json,
    check_files,
    check_state_dict,
    load_tensors,
    read_json_file,
    sha256_file,
)

MANIFEST_NAME = "manifest.json"
ENCODER_WEIGHTS = "encoder/model.safetensors"


def projector_file(name: str) -> str:
    return f"projectors/{name}.safetensors"


def _model_dtype(model: ARCModel) -> torch.dtype:
    return next(model.encoder.parameters()).dtype


def _write_manifest(directory: Path, dtype: torch.dtype) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and not path.name.startswith("."):
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    atomic_write_json(
        directory / MANIFEST_NAME,
        {"format_version": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."), "files": files},
    )


def save_pretrained(model: ARCModel, directory: PathLike, overwrite: bool = False) -> Path:
    """Write the whole model to ``directory`` atomically (temp dir + rename)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        atomic_write_json(tmp / CONFIG_NAME, model.config.to_dict())
        model.encoder.backbone.config.save_pretrained(tmp / "encoder")
        meta = {"format": "pt", "kind": "encoder"}
        atomic_save_tensors(tmp / ENCODER_WEIGHTS, model.encoder.state_dict(), meta)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp / "encoder")
        for name, projector in model.projectors.items():
            meta = {"format": "pt", "kind": "projector", "decoder": name}
            atomic_save_tensors(tmp / projector_file(name), projector.state_dict(), meta)
        _write_manifest(tmp, _model_dtype(model))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_projector(model: ARCModel, name: str, directory: PathLike) -> Path:
    """Add or replace one decoder's projector in an existing checkpoint directory.

    The encoder in ``directory`` must be the one ``model`` uses (same config); only the
    projector file, arc_config.json and manifest.json are rewritten.
    """
    directory = Path(directory)
    on_disk = read_config(directory)
    if on_disk.encoder != model.config.encoder:
        raise ValueError(f"{directory}: its encoder config differs from this model's; refusing to mix")
    projector = model.projector(name)
    meta = {"format": "pt", "kind": "projector", "decoder": name}
    atomic_save_tensors(directory / projector_file(name), projector.state_dict(), meta)
    on_disk.projectors[name] = projector.config
    atomic_write_json(directory / CONFIG_NAME, on_disk.to_dict())
    _write_manifest(directory, _model_dtype(model))
    return directory / projector_file(name)


def read_config(directory: PathLike) -> ARCConfig:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an arc-encoder checkpoint: {CONFIG_NAME} is missing")
    return ARCConfig.from_file(path)


def read_manifest(directory: PathLike) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest is missing")
    data = read_json_file(path)
    if data.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:  # older formats: arc_config.json maps them
        raise ValueError(f"{path}: format_version {data.get('format_version')!r} is not one of {list(SUPPORTED_FORMAT_VERSIONS)}")
    return data


def verify_checkpoint(directory: PathLike) -> list[str]:
    """Check every file against the manifest; return the problems found (empty = good)."""
    return check_files(directory, read_manifest(directory)["files"])


def _expected_sha(manifest: dict, directory: Path, rel: str, verify: bool) -> str | None:
    if rel not in manifest["files"]:
        raise ValueError(f"{directory / rel}: not listed in {MANIFEST_NAME}; the checkpoint is incomplete")
    return manifest["files"][rel]["sha256"] if verify else None


def load_pretrained(
    directory: PathLike,
    decoders: list[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> ARCModel:
    """Load a checkpoint; ``decoders`` picks which projectors to load (default: all).

    With ``verify`` every file's sha256 is checked against the manifest, and every tensor's
    name, shape and dtype against the config, so a truncated, altered or mismatched file
    fails with an error naming it.
    """
    from transformers import AutoConfig, AutoTokenizer

    directory = Path(directory)
    config = read_config(directory)
    manifest = read_manifest(directory)
    saved_dtype = getattr(torch, manifest["dtype"])
    wanted = list(config.projectors) if decoders is None else list(decoders)
    for name in wanted:
        if name not in config.projectors:
            raise ValueError(
                f"{directory}: no projector for decoder {name!r}; it has {sorted(config.projectors)}"
            )
    config.projectors = {n: config.projectors[n] for n in wanted}

    try:
        backbone_config = AutoConfig.from_pretrained(directory / "encoder")
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory / 'encoder' / 'config.json'}: cannot read backbone config ({err})") from err
    encoder = ARCEncoder.from_backbone_config(config.encoder, backbone_config).to(saved_dtype)
    sd = load_tensors(directory / ENCODER_WEIGHTS, _expected_sha(manifest, directory, ENCODER_WEIGHTS, verify))
    check_state_dict(directory / ENCODER_WEIGHTS, sd, encoder.state_dict())
    encoder.load_state_dict(sd)

    tokenizer = None
    if (directory / "encoder" / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory / "encoder")
    model = ARCModel(config, encoder, tokenizer)
    for name in wanted:
        rel = projector_file(name)
        projector: Projector = model.projectors[name].to(saved_dtype)
        sd = load_tensors(directory / rel, _expected_sha(manifest, directory, rel, verify))
        check_state_dict(directory / rel, sd, projector.state_dict())
        projector.load_state_dict(sd)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model
