"""What a training run prints: status lines off a terminal, validation lines, and the values in
them (exact formulas of what was counted; no timing is asserted)."""

import io
import math
from types import SimpleNamespace

import pytest
import torch

from arc_encoder.samples import Batch
from arc_encoder_train.progress import TrainProgress, batch_tokens, clock, status_line, validation_line


def test_status_line_fields():
    line = status_line(step=250, max_steps=1000, loss=2.8531, tokens_per_s=1234.4, elapsed=20.0, steps_done=200)
    # ETA: 200 steps took 20 s -> 750 more steps take 75 s.
    assert line == "step 250/1000 (25%) | loss 2.853 | 1,234 context tokens/s | elapsed 0:00:20 | ETA 0:01:15"
    assert status_line(0, 10, None, 0.0, 0.0, 0).endswith("loss ? | 0 context tokens/s | elapsed 0:00:00 | ETA ?")
    assert clock(3 * 3600 + 61.4) == "3:01:01" and clock(math.inf) == "?"


def test_validation_line_uses_the_summary_words():
    m = {"loss_none": 3.0, "loss_compressed": 2.881, "loss_full": 2.72, "recon_acc": 0.4}
    assert validation_line(7, m) == ("validation at step 7: continuation loss: none 3.00 / compressed 2.88 / "
                                     "full 2.72, recon acc 0.40")
    assert validation_line(7, {}) == ""


def _trainer(step, max_steps=4, world=2, loss=2.5, rank0=True):
    """A stand-in for Lightning's Trainer with what the callback reads; loss = this step's."""
    return SimpleNamespace(global_step=step, max_steps=max_steps, world_size=world, is_global_zero=rank0,
                           sanity_checking=False,
                           callback_metrics={"train/loss": torch.tensor(loss), "val/loss_none": torch.tensor(3.0),
                                             "val/loss_compressed": torch.tensor(2.9),
                                             "val/loss_full": torch.tensor(2.7),
                                             "val/dec/loss_none": torch.tensor(9.0)})


def _batch(lengths):
    return Batch("dec", "continuation", [[1] * n for n in lengths], [[1]], [[]], [[2]], [[]])


@pytest.mark.parametrize("every_s,expected_steps", [(0.0, [1, 2, 3, 4]), (3600.0, [1, 4])])
def test_off_a_terminal_a_status_line_every_interval_first_and_last(every_s, expected_steps):
    out = io.StringIO()  # not a terminal
    cb = TrainProgress("train/loss", every_s=every_s, stream=out)
    assert cb.tty is False
    cb.on_train_start(_trainer(0), None)
    for step in range(1, 5):
        cb.on_train_batch_end(_trainer(step, loss=float(step)), None, None, _batch([5, 7]), step - 1)
    cb.on_validation_end(_trainer(4), None)
    cb.on_train_end(_trainer(4), None)
    lines = out.getvalue().splitlines()
    assert [int(x.split()[1].split("/")[0]) for x in lines[:-1]] == expected_steps
    assert all(x.startswith("step ") and "/4 (" in x for x in lines[:-1])
    # The loss shown: the mean of the steps since the previous line.
    losses = [float(x.split("| loss ")[1].split()[0]) for x in lines[:-1]]
    assert losses == ([1.0, 2.0, 3.0, 4.0] if every_s == 0 else [1.0, 3.0])
    assert lines[-1] == "validation at step 4: continuation loss: none 3.00 / compressed 2.90 / full 2.70"
    assert cb._tokens == 4 * (5 + 7) * 2  # every step's context tokens, times the 2 ranks


def test_other_ranks_print_nothing():
    out = io.StringIO()
    cb = TrainProgress("train/loss", every_s=0.0, stream=out)
    cb.on_train_start(_trainer(0, rank0=False), None)
    cb.on_train_batch_end(_trainer(1, rank0=False), None, None, _batch([3]), 0)
    cb.on_validation_end(_trainer(1, rank0=False), None)
    assert out.getvalue() == ""


def test_on_a_terminal_one_bar_over_the_steps():
    out = io.StringIO()
    cb = TrainProgress("train/loss", stream=out, tty=True)
    cb.on_train_start(_trainer(1), None)  # a resumed run: the bar starts at its step
    assert cb.bar.total == 4 and cb.bar.n == 1
    cb.on_train_batch_end(_trainer(3), None, None, _batch([4]), 0)
    assert cb.bar.n == 3
    cb.on_train_end(_trainer(3), None)
    assert cb.bar is None and "loss 2.500" in out.getvalue()


def test_batch_tokens():
    assert batch_tokens(_batch([5, 7])) == 12
    assert batch_tokens(torch.zeros(3, 129)) == 3 * 129  # an `lm` block
