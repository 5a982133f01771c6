"""Run under mpiexec -n TP*PP: one step, checkpoint (`save`) or restore (`load`), one step.

argv: MODEL_DIR RUN_DIR TP save|load [PP, default 1]. `save` trains one step of the shared case, writes
checkpoint step 1, trains a second step; `load` (at any TP) restores checkpoint 1 and
trains the second step. Rank 0 writes RUN_DIR/after-MODE.safetensors (HF names) and
RUN_DIR/state-MODE.json: a resumed run continues the saved one even at another layout.
"""

import json
import os
import sys

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
    model_dir, run_dir, tp, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    pp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    comm = MPI.COMM_WORLD
    init_distributed(Control(comm, 60, lambda r: f"rank {r}"), run_dir, "gloo", 60)
    cfg = Config(run_dir=run_dir, model={"path": model_dir},
                 trainer={"backend": "megatron", "ranks": comm.Get_size(), "tp": tp, "pp": pp})
    engine = build_training_engine("megatron", model_dir, cfg, optimizer=SPEC)
    packed, advantages, noise = batches(engine)

    def step():
        olds, refs, _ = reference_inputs(engine, packed, noise)
        return engine.train_step(packed, loss_fn_for(packed, advantages, olds, refs),
                                 temperature=TEMPERATURE, with_entropy=True)

    if mode == "save":
        step()
        engine.save_checkpoint(run_dir, 1, {"step": 1, "policy_version": 1}, keep=2)
        state = {"step": 1, "policy_version": 1}
    else:
        state = engine.load_checkpoint(run_dir, 1)
    result = step()
    named = dict(engine.named_weights())
    if comm.Get_rank() == 0:
        save_file({k: v.contiguous() for k, v in named.items()},
                  os.path.join(run_dir, f"after-{mode}.safetensors"))
        with open(os.path.join(run_dir, f"state-{mode}.json"), "w") as handle:
            json.dump({"state": state, "grad_norm": result.grad_norm, **result.metrics}, handle)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # megatron's checkpoint writer starts processes
    sys.exit(main())
