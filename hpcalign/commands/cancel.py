"""`hpcalign cancel RUN_DIR [--checkpoint]`: end the run that owns RUN_DIR.

A Slurm run (from any login shell): plain cancel is `scancel` of the het job (all
components); `--checkpoint` instead asks the ranks to checkpoint at the next step boundary
and stop without requeueing (USR1, as before a time limit); resume later with `hpcalign
submit` on the same config. A local run (`hpcalign run`, on this host): its launcher gets
SIGTERM, which it treats like Ctrl-C — checkpoint at the next step boundary, then stop.
"""

from __future__ import annotations

import argparse
import os

HELP = "cancel the Slurm job of a run (--checkpoint: checkpoint first, then stop)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign cancel", description=HELP)
    parser.add_argument("run_dir", help="the run directory printed by `hpcalign submit`")
    parser.add_argument("--checkpoint", action="store_true",
                        help="checkpoint at the next step boundary, then stop (no requeue)")
    args = parser.parse_args(argv)
    run_dir = os.path.abspath(args.run_dir)
    message = cancel_local(run_dir)
    if message is None:
        from hpcalign.launch.slurm import cancel_run

        message = cancel_run(run_dir, checkpoint=args.checkpoint)
    print(message)
    return 0


def cancel_local(run_dir: str) -> str | None:
    """Stop the local run owning RUN_DIR (None: the owner is no local run of this host)."""
    import signal
    import socket

    from hpcalign.errors import UserError
    from hpcalign.launch.claim import liveness, read_owner

    owner = read_owner(run_dir)
    if owner is None or owner.kind not in ("local", "rollout") or owner.pid is None:
        return None
    if owner.host != socket.gethostname():
        raise UserError(f"{run_dir} is owned by {owner.describe()}: cancel it on "
                        f"{owner.host} (a local run is stopped by signalling its pid there)")
    alive, why = liveness(owner)
    if not alive:
        return f"{owner.describe()} is gone ({why}); nothing to cancel"
    os.kill(owner.pid, signal.SIGTERM)
    return f"asked {owner.describe()} to checkpoint at the next step and stop (SIGTERM)"
