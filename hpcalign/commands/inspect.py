"""`hpcalign inspect SHARD [SHARD...]`: check rollout shards and summarise them.

Each shard is fully validated (file checksum, format version, schema, content checksum)
exactly as the trainer would read it, then summarised: step, policy version, samples,
token counts, completion length and reward statistics. Exit status 1 if any shard is bad;
its error names the file and the reason, so this is the tool to run on a shard a trainer
refused.

The bytes are verified before HDF5 parses them: against the shard's sidecar
(`shard-0003.json`, written by its generator) when there is one; a file without one (a
foreign file, a copy) is parsed first in a child process killed after `--parse-timeout-s`
(HDF5 can loop forever on corrupted metadata), and a hang is reported as corruption.

    hpcalign inspect RUN_DIR/rollouts/step-000042/*.h5

`hpcalign inspect OUT` (an `hpcalign rollout` directory) checks its `manifest.json`
instead (`data/manifest.py`): every listed shard against its recorded checksum and sample
count, any shard in OUT the manifest does not list (reported by path, never kept
silently), and the checkpoint and prompts against their content hashes. Exit status 1 on
any mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys

from hpcalign.data.shards import PARSE_TIMEOUT_S, summarize_shard
from hpcalign.errors import ShardError

HELP = "check rollout shards (format, checksum) and print a summary of each"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign inspect", description=HELP)
    parser.add_argument("shards", nargs="+", metavar="SHARD",
                        help="HDF5 rollout shard files, or one `hpcalign rollout` OUT directory")
    parser.add_argument(
        "--parse-timeout-s", type=float, default=PARSE_TIMEOUT_S, metavar="S",
        help="bound on parsing a shard that has no sidecar, in a child process; longer "
             f"counts as corrupted (default {PARSE_TIMEOUT_S:g})")
    args = parser.parse_args(argv)
    if not args.parse_timeout_s > 0:
        parser.error(f"--parse-timeout-s must be > 0, got {args.parse_timeout_s:g}")
    if len(args.shards) == 1 and os.path.isdir(args.shards[0]):
        return _inspect_rollout_dir(args.shards[0])
    bad = 0
    for number, path in enumerate(args.shards):
        if number:
            print()
        try:
            print(summarize_shard(path, parse_timeout_s=args.parse_timeout_s))
        except ShardError as err:
            bad += 1
            print(f"BAD {err}", file=sys.stderr)
    if len(args.shards) > 1:
        print(f"\n{len(args.shards) - bad} of {len(args.shards)} shards OK")
    return 1 if bad else 0


def _inspect_rollout_dir(out_dir: str) -> int:
    from hpcalign.data.manifest import read_manifest, verify_manifest

    manifest = read_manifest(out_dir)  # a UserError (one line) when there is none
    bad = checked = 0
    for ok, line in verify_manifest(out_dir):
        checked += 1
        bad += not ok
        print(line, file=sys.stdout if ok else sys.stderr)
    print(f"\n{out_dir}: {len(manifest['shards'])} shards, {manifest['samples']} samples; "
          f"{checked - bad} of {checked} checks OK")
    return 1 if bad else 0
