"""Atomic file writes and verified safetensors loads, shared by checkpoints and caches.

Every write goes to a temporary file in the target's directory, is flushed and fsynced,
then renamed over the target: a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import is_int

if TYPE_CHECKING:  # torch and safetensors load only where tensors are written or read
    import torch

PathLike = str | os.PathLike
_SHA256 = re.compile(r"[0-9a-f]{64}")


def umask() -> int:
    """The process umask, read without changing it where /proc allows (it is process-wide)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: PathLike, prefix: str) -> Path:
    """A new hidden directory in ``parent`` with the permissions ``mkdir`` would give it.

    ``tempfile.mkdtemp`` creates 0700 directories whatever the umask; a checkpoint renamed
    into place from one would be unreadable to the group that can read its siblings.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~umask())
    return tmp


def replace_directory(tmp: PathLike, directory: PathLike) -> Path:
    """Rename the complete directory ``tmp`` to ``directory``, replacing what is there.

    The old directory is renamed aside first and deleted only once the new one is in place,
    so a crash leaves one of the two whole (plus, at worst, a hidden ``.NAME.old-PID``).
    ``directory`` must not be a symlink (resolve it first: the link itself is not a directory).
    """
    tmp, directory = Path(tmp), Path(directory)
    if directory.is_symlink():
        raise ValueError(f"{directory} is a symlink; resolve it before replacing the directory")
    if not directory.exists():
        tmp.rename(directory)
        return directory
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    directory.rename(old)
    tmp.rename(directory)
    try:
        shutil.rmtree(old)
    except OSError as err:  # the new directory is in place; only the leftover could not go
        warnings.warn(f"{directory} was replaced, but its previous version {old} could not be removed ({err})",
                      stacklevel=2)
    return directory


class DirectoryLock:
    """An exclusive lock on a directory: ``fcntl.flock`` on ``directory/name``, taken at once or refused.

    The kernel releases it when the process dies, so a killed holder never blocks the next one;
    the file records the holder's pid for the error message and is removed on `release`, as is
    the directory when this lock created it and nothing else was written into it. flock locks
    belong to an open file, so two holders in one process (threads) exclude each other too.
    ``busy`` formats the refusal: ``{directory}``, ``{path}`` (the lock file) and ``{pid}``.
    """

    def __init__(self, directory: PathLike, name: str, busy: str) -> None:
        self.directory, self.path, self.busy = Path(directory), Path(directory) / name, busy
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> DirectoryLock:
        import fcntl

        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"{self.directory} exists and is not a directory")
        self.created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise FileExistsError(self.busy.format(directory=self.directory, path=self.path, pid=holder)) from None
            try:  # the holder before us may have removed the file we opened: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise FileExistsError(f"{self.directory}: could not take the lock {self.path}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (and a directory the lock created that is still empty); unlock."""
        if self.fd is None:
            return
        try:
            same = os.fstat(self.fd).st_ino == os.stat(self.path).st_ino
        except OSError:  # the directory (or the file) was removed meanwhile
            same = False
        if same:
            self.path.unlink(missing_ok=True)
        try:
            if self.created and self.directory.is_dir() and not any(self.directory.iterdir()):
                self.directory.rmdir()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> Path:
        self.acquire()
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_apart(output: PathLike, flag: str, inputs: Mapping[str, PathLike | None], both_ways: bool = False) -> None:
    """``output`` is none of ``inputs`` ({what: path}) and lies inside none of them (with ``both_ways``,
    holds none either); symlinks are followed. A ValueError names both paths: an output written
    over an input (a corpus, a checkpoint's weights, a curve) would destroy it."""
    out = Path(output).resolve()
    for what, given in inputs.items():
        if not given:
            continue
        src = Path(given).resolve()
        inside = src in out.parents
        if out == src or inside or (both_ways and out in src.parents):
            how = "is" if out == src else "is inside" if inside else "holds"
            raise ValueError(f"{flag} {output}: {how} the {what} {given}; writing there would destroy an input of "
                             "this command. Choose another path")


def read_consistently(directory: PathLike, load: Callable[[], Any], attempts: int = 5) -> Any:
    """``load()`` of files in ``directory``, retried while another process replaces the directory.

    Writers replace a whole directory by renames (`replace_directory`), so a reader that
    meets a missing or mismatching file while the directory's identity changed under it read
    two versions; it reads again. Errors with an unchanged directory are real and raised.
    """
    directory = Path(directory)

    def identity() -> tuple[int, int] | None:
        try:
            st = directory.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    for attempt in range(attempts):
        before = identity()
        try:
            return load()
        except (ValueError, OSError):
            if identity() == before:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise ValueError(f"{directory}: it was being rewritten by another process during {attempts} attempts to "
                     "read it; try again when the writer has finished")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename (mode: the existing file's,
    else what the umask allows, as for any new file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = path.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from err
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _naming(err, path) from err
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming the file that was being written (a full disk said "[Errno 28]" and no path)."""
    if err.errno is None or err.filename is not None and Path(err.filename) != path and \
            not Path(err.filename).name.startswith(f".{path.name}."):
        return err  # already names what failed (e.g. a parent that is a file)
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


def looks_like_hub_id(name: str) -> bool:
    """``org/model`` (or ``model``): no path syntax, so it can only mean a Hugging Face hub id."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


def check_model_dir(path: str, what: str, allow_hub_id: bool = False) -> Path | str:
    """The local Hugging Face model directory ``path`` (its config.json parsed and type-checked).

    A path that does not exist is an error saying so, before any loader turns it into a hub
    download attempt ("Repo id must be in the form ..."). ``allow_hub_id``: a name that can
    only be a hub id is returned as is, unless ``HF_HUB_OFFLINE`` is set.
    """
    from .config import check_hf_config

    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what}: no path given")
    local = Path(path).expanduser()
    if not local.exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        if allow_hub_id and looks_like_hub_id(path) and not offline:
            return path
        hint = " (HF_HUB_OFFLINE is set, so hub ids are not downloaded)" if allow_hub_id and offline else ""
        raise FileNotFoundError(f"{what}: {path} does not exist{hint}")
    config = local / "config.json"
    if not local.is_dir() or not config.is_file():
        raise FileNotFoundError(f"{what}: {path} is not a model directory (no config.json)")
    check_hf_config(read_json_file(config), str(config))
    return local


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if format_version is not None and not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if format_version is not None and data.get("format_version") != format_version:
        raise ValueError(f"{path}: format_version {data.get('format_version')} is not {format_version}")
    return data


def atomic_save_tensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write a safetensors file atomically; return its sha256. Equal inputs give equal bytes."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, dict(metadata or {}))
    blob = canonical_safetensors(blob)
    atomic_write_bytes(path, blob)
    return hashlib.sha256(blob).hexdigest()


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys sorted.

    safetensors keeps metadata in a hash map and writes its keys in a random order, so two
    saves of the same tensors differed byte-wise (and so did their sha256, which identifies
    checkpoints and caches). Tensor entries and data are kept exactly; only the header's
    metadata order changes (the header is re-padded to 8 bytes, as safetensors pads it).
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n], object_pairs_hook=dict)
    meta = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(directory: PathLike, files: Mapping[str, Mapping[str, Any]], hash: bool = True) -> list[str]:
    """Every ``{relative path: {"bytes", "sha256"}}`` entry against the disk; the problems found
    (``hash=False``: sizes only)."""
    directory = Path(directory)
    problems = []
    for rel, entry in sorted(files.items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif hash and sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: checksum mismatch (corrupt, truncated or altered)")
    return problems


def check_file_table(files: object, where: str) -> None:
    """``{"relative/path": {"sha256": 64 hex digits, "bytes": int >= 0}}`` (checkpoint and cache manifests)."""
    if not isinstance(files, dict):
        raise ValueError(f"{where}: 'files' must be a mapping of relative paths, got {type(files).__name__}")
    for rel, entry in files.items():
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{where}: file entry {rel!r} is not a relative path inside the directory")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.fullmatch(entry["sha256"]):
            raise ValueError(f"{where}: files[{rel!r}] needs a 'sha256' of 64 hex digits")
        size = entry.get("bytes")
        if not is_int(size, 0):
            raise ValueError(f"{where}: files[{rel!r}] needs 'bytes', an integer >= 0 (got {size!r})")


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
