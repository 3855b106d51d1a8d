"""The checkpoint directory: file layout, manifest, and verified reads and atomic writes of its files.

Layout of a checkpoint directory (see checkpoints/README.md):

    arc_config.json              ARCConfig: encoder + every projector's config
    manifest.json                format version, dtype, sha256 and size of every file below
    encoder/config.json          the truncated HF backbone config (no base model needed to load)
    encoder/model.safetensors    encoder weights, or encoder/delta.safetensors: only the trained tensors of
                                 a "lora" encoder (adapters + last blocks), applied to its base model at load
    encoder/tokenizer*.json ...  the encoder's tokenizer
    projectors/<name>.safetensors  one small file per decoder (adding a decoder adds one file)

Every write builds the complete new checkpoint in a temporary sibling directory and renames
it into place (adding a projector hard-links the unchanged files into it, so only the new
projector and the two JSON files are written); a reader that races a writer re-reads
(``storage.read_consistently``). Loads check every file that decides the output against the
manifest: the configs and tokenizer files before parsing them, weights as they are read.
``ARCModel.save_pretrained`` / ``from_pretrained`` / ``save_projector`` call these functions;
this module knows files and tensors, never the model classes (no import cycle).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import get_args

import torch

from .config import CONFIG_NAME, FORMAT_VERSION, SUPPORTED_FORMAT_VERSIONS, ARCConfig, DtypeName, check_hf_config
from .storage import (
    PathLike,
    atomic_save_tensors,
    atomic_write_json,
    check_file_table,
    check_files,
    check_state_dict,
    load_tensors,
    make_temp_dir,
    read_json_file,
    replace_directory,
    sha256_file,
)

MANIFEST_NAME = "manifest.json"
ENCODER_DIR = "encoder"
ENCODER_WEIGHTS = "encoder/model.safetensors"
# An encoder trained with tuning "lora" stores only its trained tensors, applied to its base model.
ENCODER_DELTA = "encoder/delta.safetensors"
PROJECTOR_DIR = "projectors"


def encoder_weights_file(config: ARCConfig) -> str:
    """The encoder's weights file: the whole encoder, or the delta of a "lora" encoder."""
    return ENCODER_DELTA if config.encoder.tuning == "lora" else ENCODER_WEIGHTS


def projector_file(name: str) -> str:
    return f"{PROJECTOR_DIR}/{name}.safetensors"


def _files(directory: Path) -> list[str]:
    """Relative paths of every file that belongs to a checkpoint (hidden names are temporaries)."""
    out = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def write_manifest(directory: Path, dtype: torch.dtype) -> None:
    files = {rel: {"sha256": sha256_file(directory / rel), "bytes": (directory / rel).stat().st_size}
             for rel in _files(directory) if rel != MANIFEST_NAME}
    atomic_write_json(
        directory / MANIFEST_NAME,
        {"format_version": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."), "files": files},
    )


def _projector_meta(name: str) -> dict[str, str]:
    return {"format": "pt", "kind": "projector", "decoder": name}


def is_checkpoint_dir(directory: PathLike) -> bool:
    directory = Path(directory)
    return directory.is_dir() and ((directory / CONFIG_NAME).is_file() or (directory / MANIFEST_NAME).is_file())


def _writable_target(directory: PathLike, overwrite: bool) -> Path:
    """Where a checkpoint write goes: a symlink's target (the link keeps pointing at the new
    checkpoint); an existing directory only with ``overwrite`` and only if it is a checkpoint."""
    directory = Path(directory)
    if directory.is_symlink():
        directory = directory.resolve()
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
        if not is_checkpoint_dir(directory):
            raise FileExistsError(f"{directory} exists and is not an arc-encoder checkpoint (no {CONFIG_NAME} or "
                                  f"{MANIFEST_NAME}); refusing to replace it")
    return directory


def record_decoder_paths(config: ARCConfig, directory: Path) -> None:
    """Set each projector's ``decoder_relative``: its local decoder's path relative to ``directory``."""
    for proj in config.projectors.values():
        if proj.decoder and Path(proj.decoder).is_absolute() and Path(proj.decoder).is_dir():
            proj.decoder_relative = os.path.relpath(proj.decoder, directory.resolve())


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
    """Write a whole checkpoint to ``directory`` atomically (temp dir + rename).

    ``overwrite`` replaces an existing checkpoint, never another directory. A symlinked
    ``directory`` is written at its target. ``config``'s ``decoder_relative`` fields are set.
    """
    directory = _writable_target(directory, overwrite)
    record_decoder_paths(config, directory)
    tmp = make_temp_dir(directory.parent, f".{directory.name}.")
    try:
        atomic_write_json(tmp / CONFIG_NAME, config.to_dict())
        backbone_config.save_pretrained(tmp / ENCODER_DIR)
        kind = "encoder_delta" if config.encoder.tuning == "lora" else "encoder"
        atomic_save_tensors(tmp / encoder_weights_file(config), encoder_state, {"format": "pt", "kind": kind})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / ENCODER_DIR)
        for name, state in projector_states.items():
            atomic_save_tensors(tmp / projector_file(name), state, _projector_meta(name))
        write_manifest(tmp, dtype)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _link_files(source: Path, target: Path, rels: Iterable[str]) -> None:
    """Hard-link (or, across filesystems, copy) files of ``source`` into ``target``."""
    for rel in rels:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / rel, target / rel)
        except OSError:
            shutil.copy2(source / rel, target / rel)


def save_projector_file(
    directory: PathLike,
    config: ARCConfig,
    name: str,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    source: PathLike | None = None,
) -> Path:
    """Add or replace one decoder's projector in the checkpoint ``directory``.

    ``source`` (default: ``directory`` itself) is the checkpoint whose other files are kept;
    with another ``source``, ``directory`` becomes a copy of it plus this projector (and must
    not exist, or be a checkpoint). The encoder in ``source`` must be the one ``config``
    describes. The new directory is assembled beside the old one and renamed into place.
    """
    directory = _writable_target(directory, overwrite=True)
    source = Path(source).resolve() if source is not None else directory
    on_disk = read_config(source)
    if on_disk.encoder != config.encoder:
        raise ValueError(f"{source}: its encoder config differs from this model's; refusing to mix")
    on_disk.projectors[name] = config.projectors[name]
    record_decoder_paths(on_disk, directory)
    rewritten = {projector_file(name), CONFIG_NAME, MANIFEST_NAME}
    tmp = make_temp_dir(directory.parent, f".{directory.name}.")
    try:
        _link_files(source, tmp, [rel for rel in _files(source) if rel not in rewritten])
        atomic_save_tensors(tmp / projector_file(name), state, _projector_meta(name))
        atomic_write_json(tmp / CONFIG_NAME, on_disk.to_dict())
        write_manifest(tmp, dtype)
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory / projector_file(name)


def config_path(directory: PathLike) -> Path:
    """``directory``'s arc_config.json; a directory without one is not a checkpoint."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an arc-encoder checkpoint: {CONFIG_NAME} is missing")
    return path


def read_config(directory: PathLike) -> ARCConfig:
    return ARCConfig.from_file(config_path(directory))


def check_manifest(data: object, where: str) -> dict:
    """A manifest's structure: format version, dtype, and a sha256 + size per relative path."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:  # older: arc_config.json maps them
        raise ValueError(f"{where}: format_version {version!r} is not one of {list(SUPPORTED_FORMAT_VERSIONS)}")
    if data.get("dtype") not in get_args(DtypeName):
        raise ValueError(f"{where}: dtype {data.get('dtype')!r} is not one of {list(get_args(DtypeName))}")
    check_file_table(data.get("files"), where)
    return data


def read_manifest(directory: PathLike) -> dict:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest is missing")
    return check_manifest(read_json_file(path), str(path))


def _decides_output(rel: str) -> bool:
    """Files that change what a loaded model computes: configs, tokenizer, weights."""
    return rel == CONFIG_NAME or rel.startswith(f"{ENCODER_DIR}/") or (
        rel.startswith(f"{PROJECTOR_DIR}/") and rel.endswith(".safetensors"))


def unlisted_files(directory: PathLike, manifest: dict) -> list[str]:
    """Problems for files that decide the output but are not in the manifest (added afterwards)."""
    directory = Path(directory)
    return [f"{directory / rel}: not listed in {MANIFEST_NAME} (added after the checkpoint was written?)"
            for rel in _files(directory) if _decides_output(rel) and rel not in manifest["files"]]


def verify_checkpoint(directory: PathLike) -> list[str]:
    """Check every file against the manifest; return the problems found (empty = good)."""
    manifest = read_manifest(directory)
    return check_files(directory, manifest["files"]) + unlisted_files(directory, manifest)


def check_before_load(directory: PathLike, manifest: dict, verify: bool = True) -> None:
    """Before a load parses anything: arc_config.json and every encoder/ file except the weights
    match the manifest (sha256 when ``verify``, else sizes), and nothing unlisted was added.
    Weight files are hashed as they are read (`load_checked_state`)."""
    directory = Path(directory)
    for required in (CONFIG_NAME, "encoder/config.json"):
        if required not in manifest["files"]:
            raise ValueError(f"{directory / required}: not listed in {MANIFEST_NAME}; the checkpoint is incomplete")
    if ENCODER_WEIGHTS not in manifest["files"] and ENCODER_DELTA not in manifest["files"]:
        raise ValueError(f"{directory / ENCODER_WEIGHTS}: not listed in {MANIFEST_NAME} (nor a delta, "
                         f"{ENCODER_DELTA}); the checkpoint is incomplete")
    small = {rel: entry for rel, entry in manifest["files"].items()
             if _decides_output(rel) and not rel.endswith(".safetensors")}
    problems = check_files(directory, small, hash=verify) + unlisted_files(directory, manifest)
    if problems:
        raise ValueError("; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))


def read_backbone_config(directory: PathLike):
    """The truncated HF backbone config saved beside the encoder weights (types checked)."""
    from transformers import AutoConfig

    path = Path(directory) / ENCODER_DIR
    check_hf_config(read_json_file(path / "config.json"), str(path / "config.json"))
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'}: cannot read backbone config ({err})") from err


def read_tokenizer(directory: PathLike):
    """The encoder's tokenizer, or None when the checkpoint has none."""
    from transformers import AutoTokenizer

    path = Path(directory) / ENCODER_DIR
    if not (path / "tokenizer_config.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: cannot load the encoder tokenizer ({type(err).__name__}: {err})") from err


def load_checked_state(
    directory: PathLike, manifest: dict, rel: str, expected: Mapping[str, torch.Tensor], verify: bool = True
) -> dict[str, torch.Tensor]:
    """File ``rel``'s tensors, checked against the manifest (sha256 when ``verify``, else its size)
    and ``expected``'s names, shapes and dtypes; errors name the file."""
    directory = Path(directory)
    if rel not in manifest["files"]:
        raise ValueError(f"{directory / rel}: not listed in {MANIFEST_NAME}; the checkpoint is incomplete")
    entry = manifest["files"][rel]
    if not verify:
        problems = check_files(directory, {rel: entry}, hash=False)
        if problems:
            raise ValueError(problems[0])
    state = load_tensors(directory / rel, entry["sha256"] if verify else None)
    check_state_dict(directory / rel, state, expected)
    return state
