"""Placement: which world ranks hold which role, with which parallel degrees.

The MPI world is always `trainer.ranks` trainers first, then `generator.ranks` generators,
in local `mpiexec` and in the Slurm MPMD step alike; this module is the one place that
arithmetic lives. The result is written to `RUN_DIR/plan.json` for people and tools.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from hpcalign.config.schema import Config


@dataclass(frozen=True)
class RolePlacement:
    """One role's ranks and degrees. Plain torch backends: dp = ranks, tp = pp = 1."""

    role: str
    first_rank: int
    ranks: int
    tp: int
    pp: int
    dp: int
    threads: int

    def world_ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + self.ranks))


@dataclass(frozen=True)
class Placement:
    world_size: int
    trainer: RolePlacement
    generator: RolePlacement

    def role_of(self, world_rank: int) -> str:
        if not 0 <= world_rank < self.world_size:
            raise ValueError(f"rank {world_rank} outside the world of {self.world_size}")
        return "trainer" if world_rank < self.trainer.ranks else "generator"

    def describe_rank(self, world_rank: int) -> str:
        """'generator 1 (world rank 2)': how errors name a rank."""
        role = self.role_of(world_rank)
        first = self.trainer.first_rank if role == "trainer" else self.generator.first_rank
        return f"{role} {world_rank - first} (world rank {world_rank})"

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "trainer": asdict(self.trainer),
                "generator": asdict(self.generator)}


def trainer_degrees(backend: str, ranks: int, tp: int, pp: int) -> tuple[int, int, int]:
    """(tp, pp, dp) of the trainer ranks; ValueError naming the keys when they do not fit.

    megatron: ranks = tp x pp x dp; the torch engine is data parallel only (tp = pp = 1).
    """
    if backend != "megatron" and (tp, pp) != (1, 1):
        raise ValueError(f"trainer.tp={tp}, trainer.pp={pp}: model parallelism needs "
                         f"trainer.backend=megatron (trainer.backend={backend!r} is data "
                         "parallel only)")
    if ranks % (tp * pp):
        raise ValueError(f"trainer.ranks={ranks} must be a multiple of trainer.tp={tp} x "
                         f"trainer.pp={pp} = {tp * pp} (ranks = tp x pp x data parallel)")
    return tp, pp, ranks // (tp * pp)


def _auto_threads(requested: int, concurrent_ranks: int) -> int:
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, concurrent_ranks))


def compute_placement(cfg: Config) -> Placement:
    """Ranks and degrees of every role.

    With `max_staleness: 0` trainers and generators alternate (one waits while the other
    computes), so each role may use all cores; with overlap they share them.
    """
    t, g = cfg.trainer.ranks, cfg.generator.ranks
    concurrent = max(t, g) if cfg.sync.max_staleness == 0 else t + g
    tp, pp, dp = trainer_degrees(cfg.trainer.backend, t, cfg.trainer.tp, cfg.trainer.pp)
    trainer = RolePlacement("trainer", 0, t, tp=tp, pp=pp, dp=dp,
                            threads=_auto_threads(cfg.trainer.threads, concurrent))
    generator = RolePlacement("generator", t, g, tp=1, pp=1, dp=g,
                              threads=_auto_threads(cfg.generator.threads, concurrent))
    return Placement(world_size=t + g, trainer=trainer, generator=generator)
