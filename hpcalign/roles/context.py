"""What every role needs: config, run dir, placement, control plane and process groups."""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from hpcalign.comm.control import Control
from hpcalign.config.schema import Config
from hpcalign.plan.placement import Placement


@dataclass
class RoleContext:
    cfg: Config
    run_dir: str
    placement: Placement
    control: Control
    rank: int
    sync_group: dist.ProcessGroup | None  # trainer 0 + all generators
    trainer_group: dist.ProcessGroup | None  # all trainers
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # roles/device.py
    stop_signal: list[int] = field(default_factory=lambda: STOP_SIGNALS)  # newest last

    @property
    def host(self) -> str:
        return socket.gethostname()



# Signals received by this process, newest last (module level: installed before anything
# else in the rank entry, so a signal during start-up is not lost).
STOP_SIGNALS: list[int] = []


def install_stop_handlers() -> None:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (requeue/preemption)
    only set a flag: the trainers act on it at the next step boundary; generators wait
    for the trainers' "stop"."""

    def _handler(signum: int, _frame: object) -> None:
        STOP_SIGNALS.append(signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _handler)


def shard_seed(seed: int, step: int, generator_rank: int) -> int:
    """Sampling seed of one (step, generator): independent streams, same on every restart."""
    return int(np.random.SeedSequence([seed, step, generator_rank]).generate_state(1, np.uint64)[0]
               % (2**63 - 1))


def restart_count() -> int:
    """How often Slurm requeued this job (0 outside Slurm)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
