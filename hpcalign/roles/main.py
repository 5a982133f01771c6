"""Rank entry: `python -m hpcalign.roles.main [--role trainer|generator] RUN_DIR`.

Every launcher starts exactly this — local `mpiexec` (MPMD), the `srun --mpi=pmix` MPMD
step of a heterogeneous Slurm job, or submitit — so local and Slurm runs differ only in
the launcher. The world holds the trainers first, then the generators (plan.json).
A failing rank writes RUN_DIR/errors/rank-N.json, prints one line naming itself, and
aborts the MPI world, so a dead role never leaves the others waiting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback

from hpcalign import faults
from hpcalign.durable import atomic_write_text, keep_private
from hpcalign.errors import storage_failure


def _setup_logging(run_dir: str, rank: int) -> None:
    os.makedirs(os.path.join(run_dir, "logs"), mode=0o700, exist_ok=True)
    logging.basicConfig(
        filename=os.path.join(run_dir, "logs", f"rank-{rank}.log"),
        level=logging.INFO,
        format="%(asctime)s rank" + str(rank) + " %(name)s %(levelname)s %(message)s",
    )
    # NOTE: a log line that cannot be written (RUN_DIR full or read-only) is dropped; by
    # default logging dumps "--- Logging error ---" with a traceback (and the message: the
    # failure's own traceback) onto stderr, above the rank's one-line error
    logging.raiseExceptions = False
    sys.unraisablehook = _log_unraisable
    # NOTE: Cython reports an error in a `__dealloc__` through sys.excepthook, not the
    # unraisable hook: h5py's handles of a shard whose write hit a full disk print a
    # traceback when they are freed (on another rank than the one that failed first, too).
    # Everything a rank runs after this is inside run()'s try, which prints its one line:
    # what reaches the hook is such cleanup noise, for the rank log. torch.distributed
    # wraps this hook with a "[rankN]:" prefix and prints what it writes: nothing.
    sys.excepthook = _log_uncaught


def _log_uncaught(exc_type, exc_value, exc_traceback) -> None:
    logging.getLogger(__name__).warning(
        "uncaught %s: %s", exc_type.__name__, exc_value,
        exc_info=(exc_type, exc_value, exc_traceback))


def _log_unraisable(unraisable) -> None:
    """An exception Python cannot raise (h5py's `__dealloc__` on a full disk) goes to the
    rank's log, not as a traceback onto stderr above the rank's one-line error."""
    logging.getLogger(__name__).warning("exception ignored in %r: %s: %s", unraisable.object,
                                        type(unraisable.exc_value).__name__,
                                        unraisable.exc_value)


PEER_FAILURE_GRACE_S = 3.0
_PEER_FAILURE_WORDS = ("connection reset", "connection closed", "broken pipe", "end of file",
                       "socket closed")


def _peer_failure(err: BaseException) -> bool:
    """A torch.distributed error that means another rank went away (not this rank's bug)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(word in text for word in _PEER_FAILURE_WORDS)


def _record_failure(run_dir: str, rank: int, who: str, err: BaseException) -> None:
    storage = storage_failure(err, run_dir)  # a full or read-only disk, however the library words it
    record = {"rank": rank, "role": who, "host": socket.gethostname(),
              "error": f"write failed: {storage}" if storage else f"{type(err).__name__}: {err}",
              "time": time.time(),
              # a peer's death seen from here: the launcher prefers direct evidence
              "secondary": _peer_failure(err),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
              "component": os.environ.get("SLURM_HET_JOB_ID_OFFSET") or os.environ.get(
                  "SLURM_PACK_GROUP")}
    try:
        os.makedirs(os.path.join(run_dir, "errors"), mode=0o700, exist_ok=True)
        atomic_write_text(os.path.join(run_dir, "errors", f"rank-{rank}.json"),
                          json.dumps(record) + "\n")
        logging.getLogger(__name__).error("%s failed:\n%s", who, traceback.format_exc())
    except OSError:
        pass
    print(f"hpcalign: {who} on {record['host']} failed: {record['error']}", file=sys.stderr,
          flush=True)


def _check_flow_schedule(cfg, placement, control, who: str) -> None:
    """Every rank derives the flow's static schedule; world rank 0 sends its digest and a
    rank whose own differs fails by name before it joins any collective (flows/api.py)."""
    from hpcalign.comm.control import TAG_SCHEDULE
    from hpcalign.flows.api import check_schedule, schedule_digest
    from hpcalign.flows.registry import resolve_flow

    own = schedule_digest(resolve_flow(cfg.algorithm, cfg.flow), placement.to_dict())
    if control.comm.Get_rank() == 0:
        for rank in range(1, control.comm.Get_size()):
            control.send({"digest": own}, dest=rank, tag=TAG_SCHEDULE)
        return
    leader = control.recv(0, TAG_SCHEDULE, "the flow's schedule digest", cfg.comm.startup_timeout_s)
    check_schedule(own, str(leader["digest"]), who)


def run(run_dir: str, role: str | None = None) -> int:
    """Run this process's rank of the run in `run_dir`; returns the exit status."""
    from hpcalign.roles.context import install_stop_handlers

    install_stop_handlers()  # first: a stop signal during start-up must not kill the rank
    from mpi4py import MPI

    # NOTE: MPI_Init (PMIx) may install its own handlers; ours must be the ones in force.
    install_stop_handlers()

    # transformers' per-load progress bars would drown the run's own progress line
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    run_dir = os.path.abspath(run_dir)
    _setup_logging(run_dir, rank)
    faults.configure(run_dir)
    who = f"world rank {rank}"
    try:
        import torch
        import torch.distributed as dist

        from hpcalign.comm.control import Control
        from hpcalign.comm.weights import init_distributed
        from hpcalign.launch.rundir import read_run_config
        from hpcalign.plan.placement import compute_placement
        from hpcalign.roles.context import RoleContext
        from hpcalign.roles.device import choose_backend, role_device

        cfg = read_run_config(run_dir)
        placement = compute_placement(cfg)
        if comm.Get_size() != placement.world_size:
            groups = " + ".join(f"{g.role} {g.ranks}" for g in placement.groups())
            raise RuntimeError(f"the MPI world has {comm.Get_size()} ranks but the plan needs "
                               f"{placement.world_size} ({groups}): check the launcher")
        who = placement.describe_rank(rank)
        expected = placement.role_of(rank)
        if role is not None and role != expected:
            raise RuntimeError(f"started as {role} but the plan puts a {expected} at rank {rank}")
        threads = placement.group_of(rank).threads
        torch.set_num_threads(threads)
        control = Control(comm, cfg.comm.timeout_s, placement.describe_rank)
        _check_flow_schedule(cfg, placement, control, who)
        # an exclusive model computes where the trainers do (trainer.device)
        device_key = "generator" if expected == "generator" else "trainer"
        device = role_device(getattr(cfg, device_key).device, f"{device_key}.device")
        backend = choose_backend(cfg.comm.dist_backend, device, cfg.trainer.device,
                                 cfg.generator.device)  # rank 0's choice counts
        backend = init_distributed(control, run_dir, backend, cfg.comm.startup_timeout_s,
                                   device, who)
        # every rank creates every group, in the same order (torch.distributed's rule)
        # start-up may be slow (startup_timeout_s); steady-state collectives get timeout_s
        steady = datetime.timedelta(seconds=cfg.comm.timeout_s)
        sync_group = dist.new_group([0, *placement.generator.world_ranks()], timeout=steady)
        trainer_group = dist.new_group(placement.trainer.world_ranks(), timeout=steady)
        ctx = RoleContext(cfg=cfg, run_dir=run_dir, placement=placement, control=control,
                          rank=rank, sync_group=sync_group, trainer_group=trainer_group,
                          device=device)
        install_stop_handlers()  # again, after the libraries' own set-up
        logging.getLogger(__name__).info("%s ready on %s (%s, %d threads)", who,
                                         socket.gethostname(), device, threads)
        # NOTE: transformers (0.4 s of imports a rank) is for loading models: after "ready",
        # so that the launch itself (MPI world + torch.distributed) is not waiting on it.
        import transformers

        transformers.utils.logging.disable_progress_bar()
        if expected == "trainer":
            from hpcalign.roles.trainer import Trainer

            Trainer(ctx).run()
        elif expected != "generator":  # an exclusive model (models.<name>.placement)
            from hpcalign.comm.model_service import wire_device
            from hpcalign.roles.model_server import ModelServer

            ModelServer(ctx, expected, wire_device(backend, device)).run()
        else:
            from hpcalign.roles.generator import Generator

            Generator(ctx).run()
        control.flush()
        # NOTE: the work is done; a late stop signal must not kill the rank while Python
        # shuts down (its finalisation resets Python-level handlers to the default, which
        # for SIGUSR1 is "terminate"; an ignored signal stays ignored).
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        dist.destroy_process_group()
        return 0
    except BaseException as err:  # noqa: BLE001 - every failure must take the world down
        _record_failure(run_dir, rank, who, err)
        sys.stderr.flush()
        if _peer_failure(err):
            # NOTE: a peer that died makes this rank fail too ("connection reset"). Abort a
            # moment later, so that mpiexec/srun first reports the rank that really died.
            time.sleep(PEER_FAILURE_GRACE_S)
        comm.Abort(1)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpcalign.roles.main")
    parser.add_argument("--role", choices=("trainer", "generator", "reference", "reward"),
                        default=None)
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    keep_private()
    return run(args.run_dir, args.role)


if __name__ == "__main__":
    sys.exit(main())
