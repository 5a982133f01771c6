"""Run under mpiexec -n tp*pp*dp: the megatron engine's log-probs and one GRPO step.

argv: MODEL_DIR OUT_DIR TP PP [gloo|nccl]. Every rank builds the engine for layout TP x PP (DP = the
rest); rank 0 writes OUT_DIR/result.safetensors: the log-probs and entropies of a fixed
batch before the step, the weights (HF names) after one train_step of a GRPO loss over
two micro-batches of different shapes, and the step's metrics and grad norm. With DP = 2
each data-parallel rank takes one of the two micro-batches (their gradients must add up
to the single-rank step). The test compares layouts with each other and with the torch
engine (the case itself: tests/integration/megatron_case.py).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from mpi4py import MPI
from safetensors.torch import save_file

from hpcalign.comm.control import Control
from hpcalign.comm.weights import init_distributed
from hpcalign.config.schema import Config
from hpcalign.engines import build_training_engine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_case import SPEC, TEMPERATURE, batches, loss_fn_for, reference_inputs  # noqa: E402


def main() -> int:
    model_dir, out_dir, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    backend = sys.argv[5] if len(sys.argv) > 5 else "gloo"  # nccl: tests/gpu/
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    control = Control(comm, 60, lambda r: f"rank {r}")
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else None
    init_distributed(control, out_dir, backend, 60, device)
    torch.set_num_threads(1)
    cfg = Config(run_dir=out_dir, model={"path": model_dir},
                 trainer={"backend": "megatron", "ranks": comm.Get_size(), "tp": tp, "pp": pp})
    engine = build_training_engine("megatron", model_dir, cfg, optimizer=SPEC)
    packed, advantages, noise = batches(engine)
    olds, refs, entropies = reference_inputs(engine, packed, noise)
    loss_fn = loss_fn_for(packed, advantages, olds, refs)
    dp, dp_rank = engine.ranks.dp, engine.ranks.dp_rank
    mine = [0, 1] if dp == 1 else [dp_rank]  # DP = 2: one micro-batch per replica

    def my_loss(index, batch, logp, entropy):
        return loss_fn(mine[index], batch, logp, entropy)

    result = engine.train_step([packed[i] for i in mine], my_loss, temperature=TEMPERATURE,
                               with_entropy=True)
    named = dict(engine.named_weights())
    if rank == 0:
        tensors = {f"weights/{k}": v.contiguous().cpu() for k, v in named.items()}
        for i in range(2):
            tensors[f"logp/{i}"], tensors[f"entropy/{i}"] = olds[i].cpu(), entropies[i].cpu()
        save_file(tensors, os.path.join(out_dir, "result.safetensors"))
        with open(os.path.join(out_dir, "metrics.json"), "w") as handle:
            json.dump({**result.metrics, "grad_norm": result.grad_norm}, handle)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
