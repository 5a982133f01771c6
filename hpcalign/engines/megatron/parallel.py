"""megatron-core's process groups for a trainer layout, and the collectives over them.

This is the megatron backend's one function from degrees to groups (STYLE rule 4): the
degrees themselves come from `hpcalign.plan.placement` (`RolePlacement.tp/pp/dp`);
`init_model_parallel` hands them to `parallel_state.initialize_model_parallel` and
seeds megatron's RNG streams. `hf_stream` is how a sharded model reaches world rank 0 as
HF-named whole tensors, one layer at a time (the weight sync, `save_model`, the eval copy);
`global_state` gathers it whole on every rank (`named_weights`, tests).

Beside generator ranks (a run: trainers are world ranks 0..T-1, generators T..): megatron
0.16 takes the *default* group for the training world in more places than its
`ProcessGroupCollection` reaches: `initialize_model_parallel` lays its groups over
`get_world_size()`, `get_megatron_optimizer` all-gathers its parameter groups over the
default group, and `dist_checkpointing` (validation, common state, the torch DCP planner)
runs barriers and object collectives on it; megatron only threaded groups through its
checkpoint paths after 0.16 (NVIDIA/Megatron-LM PR #5486). `megatron_world()` makes the
trainer ranks' own group the default one on those ranks while megatron runs, so none of
that waits for generators. It is exact because the trainers are the world's first T
ranks: their rank in that group is their world rank, so every rank megatron computes or
records (group members, p2p peers, checkpoint writers) is the same number in both.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
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


_TRAINER_WORLD: dist.ProcessGroup | None = None  # world ranks 0..T-1 when T < world size


def set_trainer_world(ranks: int | None) -> None:
    """Megatron's world = world ranks 0..ranks-1 (None or the world size: all of it).

    Called on the trainer ranks only, before any megatron group exists. The generator
    ranks take no part in creating it, nor in any group megatron then creates
    (`megatron_world`): a gloo/NCCL group is built by its members alone (torch's barrier
    after group creation is off unless TORCH_DIST_INIT_BARRIER=1).

    NOTE: not `use_local_synchronization=True`: torch names such a group by a hash of its
    ranks and of how many groups this process is a member of, which differs between the
    trainers (rank 0 is also in the sync group), so their rendezvous never meets (seen:
    both trainers waiting in ProcessGroupGloo's constructor). Groups numbered by torch's
    counter match among the trainers, who all create the same ones in the same order.
    """
    global _TRAINER_WORLD
    ensure_world()
    world = dist.get_world_size()
    if ranks is None or ranks == world:
        return
    if not 0 < ranks < world or dist.get_rank() >= ranks:
        raise ValueError(f"world rank {dist.get_rank()} of {world}: megatron's ranks must be "
                         f"world ranks 0..{ranks - 1} (trainers first)")
    if _TRAINER_WORLD is None:
        _TRAINER_WORLD = dist.new_group(list(range(ranks)))
    elif dist.get_world_size(_TRAINER_WORLD) != ranks:
        raise ValueError(f"megatron's world is already {dist.get_world_size(_TRAINER_WORLD)} "
                         f"ranks, asked for {ranks}")


@contextlib.contextmanager
def megatron_world() -> Iterator[None]:
    """Inside: torch.distributed's default group is the trainer ranks' group (module
    docstring says why); a no-op when the trainers are the whole world. Nests.

    NOTE: groups megatron creates inside are numbered by the trainers alone, so after
    megatron's set-up no group may be created by every world rank together (hpcalign
    creates its world-wide groups in roles/main.py, before any role runs).
    """
    if _TRAINER_WORLD is None:
        yield
        return
    outer = dist.GroupMember.WORLD
    dist.GroupMember.WORLD = _TRAINER_WORLD
    try:
        yield
    finally:
        dist.GroupMember.WORLD = outer


def init_model_parallel(tp: int, pp: int, seed: int) -> Ranks:
    """megatron's TP/PP/DP groups over megatron's world (once per process): the whole
    torch.distributed world, or the trainer ranks after `set_trainer_world`."""
    with megatron_world():
        return _init_model_parallel(tp, pp, seed)


def _init_model_parallel(tp: int, pp: int, seed: int) -> Ranks:
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


def _tp_gather_to(tensor: torch.Tensor, name: str, ranks: Ranks) -> torch.Tensor | None:
    """The global tensor `name` on TP rank 0 of this rank's TP group (None elsewhere)."""
    from megatron.core import parallel_state as ps

    if ranks.tp == 1 or not W.tp_split(name):
        return tensor if ranks.tp_rank == 0 else None
    group = ps.get_tensor_model_parallel_group()
    leader = dist.get_process_group_ranks(group)[0]
    if ranks.tp_rank != 0:
        dist.gather(tensor.contiguous(), None, dst=leader, group=group)
        return None
    shards = [torch.empty_like(tensor) for _ in range(ranks.tp)]
    dist.gather(tensor.contiguous(), shards, dst=leader, group=group)
    return W.unshard(shards, name)


def hf_stream(local: dict[str, torch.Tensor], shape: GptShape, padded_vocab: int,
              ranks: Ranks) -> Iterator[tuple[str, torch.Tensor]]:
    """The model as HF-named whole tensors on world rank 0, one unit at a time.

    Collective over the first data-parallel replica (the other replicas hold the same
    weights and return at once); only world rank 0 (stage 0, TP rank 0) yields anything.
    Unit by unit (`weights.sync_units`: the embedding, each layer, the final norm and
    head): the stage holding it gathers its TP shards onto its TP rank 0, which sends the
    whole tensors to rank 0 over the PP group when it is another stage; rank 0 re-fuses
    them into HF names (`weights.unit_to_hf`: QKV split per KV group, gate/up split) and
    yields them. No rank ever holds more than one unit beyond its own shard, so a consumer
    that sends or writes each tensor before asking for the next keeps memory at one layer.
    """
    from megatron.core import parallel_state as ps

    if ranks.dp_rank != 0:
        return
    leader = ranks.pp_rank == 0 and ranks.tp_rank == 0
    if leader and dist.get_rank() != 0:
        raise RuntimeError(f"world rank {dist.get_rank()} is megatron's first rank; the "
                           "weights are gathered on world rank 0")
    pp_group = ps.get_pipeline_model_parallel_group() if ranks.pp > 1 else None
    sizes = W.global_shapes(shape, padded_vocab)
    some = next(iter(local.values()))
    first = W.stage_layers(shape, ranks.pp, ranks.pp_rank).start
    for stage, names in W.sync_units(shape, ranks.pp):
        unit: dict[str, torch.Tensor] = {}
        if stage == ranks.pp_rank:
            for name in names:
                whole = _tp_gather_to(local[W.local_name(name, first)], name, ranks)
                if whole is not None:
                    unit[name] = whole
            if stage != 0 and ranks.tp_rank == 0:
                for name in names:  # this stage's TP rank 0 -> rank 0, in name order
                    dist.send(unit[name].contiguous(), dst=pp_source(0), group=pp_group)
        elif leader:
            for name in names:
                unit[name] = torch.empty(sizes[name], dtype=some.dtype, device=some.device)
                dist.recv(unit[name], src=pp_source(stage), group=pp_group)
        if leader:
            yield from W.unit_to_hf(unit, names, shape).items()


def global_state(local: dict[str, torch.Tensor], shape: GptShape, padded_vocab: int,
                 ranks: Ranks) -> dict[str, torch.Tensor]:
    """The whole global megatron state dict on every rank of the pipeline.

    `local` is this rank's megatron state dict (local names, TP shards). Stage by stage, in
    the fixed name order of `weights.global_names_of_stage`: TP all-gather, then broadcast
    over the PP group.
    NOTE: this materialises the whole model on every rank (tests, `named_weights`); the
    weight sync, `save_model` and the eval copy take `hf_stream`, one unit at a time.
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
