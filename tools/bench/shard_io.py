"""Benchmark rollout-shard I/O against `dd` on the same filesystem, in one run.

Writes a shard of realistic shape (Qwen-sized vocabulary so tokens are int32 on disk, ~256-token
prompts, long completions with per-token log-probs) with `hpcalign.data.shards.write_shard`
(checksum, fsync, rename and directory fsync included), reads it back with `read_shard`
(full validation and checksum included), and compares with
`dd if=/dev/zero of=X bs=1M count=<MB> conv=fsync` and a `dd` read of that file.

Reads are measured twice: "cold" after `posix_fadvise(POSIX_FADV_DONTNEED)` evicted the
(fsynced, hence clean) file from the page cache — no root needed, though a VM's host cache
may still serve it — and "warm", straight from the page cache.

    python tools/bench/shard_io.py --mb 256 --dir /scratch/$USER --repeat 3
    python tools/bench/shard_io.py --chunk-mb 1 --compression lzf   # try a layout

Prints ONE JSON line: medians over --repeat runs (and a best-of ratio), plus the write split
into its parts, HDF5 alone (same layout, fsync) and the checksum alone, to show which one
limits. Target: shard write >= 80% of dd write.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time

import h5py
import numpy as np

from hpcalign.data import shards
from hpcalign.data.shards import Ragged, RolloutBatch, read_shard, write_shard

VOCAB = 151_936  # Qwen2.5: > 65535, so tokens are stored as int32 (4 B, the worst case)
PROMPT_TOKENS = 256
COMPLETION_TOKENS_MEAN = 2048


def make_batch(target_mb: float, seed: int = 0) -> RolloutBatch:
    """A batch whose shard is about `target_mb` MB: 4 B per prompt token, 8 B per completion
    token (int32 id + float32 log-prob)."""
    rng = np.random.default_rng(seed)
    bytes_per_sample = 4 * PROMPT_TOKENS + 8 * COMPLETION_TOKENS_MEAN
    n = max(1, int(target_mb * 1e6 / bytes_per_sample))
    completion_lengths = rng.integers(1, 2 * COMPLETION_TOKENS_MEAN, n)
    prompt_lengths = rng.integers(PROMPT_TOKENS // 2, PROMPT_TOKENS * 3 // 2, n)
    c_total, p_total = int(completion_lengths.sum()), int(prompt_lengths.sum())

    def offsets(lengths: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    c_offsets = offsets(completion_lengths)
    return RolloutBatch(
        step=42,
        policy_version=41,
        generator_rank=3,
        prompt_ids=np.arange(n, dtype=np.int64) // 8,
        prompt_tokens=Ragged(
            rng.integers(0, VOCAB, p_total, dtype=np.int32), offsets(prompt_lengths)
        ),
        completion_tokens=Ragged(rng.integers(0, VOCAB, c_total, dtype=np.int32), c_offsets),
        # log-probs are real-valued noise: incompressible, like the real thing
        logprobs=Ragged(-rng.exponential(1.0, c_total).astype(np.float32), c_offsets.copy()),
        rewards=rng.random(n, dtype=np.float32),
        seeds=rng.integers(0, 2**62, n),
        finished=rng.random(n) < 0.9,
        attrs={"task": "bench", "model": "none"},
    )


def evict(path: str) -> None:
    """Drop a clean file from the page cache (works without root on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_dd(args: list[str]) -> float:
    """Seconds `dd` took, as `dd` reports it (wall time of the process as a fallback)."""
    start = time.perf_counter()
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    match = re.search(r"copied, ([0-9.eE+-]+) s", proc.stderr)
    return float(match.group(1)) if match else wall


def h5_write_only(batch: RolloutBatch, path: str, compression: str | None) -> float:
    """Seconds for what write_shard does minus the checksum: same layout, fsync included."""
    arrays = shards._batch_to_arrays(batch)
    start = time.perf_counter()
    with h5py.File(path, "w", locking=False, libver="v110") as f:
        for name, data in arrays.items():
            f.create_dataset(name, data=data, **shards._layout(data, compression))
    evict(path)  # fsyncs
    elapsed = time.perf_counter() - start
    os.unlink(path)
    return elapsed


def write_without_early_writeback(path: str, batch: RolloutBatch,
                                  compression: str | None) -> float:
    """Seconds for write_shard with the sync_file_range writeback switched off (baseline)."""
    saved, shards._sync_file_range = shards._sync_file_range, None
    try:
        if os.path.exists(path):
            os.unlink(path)
        start = time.perf_counter()
        write_shard(path, batch, compression=compression)
        return time.perf_counter() - start
    finally:
        shards._sync_file_range = saved
        os.unlink(path)


def checksum_only(batch: RolloutBatch) -> float:
    """Seconds for the checksum alone (same threads as write_shard, no I/O)."""
    arrays = shards._batch_to_arrays(batch)
    start = time.perf_counter()
    with shards._hash_pool() as pool:
        checksum = shards._Checksum(shards._key_attrs(batch), pool)
        for name, data in arrays.items():
            checksum.add(name, data)
        checksum.hexdigest()
    return time.perf_counter() - start


def cpu_s(who: int) -> float:
    """User + system CPU seconds so far (all threads of this process, or waited children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=256, help="shard size in MB (default 256)")
    parser.add_argument("--dir", default="/tmp", help="filesystem to test (default /tmp)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=None,
        help=f"HDF5 chunk size, 0 = contiguous (default {shards.CHUNK_BYTES / 2**20:g} MiB)",
    )
    parser.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
    args = parser.parse_args()
    if args.chunk_mb is not None:
        shards.CHUNK_BYTES = int(args.chunk_mb * 2**20)
    compression = None if args.compression == "none" else args.compression

    batch = make_batch(args.mb)
    keys = (
        "write",
        "write_no_writeback",
        "write_cpu",
        "dd_write_cpu",
        "h5_write",
        "checksum",
        "read",
        "read_warm",
        "dd_write",
        "dd_read",
        "dd_read_warm",
    )
    times: dict[str, list[float]] = {k: [] for k in keys}
    work = tempfile.mkdtemp(prefix="hpcalign-bench-", dir=args.dir)
    try:
        shard = shards.shard_path(work, 42, 3)
        dd_file = os.path.join(work, "dd.bin")
        size = dd_mb = 0
        for i in range(args.repeat):
            for p in (shard, dd_file):
                if os.path.exists(p):
                    os.unlink(p)
            # the baseline without early writeback goes first every other round, so that
            # neither side always follows the other's dirty pages
            plain_first = i % 2 == 1
            if plain_first:
                times["write_no_writeback"].append(write_without_early_writeback(
                    os.path.join(work, "plain.h5"), batch, compression))
            t, cpu = time.perf_counter(), cpu_s(resource.RUSAGE_SELF)
            info = write_shard(shard, batch, compression=compression)
            times["write"].append(time.perf_counter() - t)
            times["write_cpu"].append(cpu_s(resource.RUSAGE_SELF) - cpu)
            cpu = cpu_s(resource.RUSAGE_CHILDREN)
            size = info.size_bytes
            dd_mb = max(1, round(size / 2**20))
            times["dd_write"].append(
                run_dd(["if=/dev/zero", f"of={dd_file}", "bs=1M", f"count={dd_mb}", "conv=fsync"])
            )
            times["dd_write_cpu"].append(cpu_s(resource.RUSAGE_CHILDREN) - cpu)
            times["h5_write"].append(h5_write_only(batch, os.path.join(work, "h5.h5"), compression))
            if not plain_first:
                times["write_no_writeback"].append(write_without_early_writeback(
                    os.path.join(work, "plain.h5"), batch, compression))
            times["checksum"].append(checksum_only(batch))
            for warmth in ("", "_warm"):  # cold first, then again from the page cache
                if not warmth:
                    evict(shard)
                    evict(dd_file)
                t = time.perf_counter()
                read_shard(shard, expected_checksum=info.checksum)
                times["read" + warmth].append(time.perf_counter() - t)
                times["dd_read" + warmth].append(run_dd([f"if={dd_file}", "of=/dev/null", "bs=1M"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mbps(key: str, nbytes: int, best: bool = False) -> float:
        seconds = min(times[key]) if best else statistics.median(times[key])
        return round(nbytes / 1e6 / seconds, 1)

    dd_bytes = dd_mb * 2**20
    out = {
        "write_MBps": mbps("write", size),
        "read_MBps": mbps("read", size),
        "read_warm_MBps": mbps("read_warm", size),
        "dd_write_MBps": mbps("dd_write", dd_bytes),
        "dd_read_MBps": mbps("dd_read", dd_bytes),
        "dd_read_warm_MBps": mbps("dd_read_warm", dd_bytes),
        "h5_write_no_checksum_MBps": mbps("h5_write", size),
        "write_no_writeback_MBps": mbps("write_no_writeback", size),
        "checksum_MBps": mbps("checksum", size),
    }
    out.update(
        write_ratio=round(out["write_MBps"] / out["dd_write_MBps"], 3),
        read_ratio=round(out["read_MBps"] / out["dd_read_MBps"], 3),
        read_warm_ratio=round(out["read_warm_MBps"] / out["dd_read_warm_MBps"], 3),
        write_no_writeback_ratio=round(out["write_no_writeback_MBps"] / out["dd_write_MBps"], 3),
        h5_write_no_checksum_ratio=round(
            out["h5_write_no_checksum_MBps"] / out["dd_write_MBps"], 3
        ),
        # best-of-repeat figures: less sensitive to other jobs on a shared node
        # CPU seconds per write: what a busy node has to find for it
        write_cpu_s=round(statistics.median(times["write_cpu"]), 3),
        dd_write_cpu_s=round(statistics.median(times["dd_write_cpu"]), 3),
        write_ratio_best=round(mbps("write", size, True) / mbps("dd_write", dd_bytes, True), 3),
        bytes=size,
        dd_bytes=dd_bytes,
        samples=len(batch),
        tokens=len(batch.prompt_tokens.flat) + len(batch.completion_tokens.flat),
        chunk_bytes=shards.CHUNK_BYTES,
        hash_threads=min(shards.HASH_THREADS, os.cpu_count() or 1),
        compression=args.compression,
        repeat=args.repeat,
        dir=args.dir,
        cold_reads="posix_fadvise(DONTNEED) before each cold read; warm reads from page cache",
        machine={
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "load1": round(os.getloadavg()[0], 2),
        },
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
