"""A training run's directory while it trains: its lock, its log, what a stop leaves, atomic checkpoints.

* Lock: global rank 0 holds ``runs/<name>/.run.lock`` (`storage.DirectoryLock`, as cache builds
  do) from the moment it checks the directory until the run ends, so two launches of one run
  never write into the same directory (a second one is refused, naming the holder's pid).
* Log: ``runs/<name>/log.txt`` gets every line the run prints (launch, status, validation,
  summary or the reason it stopped), each flushed and fsynced as it is written, so whatever
  ends the run, what it measured survives.
* Stops: SIGTERM and SIGINT become `RunStopped`, reported as one line naming the signal (not
  as whatever the signal broke first, e.g. a DataLoader worker killed by the same signal).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from arc_encoder.storage import DirectoryLock, atomic_write_bytes, atomic_write_text

RUN_LOCK = ".run.lock"
LOG_NAME = "log.txt"
_HELD: dict[Path, DirectoryLock] = {}


# ---------------------------------------------------------------------------- lock
def lock_run(run_dir: Path) -> bool:
    """Take the run's lock for this process (kept until `release_run`; taking it again is a no-op).
    Returns whether the directory was created by taking it. Another process holding it: refused."""
    key = Path(run_dir).resolve()
    if key in _HELD:
        return False
    lock = DirectoryLock(run_dir, RUN_LOCK, "{directory}: another launch is training this run now (it holds the lock "
                         "{path}, pid {pid}); wait for it to end, or choose another --run.name")
    lock.acquire()
    _HELD[key] = lock
    return lock.created


def is_held(run_dir: Path) -> bool:
    """Whether this process holds the run's lock."""
    return Path(run_dir).resolve() in _HELD


def release_run(run_dir: Path) -> None:
    """Release the run's lock (a directory the lock created and that is still empty goes with it)."""
    lock = _HELD.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def only_the_lock(run_dir: Path) -> bool:
    """True when the directory holds nothing but the run lock (a launch that wrote nothing yet)."""
    return all(p.name == RUN_LOCK for p in Path(run_dir).iterdir())


# ---------------------------------------------------------------------------- log
class RunLog:
    """Appends lines to runs/<name>/log.txt, each flushed and fsynced (a stop keeps every line)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, line: str) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a log line must never end a run (a full disk stops it elsewhere, named)
            pass


# ---------------------------------------------------------------------------- stops
class RunStopped(Exception):
    """The run received SIGTERM or SIGINT (a batch scheduler's time limit, kill, Ctrl-C)."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}{' ' + detail if detail else ''}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


_received: list[int] = []


def received_signal() -> int | None:
    """The first stop signal this process received inside `stop_on_signals` (None: none)."""
    return _received[0] if _received else None


def _quiet_killed_loader_workers() -> None:
    """After a stop signal, a DataLoader iterator collected later finds its worker killed by the same
    signal and reports it from ``__del__`` as an "Exception ignored" traceback: expected, not news.
    Only that report is silenced; every other unraisable exception still prints."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc) and _received:
            return
        previous(unraisable)

    sys.unraisablehook = hook


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `RunStopped` (once: a second signal while the run winds down is only
    recorded). Lightning adds its own SIGTERM handling on top during ``fit`` and keeps this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        first = not _received
        _received.append(signum)
        if first:
            _quiet_killed_loader_workers()
            raise RunStopped(signum)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _received.clear()
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- checkpoints and logs
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints (last.ckpt) written through temp file + fsync + rename.

    Lightning writes the file in place, so a full disk or a kill while saving left a truncated
    last.ckpt and no earlier one to resume from.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())


class TrimResumedLogs(L.Callback):
    """On a resumed run (rank 0), drop the rows of earlier CSV logs at or after the step training
    resumes from: the resumed run logs those steps again (they were trained after the checkpoint)."""

    def __init__(self, logs_dir: Path) -> None:
        self.logs_dir = logs_dir

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        current = Path(trainer.logger.log_dir).resolve()
        for path in sorted(self.logs_dir.rglob("metrics.csv")):
            if path.parent.resolve() != current:
                trim_log(path, trainer.global_step)


def trim_log(path: Path, step: int) -> None:
    """Rewrite the CSV log ``path`` without its rows of steps >= ``step`` (atomically)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "step" not in rows[0]:
        return
    col = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if not (len(r) > col and r[col].isdigit() and int(r[col]) >= step)]
    if len(kept) != len(rows):
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(kept)
        atomic_write_text(path, out.getvalue())
