"""`hpcalign submit CONFIG [key=value ...] [--dry-run]`: the run as ONE heterogeneous Slurm job.

Validates the config, writes RUN_DIR (mode 0700: config.yaml, plan.json, slurm.json) and
submits through submitit (`hpcalign.launch.slurm.HetSlurmExecutor`): component 0 holds the
trainers, component 1 the generators, and one `srun --mpi=pmix` MPMD step runs them as one
MPI world. Prints the job id and RUN_DIR and returns; follow with `hpcalign status RUN_DIR`.
`--dry-run` prints the exact sbatch script and changes nothing (no RUN_DIR, no sbatch).
"""

from __future__ import annotations

import argparse
import os
import sys

from hpcalign.config.load import load_config

HELP = "submit a run as one heterogeneous Slurm job (trainers + generators); --dry-run prints it"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign submit", description=HELP)
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. slurm.gen.nodes=2")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch script that would be submitted; change nothing")
    args = parser.parse_intermixed_args(argv)  # `CONFIG --dry-run k=v` works too
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from hpcalign.launch.sbatch_text import hetjob_sbatch_text
        from hpcalign.launch.slurm import job_python

        text = hetjob_sbatch_text(cfg, os.path.abspath(cfg.run_dir), job_python(cfg))
        _print_models(cfg, sys.stderr)  # stdout stays the exact script
        sys.stdout.write(text)
        return 0
    from hpcalign.launch.slurm import submit_run

    job_id, run_dir = submit_run(cfg)
    if job_id is None:  # finished already: submit_run said so, nothing was submitted
        return 0
    print(f"submitted job {job_id}: {cfg.trainer.ranks} trainer rank(s) on partition "
          f"'{cfg.slurm.train.partition}' + {cfg.generator.ranks} generator rank(s) on partition "
          f"'{cfg.slurm.gen.partition}'")
    _print_models(cfg, sys.stdout)
    print(f"run dir: {run_dir}")
    print(f"  hpcalign status {run_dir}\n  hpcalign cancel {run_dir}")
    return 0


def _print_models(cfg, out) -> None:
    """Every model of the run: engines, ranks, degrees, partition (plan.json's model_map)."""
    from hpcalign.plan.placement import compute_placement, describe_models, model_map

    print("models:", file=out)
    for line in describe_models(model_map(cfg, compute_placement(cfg))):
        print(f"  {line}", file=out)
