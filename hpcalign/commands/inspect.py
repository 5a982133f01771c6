"""`hpcalign inspect SHARD [SHARD...]`: check rollout shards and summarise them.

Each shard is fully validated (format version, schema, checksum) exactly as the trainer
would read it, then summarised: step, policy version, samples, token counts, completion
length and reward statistics. Exit status 1 if any shard is bad; its error names the file
and the reason, so this is the tool to run on a shard a trainer refused.

    hpcalign inspect RUN_DIR/rollouts/step-000042/*.h5
"""

from __future__ import annotations

import argparse
import sys

from hpcalign.data.shards import summarize_shard
from hpcalign.errors import ShardError

HELP = "check rollout shards (format, checksum) and print a summary of each"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign inspect", description=HELP)
    parser.add_argument("shards", nargs="+", metavar="SHARD", help="HDF5 rollout shard files")
    args = parser.parse_args(argv)
    bad = 0
    for number, path in enumerate(args.shards):
        if number:
            print()
        try:
            print(summarize_shard(path))
        except ShardError as err:
            bad += 1
            print(f"BAD {err}", file=sys.stderr)
    if len(args.shards) > 1:
        print(f"\n{len(args.shards) - bad} of {len(args.shards)} shards OK")
    return 1 if bad else 0
