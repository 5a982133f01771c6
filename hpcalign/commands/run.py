"""`hpcalign run CONFIG [key=value ...]`: the whole job on this machine, no Slurm needed."""

from __future__ import annotations

import argparse

from hpcalign.config.load import load_config, peek_algorithm
from hpcalign.flows.registry import resolve_flow
from hpcalign.launch.local import run_local

HELP = "run a job on this machine (MPMD mpiexec); resumes an existing RUN_DIR"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign run", description=HELP)
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.lr=1e-5")
    args = parser.parse_intermixed_args(argv)
    if peek_algorithm(args.config, args.overrides) == "dpo":  # one process, no generator
        from hpcalign.config.dpo import DPOConfig
        from hpcalign.flows.dpo import run_dpo

        return run_dpo(load_config(args.config, args.overrides, root=DPOConfig))
    cfg = load_config(args.config, args.overrides)
    resolve_flow(cfg.algorithm, cfg.flow)  # a user's flow that cannot load fails here, once
    return run_local(cfg)
