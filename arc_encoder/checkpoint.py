"""The checkpoint directory: file layout, manifest, and verified reads and atomic writes of its files.

Layout of a checkpoint directory (see checkpoints/README.md):

    arc_config.json              ARCConfig: encoder + every projector's config
    manifest.json                format version, dtype, sha256 and size of every file below
    encoder/config.json          the truncated HF backbone config (no base model needed to load)
    encoder/model.safetensors    encoder weights
    encoder/tokenizer*.json ...  the encoder's tokenizer
    projectors/<name>.safetensors  one small file per decoder (adding a decoder adds one file)

A whole checkpoint is written into a temporary sibling directory and renamed into place;
adding a projector rewrites only its file and the two JSON files, each atomically.
``ARCModel.save_pretrained`` / ``from_pretrained`` / ``save_projector`` call these functions;
this module knows files and tensors, never the model classes (no import cycle).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import CONFIG_NAME, FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, ARCConfig
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
ENCODER_DIR = "encoder"
ENCODER_WEIGHTS = "encoder/model.safetensors"


def projector_file(name: str) -> str:
    return f"projectors/{name}.safetensors"


def write_manifest(directory: Path, dtype: torch.dtype) -> None:
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and not path.name.startswith("."):
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    atomic_write_json(
        directory / MANIFEST_NAME,
        {"format_version": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."), "files": files},
    )


def _projector_meta(name: str) -> dict[str, str]:
    return {"format": "pt", "kind": "projector", "decoder": name}


def save_checkpoint(
    directory: PathLike,
    config: ARCConfig,
    backbone_config,
    encoder_state: Mapping[str, torch.Tensor],
    projector_states: Mapping[str, Mapping[str, torch.Tensor]],
    tokenizer,
    dtype: torch.dtype,
    overwrite: bool = False,
) -> Path:
    """Write a whole checkpoint to ``directory`` atomically (temp dir + rename)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        atomic_write_json(tmp / CONFIG_NAME, config.to_dict())
        backbone_config.save_pretrained(tmp / ENCODER_DIR)
        atomic_save_tensors(tmp / ENCODER_WEIGHTS, encoder_state, {"format": "pt", "kind": "encoder"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / ENCODER_DIR)
        for name, state in projector_states.items():
            atomic_save_tensors(tmp / projector_file(name), state, _projector_meta(name))
        write_manifest(tmp, dtype)
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


def save_projector_file(
    directory: PathLike,
    config: ARCConfig,
    name: str,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
) -> Path:
    """Add or replace one decoder's projector in an existing checkpoint directory.

    The encoder in ``directory`` must be the one ``config`` describes; only the projector
    file, arc_config.json and manifest.json are rewritten.
    """
    directory = Path(directory)
    on_disk = read_config(directory)
    if on_disk.encoder != config.encoder:
        raise ValueError(f"{directory}: its encoder config differs from this model's; refusing to mix")
    atomic_save_tensors(directory / projector_file(name), state, _projector_meta(name))
    on_disk.projectors[name] = config.projectors[name]
    atomic_write_json(directory / CONFIG_NAME, on_disk.to_dict())
    write_manifest(directory, dtype)
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


def read_backbone_config(directory: PathLike):
    """The truncated HF backbone config saved beside the encoder weights."""
    from transformers import AutoConfig

    path = Path(directory) / ENCODER_DIR
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'}: cannot read backbone config ({err})") from err


def read_tokenizer(directory: PathLike):
    """The encoder's tokenizer, or None when the checkpoint has none."""
    from transformers import AutoTokenizer

    path = Path(directory) / ENCODER_DIR
    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None


def load_checked_state(
    directory: PathLike, manifest: dict, rel: str, expected: Mapping[str, torch.Tensor], verify: bool = True
) -> dict[str, torch.Tensor]:
    """File ``rel``'s tensors, checked against the manifest (sha256 when ``verify``) and ``expected``'s
    names, shapes and dtypes; errors name the file."""
    directory = Path(directory)
    if rel not in manifest["files"]:
        raise ValueError(f"{directory / rel}: not listed in {MANIFEST_NAME}; the checkpoint is incomplete")
    state = load_tensors(directory / rel, manifest["files"][rel]["sha256"] if verify else None)
    check_state_dict(directory / rel, state, expected)
    return state
