"""Fault injection: random corruptions of real rollout shards, through `read_shard` and
`hpcalign inspect`; prints ONE JSON line of outcomes.

    python tools/faults/corrupt_shards.py 200                      # the figure (~2-4 min)
    python tools/faults/corrupt_shards.py 24 --seed 1 --parse-timeout-s 3   # the unit test

Shards are written by `write_shard` (the quickstart's shape: 128 samples of "reverse",
per-function rewards, so format version 2; one base of four is lzf-compressed), then copied
and corrupted. Trial 0 is the case of issue 14 (the 64 bytes at offset 2068 XORed: inside
HDF5's global heap, where plain h5py loops forever); the others cycle through: 64 random
bytes XORed anywhere, the same inside the metadata (before the first dataset), a
truncation, a zeroed block, a wrong format version, a foreign HDF5 file, a valid shard of
another step, and one of another run (same step and rank, other samples).

Each corrupted file sits at its run path, next to the sidecar its writer left, and must be
refused by each of the three readers that have a trusted checksum:

- `announced`: `read_shard(path, expected_file_checksum=..., expected_checksum=...)`, as
  the trainer reads an announced shard;
- `sidecar`: `read_shard(path)`, as a resumed trainer reads a shard from before its
  checkpoint;
- `inspect`: `hpcalign inspect path`.

A trial is `detected` when all three refused with one line naming the path. A copy of the
file without a sidecar (a foreign file) also goes through `inspect`, i.e. through the bounded
child parse: `foreign` counts refusals, `harmless` (accepted, and the batch equals the
original: bytes HDF5 never uses were hit) and `missed` (accepted, different data: must be
0); a shard of another run is valid by itself, so it is `not_applicable` there.

Every verdict is timed (`max_verdict_s`). The trials run in a worker process that the
parent watches: a trial that outlives `2 * parse_timeout_s + 30` seconds is a `hang` (the
worker is killed and a new one goes on with the next trial). An exception other than
`ShardError`, or output that is not one `BAD <path>: ...` line, is a `traceback`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from hpcalign.cli import main as cli_main
from hpcalign.data.shards import (
    PARSE_TIMEOUT_S,
    Ragged,
    RolloutBatch,
    ShardInfo,
    read_shard,
    shard_path,
    sidecar_path,
    write_shard,
)
from hpcalign.errors import ShardError

KINDS = ("flip64", "flip64_metadata", "truncate", "zero_block", "wrong_version",
         "foreign_hdf5", "other_step", "other_run")
ISSUE_14 = "global_heap_2068"  # trial 0
STEP = 0
NUM_BASES = 4


def quickstart_batch(step: int = STEP, seed: int = 0, generator_rank: int = 0) -> RolloutBatch:
    """A batch shaped like a quickstart generator's (`configs/quickstart.yaml`): 16 prompts x
    8 samples of "reverse 3-6 letters", a 44-token vocabulary, one reward function."""
    rng = np.random.default_rng(seed)
    n, per_prompt = 128, 8
    completion_lengths = rng.integers(1, 16, n)
    prompt_seeds = rng.integers(0, 2**62, n // per_prompt)
    return RolloutBatch(
        step=step,
        policy_version=step,
        generator_rank=generator_rank,
        prompt_ids=np.repeat(rng.integers(0, 60_000, n // per_prompt), per_prompt),
        prompt_tokens=Ragged.from_list(
            [rng.integers(0, 44, rng.integers(5, 9)) for _ in range(n)], np.int32),
        completion_tokens=Ragged.from_list(
            [rng.integers(0, 44, k) for k in completion_lengths], np.int32),
        logprobs=Ragged.from_list([-rng.random(k) for k in completion_lengths], np.float32),
        rewards=rng.random(n).astype(np.float32),
        seeds=np.repeat(prompt_seeds, per_prompt),
        finished=rng.random(n) < 0.8,
        attrs={"prompts_skipped": 0, "task": "reverse"},
        reward_names=("partial_match",),
        reward_values=rng.random((n, 1)).astype(np.float32),
    )


def first_data_offset(path: str) -> int:
    """Where the first dataset's bytes start (contiguous, or its first chunk): everything
    before is HDF5 metadata."""
    offsets = []
    with h5py.File(path, "r", locking=False) as f:
        for name in f:
            dset_id = f[name].id
            offset = dset_id.get_offset()
            if offset is None and f[name].chunks and dset_id.get_num_chunks():
                offset = dset_id.get_chunk_info(0).byte_offset
            if offset is not None:
                offsets.append(offset)
    return min(offsets)


def xor_bytes(data: bytes, offset: int, pattern: bytes) -> bytes:
    out = bytearray(data)
    for i, byte in enumerate(pattern[: len(out) - offset]):
        out[offset + i] ^= byte
    return bytes(out)


def corrupted_bytes(kind: str, base: str, work: str, rng: np.random.Generator,
                    seed: int) -> tuple[bytes, str]:
    """The corrupted file's bytes, and what was done (for the report of a miss)."""
    data = open(base, "rb").read()
    size = len(data)
    if kind == ISSUE_14:
        return xor_bytes(data, 2068, b"\xff" * 64), "xor 0xff x64 @2068"
    if kind in ("flip64", "flip64_metadata"):
        end = first_data_offset(base) if kind == "flip64_metadata" else size
        offset = int(rng.integers(0, max(1, end - 64)))
        pattern = bytes(rng.integers(1, 256, 64, dtype=np.uint8))  # every byte changes
        return xor_bytes(data, offset, pattern), f"xor 64 random bytes @{offset}"
    if kind == "truncate":
        length = int(rng.integers(0, size))
        return data[:length], f"truncated to {length} of {size} bytes"
    if kind == "zero_block":
        block = int(rng.choice([512, 4096]))
        offset = int(rng.integers(0, max(1, size - block)))
        changed = data[:offset] + bytes(block) + data[offset + block:]
        if changed == data:  # the block was zero already: zero the next one instead
            return corrupted_bytes(kind, base, work, rng, seed)
        return changed[:size], f"zeroed {block} bytes @{offset}"
    scratch = tempfile.mkdtemp(dir=work)
    if kind == "wrong_version":
        path = os.path.join(scratch, "v.h5")
        shutil.copyfile(base, path)
        version = int(rng.choice([0, 3, 99]))
        with h5py.File(path, "r+", locking=False) as f:
            f.attrs["format_version"] = np.int64(version)
        return open(path, "rb").read(), f"format_version set to {version}"
    if kind == "foreign_hdf5":
        path = os.path.join(scratch, "foreign.h5")
        with h5py.File(path, "w") as f:
            f["data"] = rng.random(1000)
            f.attrs["format"] = "something-else"
        return open(path, "rb").read(), "another program's HDF5 file"
    if kind == "other_step":
        info = write_shard(shard_path(scratch, STEP + 1, 0), quickstart_batch(STEP + 1, seed))
        return open(info.path, "rb").read(), f"a valid shard of step {STEP + 1}"
    if kind == "other_run":
        info = write_shard(shard_path(scratch, STEP, 0), quickstart_batch(STEP, seed + 10_000))
        return open(info.path, "rb").read(), "a valid shard of another run (same step and rank)"
    raise ValueError(f"unknown corruption kind {kind!r}")


def prepare(work: str, trials: int, seed: int) -> list[dict]:
    """Write the base shards and every trial's corrupted file; the trial list."""
    rng = np.random.default_rng(seed)
    bases: list[tuple[ShardInfo, str]] = []
    for b in range(NUM_BASES):
        batch = quickstart_batch(STEP, seed * NUM_BASES + b)
        info = write_shard(shard_path(os.path.join(work, f"base-{b}"), STEP, 0), batch,
                           compression="lzf" if b == NUM_BASES - 1 else None)
        bases.append((info, "lzf" if b == NUM_BASES - 1 else "none"))
    plan = []
    for i in range(trials):
        info, compression = bases[0] if i == 0 else bases[int(rng.integers(0, NUM_BASES))]
        kind = ISSUE_14 if i == 0 else KINDS[(i - 1) % len(KINDS)]
        data, what = corrupted_bytes(kind, info.path, work, rng, seed * 1000 + i)
        paths = {}
        for where in ("run", "foreign"):
            path = shard_path(os.path.join(work, f"trial-{i:04d}", where), STEP, 0)
            os.makedirs(os.path.dirname(path), mode=0o700)
            with open(path, "wb") as handle:
                handle.write(data)
            paths[where] = path
        shutil.copyfile(sidecar_path(info.path), sidecar_path(paths["run"]))  # writer's record
        plan.append({"trial": i, "kind": kind, "what": what, "compression": compression,
                     "run_path": paths["run"], "foreign_path": paths["foreign"],
                     "base_path": info.path, "file_checksum": info.file_checksum,
                     "checksum": info.checksum})
    return plan


# ---------------------------------------------------------------------------- the worker


def verdict_read(path: str, **kwargs) -> tuple[str, float, str]:
    """('refused' | 'accepted' | 'traceback', seconds, detail) of one read_shard call."""
    start = time.perf_counter()
    try:
        read_shard(path, retry_s=0, **kwargs)
        outcome, detail = "accepted", ""
    except ShardError as err:
        one_line = str(err).startswith(f"{path}: ") and "\n" not in str(err)
        outcome, detail = ("refused" if one_line else "traceback"), str(err)
    except Exception as err:  # noqa: BLE001 -- exactly what this tool counts
        outcome, detail = "traceback", f"{type(err).__name__}: {err}"
    return outcome, time.perf_counter() - start, detail


def verdict_inspect(path: str, parse_timeout_s: float) -> tuple[str, float, str]:
    """The same for `hpcalign inspect path` (the CLI's main, in this process)."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(["inspect", "--parse-timeout-s", f"{parse_timeout_s:g}", path])
    except BaseException as exc:  # noqa: BLE001 -- SystemExit included: a crash of the CLI
        return "traceback", time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    lines = err.getvalue().splitlines()
    if "Traceback" in out.getvalue() + err.getvalue():
        return "traceback", seconds, err.getvalue()[-500:]
    if code == 1 and len(lines) == 1 and lines[0].startswith(f"BAD {path}: "):
        return "refused", seconds, lines[0]
    if code == 0 and not lines:
        return "accepted", seconds, ""
    return "traceback", seconds, f"exit {code}: {err.getvalue()[-500:]}"


def same_batch(a: RolloutBatch, b: RolloutBatch) -> bool:
    fields = ("prompt_ids", "rewards", "seeds", "finished", "reward_values")
    ragged = ("prompt_tokens", "completion_tokens", "logprobs")
    return ((a.step, a.policy_version, a.generator_rank, a.attrs, a.reward_names)
            == (b.step, b.policy_version, b.generator_rank, b.attrs, b.reward_names)
            and all(np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True) for k in fields)
            and all(np.array_equal(getattr(a, k).flat, getattr(b, k).flat)
                    and np.array_equal(getattr(a, k).offsets, getattr(b, k).offsets)
                    for k in ragged))


def run_trial(trial: dict, parse_timeout_s: float) -> dict:
    path = trial["run_path"]
    verdicts = {
        "announced": verdict_read(path, expected_file_checksum=trial["file_checksum"],
                                  expected_checksum=trial["checksum"]),
        "sidecar": verdict_read(path, parse_timeout_s=parse_timeout_s),
        "inspect": verdict_inspect(path, parse_timeout_s),
    }
    foreign = "not_applicable"
    if trial["kind"] != "other_run":
        verdicts["foreign"] = verdict_inspect(trial["foreign_path"], parse_timeout_s)
        foreign = verdicts["foreign"][0]
        if foreign == "accepted":
            original = read_shard(trial["base_path"])
            copy = read_shard(trial["foreign_path"], parse_timeout_s=parse_timeout_s)
            foreign = "harmless" if same_batch(original, copy) else "missed"
    return {
        "trial": trial["trial"], "kind": trial["kind"],
        "detected": all(verdicts[k][0] == "refused" for k in ("announced", "sidecar", "inspect")),
        "tracebacks": sum(v[0] == "traceback" for v in verdicts.values()),
        "foreign": foreign,
        "foreign_timed_out": "timed out parsing" in verdicts.get("foreign", ("", 0, ""))[2],
        "max_verdict_s": max(v[1] for v in verdicts.values()),
        "verdicts": {k: [v[0], round(v[1], 3), v[2][:300]] for k, v in verdicts.items()},
    }


def worker(plan_path: str, start: int, parse_timeout_s: float) -> int:
    with open(plan_path) as handle:
        plan = json.load(handle)
    for trial in plan[start:]:
        print(json.dumps(run_trial(trial, parse_timeout_s)), flush=True)
    return 0


# ---------------------------------------------------------------------------- the parent


def watch(plan: list[dict], plan_path: str, parse_timeout_s: float) -> list[dict]:
    """Run the trials in worker processes; a trial past its deadline is a hang."""
    deadline_s = 2 * parse_timeout_s + 30
    results: list[dict] = []
    while len(results) < len(plan):
        start = len(results)
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", plan_path,
             "--start", str(start), "--parse-timeout-s", str(parse_timeout_s)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        while len(results) < len(plan):
            trial_start = time.perf_counter()
            ready, _, _ = select.select([proc.stdout], [], [], deadline_s)
            line = proc.stdout.readline() if ready else ""
            if not line:  # stalled (a hang) or dead (a crash, counted as a traceback)
                proc.kill()
                code = proc.wait()
                trial, hang = plan[len(results)], not ready
                results.append({"trial": trial["trial"], "kind": trial["kind"],
                                "detected": False, "tracebacks": 0 if hang else 1,
                                "foreign": "hang" if hang else "traceback", "hang": hang,
                                "max_verdict_s": time.perf_counter() - trial_start,
                                "foreign_timed_out": False,
                                "verdicts": {"worker": ["hang" if hang else f"died ({code})",
                                                        deadline_s, ""]}})
                break
            results.append(json.loads(line))
        else:
            proc.wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trials", type=int, nargs="?", default=200,
                        help="number of corruptions (default 200, the figure)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parse-timeout-s", type=float, default=PARSE_TIMEOUT_S,
                        help=f"bound of the bounded child parse (default {PARSE_TIMEOUT_S:g})")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--worker", metavar="PLAN", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker(args.worker, args.start, args.parse_timeout_s))

    began = time.perf_counter()
    work = tempfile.mkdtemp(prefix="hpcalign-corrupt-", dir=args.dir)
    try:
        plan = prepare(work, args.trials, args.seed)
        plan_path = os.path.join(work, "plan.json")
        with open(plan_path, "w") as handle:
            json.dump(plan, handle)
        results = watch(plan, plan_path, args.parse_timeout_s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in results:  # the details of anything wrong, for a human, on stderr
        if (not result["detected"] or result["tracebacks"] or result.get("hang")
                or result["foreign"] == "missed"):
            print(json.dumps(result), file=sys.stderr)
    foreign = [r["foreign"] for r in results]
    print(json.dumps({
        "trials": len(results),
        "detected": sum(r["detected"] for r in results),
        "hangs": sum(bool(r.get("hang")) for r in results),
        "tracebacks": sum(r["tracebacks"] for r in results),
        "max_verdict_s": round(max((r["max_verdict_s"] for r in results), default=0.0), 3),
        "foreign": {k: foreign.count(k)
                    for k in ("refused", "harmless", "missed", "not_applicable", "traceback")},
        "foreign_hdf5_hangs_contained": sum(r["foreign_timed_out"] for r in results),
        "kinds": {k: sum(r["kind"] == k for r in results) for k in (ISSUE_14, *KINDS)},
        "parse_timeout_s": args.parse_timeout_s,
        "seed": args.seed,
        "wall_s": round(time.perf_counter() - began, 1),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version,
                    "load1": round(os.getloadavg()[0], 2)},
    }))


if __name__ == "__main__":
    main()
