"""Run under mpiexec -n T+G: a megatron trainer (T ranks, TP x PP) beside G torch generators.

argv: MODEL_DIR OUT_DIR T TP PP. The world is laid out as in a run (trainers are world
ranks 0..T-1, generators T..; every rank creates the run's two groups first, as
roles/main.py does). The trainer ranks build the megatron engine (its groups over the
trainers only), take one GRPO step (so the weights are no longer the files'), and sync
twice to the generators through `weight_sender` in small buckets (many buckets, layers
split across them); the generators receive with `NamedWeightReceiver` into a torch
generation engine. Then the trainers write the model as a megatron dist checkpoint
(OUT_DIR/megatron, for `hpcalign convert megatron-to-hf`) and through `save_model`
(OUT_DIR/saved), and each generator writes its model's state dict
(OUT_DIR/generator-RANK.safetensors). The test compares them.
"""

import os
import sys

import torch
import torch.distributed as dist
from mpi4py import MPI
from safetensors.torch import save_file

from hpcalign.comm.control import Control
from hpcalign.comm.weights import NamedWeightReceiver, init_distributed
from hpcalign.config.schema import Config
from hpcalign.engines import build_generation_engine, build_training_engine
from hpcalign.engines.megatron.checkpoint import save_dist_checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_case import SPEC, TEMPERATURE, batches, loss_fn_for, reference_inputs  # noqa: E402


def main() -> int:
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    trainers, tp, pp = (int(a) for a in sys.argv[3:6])
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    control = Control(comm, 60, lambda r: f"rank {r}")
    init_distributed(control, out_dir, "gloo", 60)
    torch.set_num_threads(1)
    sync_group = dist.new_group([0, *range(trainers, size)])
    dist.new_group(list(range(trainers)))  # the run's trainer group (roles/main.py)
    cfg = Config(run_dir=out_dir, model={"path": model_dir},
                 trainer={"backend": "megatron", "ranks": trainers, "tp": tp, "pp": pp},
                 generator={"ranks": size - trainers})
    if rank < trainers:
        engine = build_training_engine("megatron", model_dir, cfg, optimizer=SPEC)
        packed, advantages, noise = batches(engine)
        olds, refs, _ = reference_inputs(engine, packed, noise)
        engine.train_step(packed, loss_fn_for(packed, advantages, olds, refs),
                          temperature=TEMPERATURE, with_entropy=True)
        sender = engine.weight_sender(bucket_mb=0.02, src=0, group=sync_group)
        sender.sync()
        sender.sync()  # the second sync reuses the first one's spec
        meta = {"shape": engine.shape.to_dict(), "padded_vocab": engine.padded_vocab,
                "tp": tp, "pp": pp, "dtype": "float32"}
        save_dist_checkpoint(engine.module, os.path.join(out_dir, "megatron"), meta,
                             source_dir=engine.source_dir)
        engine.save_model(os.path.join(out_dir, "saved"))
    else:
        generator = build_generation_engine("torch", model_dir, cfg, device=torch.device("cpu"))
        receiver = NamedWeightReceiver(generator.weight_loader(), src=0, group=sync_group)
        receiver.sync()
        receiver.sync()
        state = {k: v.detach().clone().contiguous()
                 for k, v in generator.model.state_dict().items()}
        if generator.model.config.tie_word_embeddings:
            del state["lm_head.weight"]  # tied: the embedding under a second name
        save_file(state, os.path.join(out_dir, f"generator-{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
