"""Run under mpiexec -n TP: the megatron engine's full logits of a fixed batch (PP = 1).

argv: MODEL (HF directory or `hpcalign convert` output) OUT_DIR TP. The frozen engine's
GPTModel runs one forward; the vocabulary-sharded logits are gathered over TP here (only
to compare them: the engine itself never gathers them), the padding cut off, and rank 0
writes OUT_DIR/logits.safetensors together with the padded vocabulary size.
"""

import os
import sys

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from mpi4py import MPI
from safetensors.torch import save_file

from hpcalign.comm.control import Control
from hpcalign.comm.weights import init_distributed
from hpcalign.config.schema import Config
from hpcalign.engines import build_training_engine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_case import fixed_ids  # noqa: E402


def main() -> int:
    model, out_dir, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    comm = MPI.COMM_WORLD
    init_distributed(Control(comm, 60, lambda r: f"rank {r}"), out_dir, "gloo", 60)
    cfg = Config(run_dir=out_dir, model={"path": model},
                 trainer={"backend": "megatron", "ranks": comm.Get_size(), "tp": tp})
    engine = build_training_engine("megatron", model, cfg)
    ids = fixed_ids(engine.shape.vocab)
    seq = ids.shape[1]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        shard = engine.module(ids, torch.arange(seq)[None].expand(3, -1), causal)
        logits = gather_from_tensor_model_parallel_region(shard)
    if comm.Get_rank() == 0:
        save_file({"logits": logits[..., : engine.shape.vocab].float().contiguous(),
                   "padded_vocab": torch.tensor(logits.shape[-1])},
                  os.path.join(out_dir, "logits.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
