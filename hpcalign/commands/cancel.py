"""`hpcalign cancel RUN_DIR [--checkpoint]`: end the Slurm job of a run, from any login shell.

Plain cancel is `scancel` of the het job (all components). `--checkpoint` instead asks
the ranks to checkpoint at the next step boundary and stop without requeueing (USR1, as
before a time limit); resume later with `hpcalign submit` on the same config.
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
    from hpcalign.launch.slurm import cancel_run

    print(cancel_run(os.path.abspath(args.run_dir), checkpoint=args.checkpoint))
    return 0
