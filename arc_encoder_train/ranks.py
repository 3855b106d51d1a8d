"""Which process is global rank 0, read from the launchers' environment variables (no torch needed).

Launchers start ranks in two ways. Lightning's DDP launcher runs the user's command as global
rank 0 and re-executes it for every other local rank, with ``LOCAL_RANK`` (and ``NODE_RANK`` on
other nodes) set; torchrun (``RANK``, ``LOCAL_RANK``, ``GROUP_RANK``) and SLURM's srun
(``SLURM_PROCID``) start every rank themselves. Importing torch or Lightning is not needed to
tell, so the command line's error path stays light (``arc_encoder_train.distributed`` re-exports these).
"""

from __future__ import annotations

import os
import sys

# Set to a non-zero value in every process that is not global rank 0 (see the module docstring).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "GROUP_RANK", "NODE_RANK", "LOCAL_RANK")


def launched_as_rank_zero() -> bool:
    """False in every process that a launcher started as a rank other than global rank 0."""
    return all(os.environ.get(name, "").strip() in ("", "0") for name in RANK_VARIABLES)


def rank_prefix() -> str:
    """'[rank N] ' to start error messages with in a multi-process run ('' in a single process)."""
    torch = sys.modules.get("torch")  # no process group exists before torch is imported
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return f"[rank {torch.distributed.get_rank()}] " if world > 1 else ""
    launched = [f"{name}={os.environ[name]}" for name in RANK_VARIABLES
                if os.environ.get(name, "").strip() not in ("", "0")]
    return f"[{' '.join(launched)}] " if launched else ""
