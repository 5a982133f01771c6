"""Run under mpiexec -n 3: rank 0 broadcasts random weights in tiny buckets; others check.

Exit status 0 only if every receiver ends with bitwise the sender's tensors, and the
allreduce of gradients sums them exactly.
"""

import sys
import tempfile

import torch
import torch.distributed as dist
from mpi4py import MPI

from hpcalign.comm.control import Control
from hpcalign.comm.weights import WeightBroadcaster, allreduce_gradients, init_distributed


def main() -> int:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    control = Control(comm, 30, lambda r: f"rank {r}")
    run_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    backend = sys.argv[2] if len(sys.argv) > 2 else "gloo"
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else None
    assert init_distributed(control, run_dir, backend, 30, device, f"rank {rank}") == backend
    torch.manual_seed(rank)  # different on every rank before the sync
    shapes = [(7, 3), (128,), (33, 65), (1,), (300, 17)]
    params = [torch.randn(s) for s in shapes] + [torch.randn(5, 5).double()]
    params = [p.to(device) if device is not None else p for p in params]
    broadcaster = WeightBroadcaster(params, bucket_mb=0.01, src=0, group=None)
    assert len(broadcaster.buckets) >= 3, broadcaster.buckets
    broadcaster.broadcast()
    torch.manual_seed(0)
    expected = [torch.randn(s) for s in shapes] + [torch.randn(5, 5).double()]
    expected = [e.to(device) if device is not None else e for e in expected]
    ok = all(torch.equal(p, e) for p, e in zip(params, expected))
    for p in params:
        p.grad = torch.full_like(p, float(rank + 1))
    allreduce_gradients(params, None)
    total = sum(r + 1 for r in range(comm.Get_size()))
    ok = ok and all(torch.equal(p.grad, torch.full_like(p, float(total))) for p in params)
    oks = comm.allgather(ok)
    dist.destroy_process_group()
    if rank == 0:
        print(f"weight_sync ranks ok: {oks}", flush=True)
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
