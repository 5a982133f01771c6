"""megatron-core's process groups for a trainer layout, and the collectives over them.

This is the megatron backend's one function from degrees to groups (STYLE rule 4): the
degrees themselves come from `hpcalign.plan.placement` (`RolePlacement.tp/pp/dp`);
`init_model_parallel` hands them to `parallel_state.initialize_model_parallel` and
seeds megatron's RNG streams. `global_state` is how a sharded model becomes whole
tensors again (TP all-gather per tensor, PP broadcast per stage), for `named_weights`,
`save_model` and the conversion command.

NOTE: megatron's parallel state spans the whole torch.distributed world, so the trainer
ranks must be the whole world (tests, `hpcalign convert`). Running beside generator ranks
in one world needs the groups built over a subset (megatron 0.16's
`ProcessGroupCollection`); see the TODO in the engine's docstring.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpcalign.engines.megatron import compat
from hpcalign.engines.megatron import weights as W
from hpcalign.engines.megatron.model import GptShape


@dataclass(frozen=True, slots=True)
class Ranks:
    """This rank's coordinates in the megatron layout."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def ensure_world() -> None:
    """A torch.distributed world of one (gloo, file store) when none exists: a single
    process (`hpcalign convert`, a unit test) still needs megatron's groups."""
    if dist.is_initialized():
        return
    store = os.path.join(tempfile.mkdtemp(prefix="hpcalign-megatron-"), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def init_model_parallel(tp: int, pp: int, seed: int) -> Ranks:
    """megatron's TP/PP/DP groups over the torch.distributed world (once per process)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    compat.apply()
    ensure_world()
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world of {world} ranks is not a multiple of tp={tp} x pp={pp}")
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ValueError(f"megatron groups already built for tp x pp = {have}, "
                             f"asked for {(tp, pp)}")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                     pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_ranks()


def current_ranks() -> Ranks:
    from megatron.core import parallel_state as ps

    return Ranks(tp=ps.get_tensor_model_parallel_world_size(),
                 pp=ps.get_pipeline_model_parallel_world_size(),
                 dp=ps.get_data_parallel_world_size(),
                 tp_rank=ps.get_tensor_model_parallel_rank(),
                 pp_rank=ps.get_pipeline_model_parallel_rank(),
                 dp_rank=ps.get_data_parallel_rank())


def pp_source(stage: int) -> int:
    """The global rank of PP stage `stage` in this rank's pipeline."""
    from megatron.core import parallel_state as ps

    return dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[stage]


def broadcast_from_last_stage(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """`tensor` (same shape and dtype on every stage) as the last PP stage holds it."""
    from megatron.core import parallel_state as ps

    if ranks.pp > 1:
        dist.broadcast(tensor, src=pp_source(ranks.pp - 1),
                       group=ps.get_pipeline_model_parallel_group())
    return tensor


def _tp_gather(tensor: torch.Tensor, name: str, ranks: Ranks) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ranks.tp == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(ranks.tp)]
    dist.all_gather(shards, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return W.unshard(shards, name)


def global_state(local: dict[str, torch.Tensor], shape: GptShape, padded_vocab: int,
                 ranks: Ranks) -> dict[str, torch.Tensor]:
    """The whole global megatron state dict on every rank of the pipeline.

    `local` is this rank's megatron state dict (local names, TP shards). Stage by stage, in
    the fixed name order of `weights.global_names_of_stage`: TP all-gather, then broadcast
    over the PP group.
    TODO: this materialises the whole model on every rank; the resharding weight sync
    (issue 10 part 4) sends per layer instead.
    """
    from megatron.core import parallel_state as ps

    out: dict[str, torch.Tensor] = {}
    sizes = W.global_shapes(shape, padded_vocab)
    some = next(iter(local.values()))
    for stage in range(ranks.pp):
        first = W.stage_layers(shape, ranks.pp, stage).start
        for name in W.global_names_of_stage(shape, ranks.pp, stage):
            if stage == ranks.pp_rank:
                tensor = _tp_gather(local[W.local_name(name, first)], name, ranks)
            else:
                tensor = torch.empty(sizes[name], dtype=some.dtype, device=some.device)
            if ranks.pp > 1:
                dist.broadcast(tensor, src=pp_source(stage),
                               group=ps.get_pipeline_model_parallel_group())
            out[name] = tensor
    return out
