"""Runs a plan of training / cache-build commands in 2 CPU processes (gloo); used by test_multigpu.py.

    python tests/multigpu_driver.py PLAN.json

The first command launches the ranks the way `arc-encoder-train ... --trainer.devices 2
--trainer.strategy ddp` does: Lightning's DDP launcher re-executes this script for local rank 1,
which then runs the same plan. Later commands reuse those two processes (the launcher's
environment variables are set by then), so the heavy imports happen once per rank for the
whole plan. Each command is the real entry point (`arc_encoder_train.cli.main` or
`arc-encoder-train cache-build`) with its argv, or a copy made by rank 0. A plan entry
may give rank 1 other argv (``argv_rank1``), make every rank's training crash just before
global batch N (``crash_at_batch``: an interrupted run), and accept a failure (``expect_code``).

After every command each rank rewrites OUT/rank<r>.json: exit code, stdout, seconds, and the
batches its training steps received (index, decoder, offset, encoder ids), and the CPU
seconds the rank has used so far. A failing command
ends the process with its exit code, as the command itself would.
"""

import contextlib
import io
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

from arc_encoder_train import cli
from arc_encoder_train.module import ARCTrainingModule

def copy_on_rank_zero(argv: list[str]) -> int:
    """Keep a copy of a run directory (e.g. a checkpoint that a resumed run will overwrite)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.copytree(argv[0], argv[1])
    return 0


ENTRIES = {"train": cli.main, "copy": copy_on_rank_zero}


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(plan["out"])
    seen: list[dict] = []
    step = ARCTrainingModule.training_step

    def recording_step(self, batch, batch_idx):
        if batch.index == crash_at:
            raise RuntimeError(f"simulated crash before global batch {batch.index}")
        seen.append({"index": batch.index, "decoder": batch.decoder, "offset": batch.meta["offset"],
                     "encoder_ids": batch.encoder_ids})
        return step(self, batch, batch_idx)

    ARCTrainingModule.training_step = recording_step
    results = []
    crash_at = None
    for job in plan["jobs"]:
        crash_at = job.get("crash_at_batch")
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", "0"))
        argv = job.get("argv_rank1", job["argv"]) if rank == 1 else job["argv"]
        seen.clear()
        start, stdout = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = ENTRIES[job["entry"]](list(argv))
        rank = dist.get_rank() if dist.is_initialized() else rank
        results.append({"name": job["name"], "code": code, "stdout": stdout.getvalue(),
                        "seconds": round(time.perf_counter() - start, 2), "batches": list(seen)})
        path = out / f"rank{rank}.json"
        usage = resource.getrusage(resource.RUSAGE_SELF)
        path.write_text(json.dumps({"rank": rank, "jobs": results, "cpu_seconds": usage.ru_utime + usage.ru_stime}))
        if code != job.get("expect_code", 0):
            return code or 1
    if dist.is_initialized():
        dist.barrier()  # rank 0 exits (and the test reads the results) only after rank 1 wrote its own
    return 0


if __name__ == "__main__":
    sys.exit(main())
