"""A training run's directory: where it is, what a resume keeps, its lock, its log, what a stop leaves.

* Directories: a run writes ``runs/<name>/`` and exports ``checkpoints/<name>/``; a new run never
  reuses either (`run_dirs`), a resumed one keeps its recorded settings (`resume_changes`), and
  the resolved config is saved beside it (`save_config`, which ``--config`` takes back).
* Lock: global rank 0 holds ``runs/<name>/.run.lock`` (`storage.DirectoryLock`, as cache builds
  do) from the moment it checks the directory until the run ends, so two launches of one run
  never write into the same directory (a second one is refused, naming the holder's pid).
* Log: ``runs/<name>/log.txt`` gets every line the run prints (launch, status, validation,
  summary or the reason it stopped), each flushed and fsynced as it is written, so whatever
  ends the run, what it measured survives.
* Stops: SIGTERM and SIGINT become `RunStopped`, reported as one line naming the signal (not
  as whatever the signal broke first, e.g. a DataLoader worker killed by the same signal); after a
  failure or a stop, `after_failure` decides what stays.

Torch-free: the command line's error path and ``--help`` stay light.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import yaml

from arc_encoder.storage import DirectoryLock, atomic_write_text

from .config import JOB_SKIPS, RunConfig
from .ranks import launched_as_rank_zero

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


def one_line(err: BaseException) -> str:
    """An error as one line: library messages can span lines (tracebacks of loader workers)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # a path, never a bare errno
        return f"{err.filename}: {err.strerror}"
    text = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:  # re-raised from a worker: its last line is the error
        return lines[-1]
    return " ".join(lines)


# ---------------------------------------------------------------------------- directories and resume
# Settings a resumed run may change: how long and where it runs, how it logs, and how its global
# batch is split (data.batch_size per device x devices x nodes x accumulate_grad_batches: the
# global batch itself must stay, `global_batch_change`). Anything else (model, data, optimiser)
# would make the export claim settings it was not trained with.
RESUMABLE_KEYS = frozenset({
    "run.resume", "run.allow_config_changes", "trainer.max_steps", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.accelerator", "trainer.progress_bar", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "trainer.val_check_interval", "data.num_workers",
    "data.batch_size", "trainer.accumulate_grad_batches",
})


def _flat(data: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "d": [{"n": 2}]} -> {"a.b": 1, "d.#": 1, "d.0.n": 2} (lists of values stay whole)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out[f"{prefix}{key}.#"] = len(value)
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _latest_config(run_dir: Path) -> Path | None:
    """The config the run's last launch recorded: config.yaml or the newest config.resume-<time>.yaml."""
    resumes = sorted(run_dir.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.split("-")[-1] or 0))
    if resumes:
        return resumes[-1]
    return run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else None


def resume_changes(run_dir: Path, job: str, cfg) -> dict[str, list]:
    """{key: [recorded, now]} for every setting a resume changes beyond `RESUMABLE_KEYS` (keys the
    recorded config does not have are new options: their defaults apply)."""
    path = _latest_config(run_dir)
    if path is None:
        return {}
    try:
        recorded = _flat(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, AttributeError) as err:
        raise ValueError(f"{path}: cannot read the run's recorded config ({err})") from err
    now = _flat(config_dict(job, cfg))
    changes = {k: [recorded[k], v] for k, v in now.items()
               if k in recorded and k not in RESUMABLE_KEYS and recorded[k] != v}
    # With optim.total_steps 0 the one-cycle schedule spans trainer.max_steps: a resume with another
    # max_steps would leave the restored schedule's cycle (torch refuses to step past its end).
    key = "trainer.max_steps"
    if recorded.get("optim.total_steps", 1) == 0 and key in recorded and recorded[key] != now.get(key):
        changes[f"{key} (the one-cycle length while optim.total_steps is 0; to extend a run later, "
                "start it with optim.total_steps set)"] = [recorded[key], now.get(key)]
    return changes


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def run_dirs(run: RunConfig, job: str = "", cfg=None) -> tuple[Path, Path]:
    """runs/<name> and checkpoints/<name>, checked by global rank 0 only (the other ranks start
    after rank 0 created them), under the run's lock (`runs.lock_run`: another launch training
    this run is refused; rank 0 keeps the lock until the run ends, `fit`). A new run's
    directories must not exist (neither the run nor an export of that name is ever replaced); a
    resumed run keeps its recorded settings (`resume_changes`, unless run.allow_config_changes).
    A resumed run's last.ckpt must exist (checked by every rank: all of them read it)."""
    run_dir, export_dir = Path(run.runs_dir) / run.name, Path(run.checkpoints_dir) / run.name
    if _overlap(run_dir, export_dir):
        raise ValueError(f"the run directory {run_dir} and the export {export_dir} are the same directory or one "
                         "holds the other; use different run.runs_dir and run.checkpoints_dir")
    if run.resume and not (run_dir / "checkpoints" / "last.ckpt").exists():
        where = "" if launched_as_rank_zero() else " (the run directory must be on a filesystem every node shares)"
        hint = (f" (the run stopped before its first checkpoint; its logs are kept in {run_dir / LOG_NAME}): to "
                f"train again, remove {run_dir} or choose another --run.name") if (run_dir / LOG_NAME).is_file() else ""
        raise FileNotFoundError(f"--run.resume: {run_dir}/checkpoints/last.ckpt does not exist{where}{hint}")
    if not launched_as_rank_zero():
        return run_dir, export_dir
    held_before = is_held(run_dir)
    existed = run_dir.exists() or run_dir.is_symlink()
    lock_run(run_dir)  # another launch of this run holds it: refused, naming its pid
    try:
        if run.resume:
            changes = resume_changes(run_dir, job, cfg) if cfg is not None and not run.allow_config_changes else {}
            if changes:
                shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))
                raise ValueError(f"--run.resume: settings differ from the run's ({shown}); resume with the run's "
                                 "settings, or pass --run.allow_config_changes true to change them (recorded in "
                                 "launches.json)")
        else:
            if existed and not (held_before and only_the_lock(run_dir)):
                raise FileExistsError(_existing_run(run_dir, LOG_NAME))
            if export_dir.exists() or export_dir.is_symlink():
                raise FileExistsError(f"export {export_dir} exists; pass --run.resume true to continue that run "
                                      "or choose another --run.name")
    except BaseException:
        release_run(run_dir)
        raise
    return run_dir, export_dir


def _existing_run(run_dir: Path, log_name: str) -> str:
    """Why a new run cannot use ``run_dir``, and what to do instead."""
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return (f"run directory {run_dir} exists; pass --run.resume true to continue that run or choose another "
                "--run.name")
    log = run_dir / log_name
    logs = f"; its logs are kept in {log}" if log.is_file() else ""
    return (f"run directory {run_dir} exists and has no checkpoint to resume from (an earlier launch stopped before "
            f"saving one{logs}): to train again, remove {run_dir} or choose another --run.name")


@contextlib.contextmanager
def released_on_error(run_dir: Path):
    """A failure while a run is prepared releases its lock (and a run directory nothing was written to)."""
    try:
        yield
    except BaseException:
        if launched_as_rank_zero():
            release_run(run_dir)
        raise


def global_batch_change(run_dir: Path, cfg, processes: int) -> dict[str, list]:
    """A resume on another number of processes keeps the per-device batch, so the global batch
    (and the run's data order) would change: refused unless run.allow_config_changes."""
    path = run_dir / "launches.json"
    if not cfg.run.resume or not path.is_file():
        return {}
    launches = json.loads(path.read_text()).get("launches") or [{}]
    before = launches[-1].get("global_batch")
    now = cfg.data.batch_size * processes * cfg.trainer.accumulate_grad_batches
    if before is None or before == now:
        return {}
    if not cfg.run.allow_config_changes:
        raise ValueError(f"--run.resume: the global batch would change from {before} to {now} (data.batch_size x "
                         "devices x nodes x accumulate_grad_batches); keep it, or pass --run.allow_config_changes true")
    return {"global_batch": [before, now]}


def after_failure(run_dir: Path, export_dir: Path, resume: bool, step: int) -> str:
    """After a run failed or was stopped (rank 0): what stays, as a sentence for the user ('' if nothing).

    With a checkpoint the run is kept for --run.resume. A new run that trained no step measured
    nothing: both directories go (they did not exist when it started, `run_dirs`), so a retry
    starts clean. One that trained keeps its run directory with its logs and metrics (only an
    empty checkpoints/ folder goes) and any export its validations wrote.
    """
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return f"{run_dir} kept: it has a checkpoint; continue the run with --run.resume true"
    if resume:
        return ""
    if step == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(export_dir, ignore_errors=True)
        return ""
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    export = export_dir.exists()
    return (f"{run_dir} kept with its logs ({LOG_NAME}, logs/)" + (f" and {export_dir} with the export of its last "
            "validation" if export else "") + "; it cannot be resumed (no checkpoint yet): to train again, remove "
            + (f"{run_dir} and {export_dir}" if export else str(run_dir)) + " or choose another --run.name")


def save_config(run_dir: Path, job: str, cfg) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "config.yaml" if not (run_dir / "config.yaml").exists() else f"config.resume-{int(time.time())}.yaml"
    header = (f"# arc-encoder-train {job}: the resolved configuration (every key). To train it again:\n"
              f"#   arc-encoder-train {job} --config {run_dir / name} --run.name NEW_NAME\n")
    atomic_write_text(run_dir / name, header + yaml.safe_dump(config_dict(job, cfg), sort_keys=False))


def config_dict(job: str, cfg) -> dict:
    """The job's config as plain data without the keys it does not read (JOB_SKIPS): a file
    that `--config` takes back. Tuples (EncoderConfig.pooling_factors) become lists."""
    plain = json.loads(json.dumps(asdict(cfg)))
    for key in JOB_SKIPS.get(job, ()):
        group, _, name = key.rpartition(".")
        node = plain
        for part in filter(None, group.split(".")):
            node = node[part]
        node.pop(name, None)
    return plain
