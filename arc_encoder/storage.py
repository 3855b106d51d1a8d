"""Atomic file writes and verified safetensors loads, shared by checkpoints and caches.

Every write goes to a temporary file in the target's directory, is flushed and fsynced,
then renamed over the target: a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors load only where tensors are written or read
    import torch

PathLike = str | os.PathLike


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_figure(fig: Any, path: PathLike, dpi: int = 110) -> None:
    """Render a matplotlib figure to PNG in memory, close it, then write the file atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json_file(path: PathLike, format_version: int | None = None) -> Any:
    """Parse a JSON file; bad JSON or another ``format_version`` is a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if format_version is not None and data.get("format_version") != format_version:
        raise ValueError(f"{path}: format_version {data.get('format_version')} is not {format_version}")
    return data


def atomic_save_tensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write a safetensors file atomically; return its sha256."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, dict(metadata or {}))
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(directory: PathLike, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every ``{relative path: {"bytes", "sha256"}}`` entry against the disk; the problems found."""
    directory = Path(directory)
    problems = []
    for rel, entry in sorted(files.items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: checksum mismatch (corrupt, truncated or altered)")
    return problems


def load_tensors(path: PathLike, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or altered file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file is missing")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise ValueError(
                f"{path}: checksum mismatch (sha256 {actual[:12]}..., expected "
                f"{expected_sha256[:12]}...): the file is corrupt, truncated or was replaced"
            )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def check_state_dict(
    where: PathLike,
    loaded: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    dtype_check: Callable[[torch.dtype, torch.dtype], bool] | None = None,
) -> None:
    """Names, shapes and dtypes must match exactly; errors name the file and the tensor."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensor names do not match the config (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    for name, ref in expected.items():
        got = loaded[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tuple(got.shape)}, config expects {tuple(ref.shape)}"
            )
        ok = dtype_check(got.dtype, ref.dtype) if dtype_check else got.dtype == ref.dtype
        if not ok:
            raise ValueError(f"{where}: tensor {name!r} has dtype {got.dtype}, expected {ref.dtype}")
