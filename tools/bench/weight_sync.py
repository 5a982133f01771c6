"""Benchmark the weight sync by name against a raw `dist.broadcast` of the same buckets.

gloo on 127.0.0.1, 1 sender + N receivers (default 1), in one run. The model is a
narrow, many-layer Qwen2 (hidden 512, 12 layers, GQA 8/2 heads, intermediate 1536,
vocab 16384, tied embeddings): 181 tensors, ~178 MB float32. For each bucket size both are
timed alternately, the order swapped every repeat:

- raw: the sender's buckets already flat in preallocated buffers, one `dist.broadcast`
  each into a preallocated receive buffer; no names, no flattening, no load;
- named: `NamedWeightSender.sync()` → `NamedWeightReceiver.sync()` into the receiver's
  model by name (`load_into_module`), after a first sync (the spec) that is not timed.
  The sender's parameters are laid out as the torch training engine lays them out
  (`coalesce_in_place`, per bucket), so they go without a copy, and the receiver's
  same-dtype parameters are bound to its receive buffers (no load copy). `--copy` keeps
  the sender's parameters as loaded and makes the receiver load by copy: the path a
  vLLM or bf16 generator, or a sender of scattered tensors, takes.

One figure is the time from a barrier until the last rank is done (max over ranks); CPU
seconds are summed over ranks (compare those when other jobs load the machine).

    python tools/bench/weight_sync.py                    # buckets 16 and 64 MB, 7 repeats
    python tools/bench/weight_sync.py --bucket-mb 64 --repeat 9 --receivers 2
    python tools/bench/weight_sync.py --bucket-mb 64 --repeat 9 --layers 48   # ~610 MB

Prints ONE JSON line: median seconds of each, their ratio (target: named <= 1.2 x raw)
and GB/s. The processes use 1 torch thread each by default (2 processes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpcalign.comm.weights import (
    NamedWeightReceiver,
    NamedWeightSender,
    coalesce_in_place,
    load_into_module,
)
from hpcalign.config.schema import ModelInit
from hpcalign.models.tiny import build_model

INIT = ModelInit(hidden=512, layers=12, heads=8, kv_heads=2, intermediate=1536,
                 tie_embeddings=True, seed=0)
VOCAB = 16384


def _timed(fn) -> tuple[float, float]:
    """Seconds from a common barrier until the slowest rank has finished `fn`, and the CPU
    seconds of all ranks together (the figure to compare when the machine is busy)."""
    dist.barrier()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    cpu = torch.tensor([time.process_time() - start_cpu], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    dist.all_reduce(cpu)
    return float(elapsed.item()), float(cpu.item())


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: mp.Queue) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    model = build_model(INIT.model_copy(update={"seed": rank, "layers": args.layers}),
                        vocab_size=VOCAB)
    model.requires_grad_(False)
    result: dict = {}
    for bucket_mb in args.bucket_mb:
        if rank == 0:
            if not args.copy:
                coalesce_in_place(model.named_parameters(), bucket_mb)
            named = NamedWeightSender(model.named_parameters, bucket_mb, src=0)
        else:
            loader = load_into_module(model)
            if args.copy:
                loader.bind = None  # no in-place receive: every bucket is loaded by copy
            named = NamedWeightReceiver(loader, src=0)
        named.sync()  # first sync: the spec, buffers allocated; not timed
        buckets = named.spec.buckets()
        # raw: the same bytes in the same buckets, flat already (sender) or preallocated
        raw_buffers = [torch.empty(b.numel, dtype=b.dtype) for b in buckets]
        if rank == 0:
            params = [t for _, t in model.named_parameters()]
            for buffer, bucket in zip(raw_buffers, buckets):
                torch.cat([params[i].reshape(-1) for i in bucket.indices], out=buffer)
        else:  # one receive buffer reused, as the named receiver does
            size = max(b.numel * b.dtype.itemsize for b in buckets)
            scratch = torch.empty(size, dtype=torch.uint8)
            raw_buffers = [scratch[:b.nbytes].view(b.dtype) for b in buckets]

        def raw() -> None:
            for buffer in raw_buffers:  # noqa: B023 (called inside this iteration only)
                dist.broadcast(buffer, src=0)

        times: dict[str, list[tuple[float, float]]] = {"raw": [], "named": []}
        for repeat in range(args.repeat):
            order = [("raw", raw), ("named", named.sync)]
            for what, fn in order if repeat % 2 == 0 else order[::-1]:
                times[what].append(_timed(fn))
        raw_s, named_s = (statistics.median(t for t, _ in times[k]) for k in ("raw", "named"))
        raw_cpu, named_cpu = (statistics.median(c for _, c in times[k]) for k in ("raw", "named"))
        gb = named.spec.num_bytes / 1e9
        result[f"{bucket_mb:g}"] = {
            "buckets": len(buckets), "raw_s": round(raw_s, 4), "named_s": round(named_s, 4),
            "ratio": round(named_s / raw_s, 3), "raw_gb_s": round(gb / raw_s, 2),
            "named_gb_s": round(gb / named_s, 2),
            "raw_cpu_s": round(raw_cpu, 4), "named_cpu_s": round(named_cpu, 4),
            "copied_mb": round(named.copied_bytes / 2**20, 1),
            "raw_all_s": [round(t, 4) for t, _ in times["raw"]],
            "named_all_s": [round(t, 4) for t, _ in times["named"]]}
        if rank == 1:  # the receiver really got the sender's weights
            expected = build_model(INIT.model_copy(update={"layers": args.layers}),
                                   vocab_size=VOCAB)
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(),
                                                         expected.parameters()))
    if rank == 0:
        spec = named.spec
        out.put({"model_mb": round(spec.num_bytes / 2**20, 1), "tensors": len(spec.tensors),
                 "results": result})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[16.0, 64.0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--copy", action="store_true",
                        help="the copying path: sender not coalesced, receiver loads by copy")
    parser.add_argument("--layers", type=int, default=INIT.layers,
                        help="decoder layers (~12 MB each): 48 makes ~610 MB, 10 buckets of 64 MB")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = 1 + args.receivers
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(_worker, args=(world, port, args, out), nprocs=world,
                       start_method="spawn")
    print(json.dumps({"bench": "weight_sync", "backend": "gloo", "receivers": args.receivers,
                      "path": "copy" if args.copy else "in place",
                      "threads": args.threads, "repeat": args.repeat,
                      "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), **out.get()}))


if __name__ == "__main__":
    main()
