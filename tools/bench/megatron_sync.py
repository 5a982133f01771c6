"""Publishing the policy from a megatron-core trainer (TP=2, TP=2 x PP=2) to a generator,
against a raw `dist.broadcast` of the same number of bytes in one tensor, in one run.

Each layout runs as one `mpiexec` world, laid out as in a run: T trainer ranks (the
megatron engine, its groups over the trainers) and 1 torch generator; the sync group is
trainer 0 + the generator, as in roles/main.py. Timed, alternately, order swapped every
repeat, from a barrier until the slowest rank is done:

- sync: `engine.weight_sender(bucket_mb).sync()` on every trainer rank (the resharding
  stream: each layer gathered from its TP/PP ranks to trainer 0, QKV and gate-up
  re-interleaved, HF names, coalesced buckets) → `NamedWeightReceiver.sync()` into the
  generator's torch engine by name;
- raw: trainer 0 broadcasts one preallocated float32 tensor of the model's byte count to
  the generator, which receives it into a preallocated buffer.

Two model sizes: the GRPO benchmark's (~4 M parameters) and a ~100 M one (hidden 1024,
8 layers). gloo on 127.0.0.1, 1 torch thread per rank (3 or 5 ranks on this machine).

    python tools/bench/megatron_sync.py                  # both layouts, both sizes
    python tools/bench/megatron_sync.py --layouts 2x1 --sizes small --repeat 5

Prints ONE JSON line. Target: sync <= 1.2 x raw.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from hpcalign.config.schema import ModelInit
from hpcalign.launch.local import run_mpiexec

SIZES = {
    "small": ModelInit(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024,
                       tie_embeddings=True, seed=0),
    "large": ModelInit(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816,
                       tie_embeddings=False, seed=0),
}


def _timed(fn, group) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def worker(model_dir: str, run_dir: str, tp: int, pp: int, repeat: int,
           bucket_mb: float) -> None:
    """One rank of the mpiexec world: trainers 0..T-1, the generator last."""
    import torch.distributed as dist
    from mpi4py import MPI

    from hpcalign.comm.control import Control
    from hpcalign.comm.weights import NamedWeightReceiver, init_distributed
    from hpcalign.config.schema import Config
    from hpcalign.engines import OptimizerSpec, build_generation_engine, build_training_engine

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    trainers = tp * pp
    init_distributed(Control(comm, 300, lambda r: f"rank {r}"), run_dir, "gloo", 300)
    torch.set_num_threads(1)
    sync_group = dist.new_group([0, *range(trainers, size)])
    dist.new_group(list(range(trainers)))  # the run's trainer group (roles/main.py)
    cfg = Config(run_dir=run_dir, model={"path": model_dir},
                 trainer={"backend": "megatron", "ranks": trainers, "tp": tp, "pp": pp},
                 generator={"ranks": size - trainers})
    if rank < trainers:
        engine = build_training_engine("megatron", model_dir, cfg,
                                       optimizer=OptimizerSpec(lr=1e-5))
        side = engine.weight_sender(bucket_mb, src=0, group=sync_group)
        nbytes = sum(torch.Size(s).numel() * d.itemsize for _, s, d in engine.hf_weight_spec())
    else:
        generator = build_generation_engine("torch", model_dir, cfg, device=torch.device("cpu"))
        side = NamedWeightReceiver(generator.weight_loader(), src=0, group=sync_group)
        nbytes = sum(p.numel() * p.element_size() for p in generator.model.parameters())
    side.sync()  # the spec, buffers allocated: not timed
    raw_buffer = torch.zeros(nbytes // 4, dtype=torch.float32)

    def raw() -> None:
        if rank == 0 or rank >= trainers:
            dist.broadcast(raw_buffer, src=0, group=sync_group)

    times: dict[str, list[float]] = {"raw": [], "sync": []}
    for index in range(repeat):
        order = [("raw", raw), ("sync", side.sync)]
        for what, fn in order if index % 2 == 0 else order[::-1]:
            times[what].append(_timed(fn, None))
    if rank == 0:
        raw_s, sync_s = (statistics.median(times[k]) for k in ("raw", "sync"))
        print(json.dumps({"model_mb": round(nbytes / 2**20, 1), "raw_s": round(raw_s, 4),
                          "sync_s": round(sync_s, 4), "ratio": round(sync_s / raw_s, 3),
                          "raw_gb_s": round(nbytes / 1e9 / raw_s, 2),
                          "raw_all_s": [round(t, 4) for t in times["raw"]],
                          "sync_all_s": [round(t, 4) for t in times["sync"]]}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def run_layout(model_dir: str, workdir: str, tp: int, pp: int, repeat: int,
               bucket_mb: float) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    argv = [exe, "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    run_dir = tempfile.mkdtemp(dir=workdir)
    argv += ["-n", str(tp * pp + 1), sys.executable, os.path.abspath(__file__), "--worker",
             model_dir, run_dir, str(tp), str(pp), str(repeat), str(bucket_mb)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = run_mpiexec(argv, env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-6000:])
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model_dir, run_dir, tp, pp, repeat, bucket_mb = sys.argv[2:8]
        worker(model_dir, run_dir, int(tp), int(pp), int(repeat), float(bucket_mb))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["2x1", "2x2"], help="TPxPP")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "large"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    args = parser.parse_args()
    from hpcalign.models.tiny import init_model

    result: dict = {"bench": "megatron_sync", "backend": "gloo", "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "repeat": args.repeat,
                    "bucket_mb": args.bucket_mb, "results": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes:
            model_dir = os.path.join(workdir, size)
            init_model(model_dir, SIZES[size])
            for layout in args.layouts:
                tp, pp = (int(x) for x in layout.split("x"))
                result["results"][f"{size}-tp{tp}-pp{pp}"] = run_layout(
                    model_dir, workdir, tp, pp, args.repeat, args.bucket_mb)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
