"""What a training run prints while it trains, and what it keeps quiet.

On a terminal: one progress bar over optimizer steps (loss, context tokens/s). Anywhere else
(a log file, a pipe, a batch job), or with the bar turned off, a bar shows nothing until it
ends, so instead one status line every ``every_s`` seconds: step, loss, tokens/s, elapsed time
and ETA. The loss shown is the mean training loss of the steps since the last line (one step's
loss is noisy). Always a line after every validation, flushed at once. With a run log
(runs/<name>/log.txt) every status and validation line also goes there as it happens, bar or
not, so a run stopped at any point keeps what it measured. Only global rank 0 prints.

Lightning's own bar (``Epoch 0/-2`` for step-based runs), its info lines (accelerator table,
a logger tip, "`Trainer.fit` stopped") and a deprecation warning raised inside Lightning are
not for our users: ``quiet_lightning`` turns them off where they come from.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from typing import IO, Any

from lightning.pytorch.callbacks import Callback


def quiet_lightning() -> None:
    """Lightning's INFO lines off (its warnings stay), and a deprecation inside Lightning itself
    (``LeafSpec`` in ``lightning/pytorch/utilities/_pytree.py``) filtered by its exact text."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def clock(seconds: float) -> str:
    """1234.5 -> '0:20:34'."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def status_line(step: int, max_steps: int, loss: float | None, tokens_per_s: float, elapsed: float,
                steps_done: int) -> str:
    """One self-contained line; ETA from this launch's pace (``steps_done`` steps in ``elapsed`` s)."""
    eta = elapsed / steps_done * (max_steps - step) if steps_done > 0 else math.inf
    pct = 100.0 * step / max_steps if max_steps > 0 else 0.0
    loss_text = f"{loss:.3f}" if loss is not None and math.isfinite(loss) else "?"
    return (f"step {step}/{max_steps} ({pct:.0f}%) | loss {loss_text} | {tokens_per_s:,.0f} context tokens/s | "
            f"elapsed {clock(elapsed)} | ETA {clock(eta)}")


def validation_line(step: int, metrics: dict[str, float]) -> str:
    """The validation metrics a user reads (the same words as the final summary line)."""
    text = format_validation(metrics)
    return f"validation at step {step}: {text}" if text else ""


def format_validation(metrics: dict[str, float]) -> str:
    """'continuation loss: none 3.00 / compressed 2.88 / full 2.72, recon acc 0.40' (what is there)."""
    parts = []
    if "loss_compressed" in metrics:
        parts.append(f"continuation loss: none {metrics['loss_none']:.2f} / compressed "
                     f"{metrics['loss_compressed']:.2f} / full {metrics['loss_full']:.2f}")
    if "recon_acc" in metrics:
        parts.append(f"recon acc {metrics['recon_acc']:.2f}")
    return ", ".join(parts)


def batch_tokens(batch: Any) -> int:
    """Context tokens in one rank's batch: the encoder's input (an ARC ``Batch``), or every
    token of an LM block (a tensor)."""
    if hasattr(batch, "encoder_ids"):
        return sum(len(ids) for ids in batch.encoder_ids)
    return int(batch.numel()) if hasattr(batch, "numel") else 0


class TrainProgress(Callback):
    """A bar on a terminal, else a status line every ``every_s`` seconds (and at the last step)."""

    def __init__(self, loss_key: str, every_s: float = 30.0, stream: IO[str] | None = None,
                 tty: bool | None = None, bar: bool = True, log: Any = None) -> None:
        self.loss_key, self.every_s = loss_key, every_s
        self.stream = stream or sys.stderr
        self.tty = (self.stream.isatty() if tty is None else tty) and bar
        self.run_log = log  # has .write(line): runs/<name>/log.txt (arc_encoder_train.runs.RunLog)
        self.bar = None
        self._start = self._last = self._last_status = 0.0
        self._first_step = 0
        self._tokens = 0
        self._losses: dict[str, list] = {}  # what shows a loss ("bar", "status") -> [sum, steps]

    def _add_loss(self, trainer) -> None:
        value = trainer.callback_metrics.get(self.loss_key)
        if value is not None:  # summed on its device: no sync per step
            value = value.detach() if hasattr(value, "detach") else value
            for key in ("bar", "status"):
                total = self._losses.setdefault(key, [None, 0])
                total[0] = value if total[0] is None else total[0] + value
                total[1] += 1

    def _loss(self, key: str = "status") -> float | None:
        """Mean loss of the steps since ``key`` last showed one (one device sync, only when shown)."""
        total = self._losses.pop(key, None)
        if not total or not total[1]:
            return None
        return float(total[0]) / total[1]

    def _print(self, line: str, log: bool = True) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
        if log and self.run_log is not None:
            self.run_log.write(line)

    def on_train_start(self, trainer, module) -> None:
        self._start = time.monotonic()
        self._last = self._last_status = -math.inf  # the first step prints: the run is alive
        self._first_step = trainer.global_step  # a resumed run starts later
        self._tokens = 0
        if trainer.is_global_zero and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step", file=self.stream,
                            dynamic_ncols=True, desc="training")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._tokens += batch_tokens(batch) * trainer.world_size  # every rank trains an equal slice
        if not trainer.is_global_zero:
            return
        self._add_loss(trainer)
        now, step = time.monotonic(), trainer.global_step
        elapsed = now - self._start
        rate = self._tokens / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if now - self._last >= 1.0:  # the postfix reads the loss: at most once a second
                loss = self._loss("bar")
                self.bar.set_postfix_str(f"loss {'?' if loss is None else f'{loss:.3f}'}, {rate:,.0f} context tokens/s")
                self._last = now
        if (self.bar is None or self.run_log is not None) and \
                (now - self._last_status >= self.every_s or step >= trainer.max_steps):
            line = status_line(step, trainer.max_steps, self._loss("status"), rate, elapsed, step - self._first_step)
            if self.bar is None:
                self._print(line)
            else:  # the bar shows it on the terminal; the log gets the line
                self.run_log.write(line)
            self._last_status = now

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and "/" not in k.removeprefix("val/")}
        line = validation_line(trainer.global_step, metrics)
        if line:
            self._print(line)

    def on_train_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer, module, exception) -> None:
        self.on_train_end(trainer, module)  # the bar's line ends: the error starts a line of its own
