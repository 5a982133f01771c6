"""Placement: which world ranks hold which role, with which parallel degrees.

The MPI world is always `trainer.ranks` trainers first, then `generator.ranks` generators,
then the ranks of each model placed `exclusive` (`models.<name>.placement`, in the order
reference, reward), in local `mpiexec` and in the Slurm MPMD step alike; this module is
the one place that arithmetic lives. The result is written to `RUN_DIR/plan.json` for
people and tools.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from hpcalign.config.schema import Config

# The flows' frozen models that may run on ranks of their own, in world order.
EXCLUSIVE_CAPABLE = ("reference", "reward")
REWARD_MODEL_FLOWS = ("ppo", "online_dpo")  # the built-in flows that judge with models.reward


@dataclass(frozen=True)
class RolePlacement:
    """One role's ranks and degrees. Plain torch backends: dp = ranks, tp = pp = 1.

    Generators with `generator.backend: vllm`: tp = `generator.vllm.tensor_parallel_size`,
    dp = ranks / tp engines, each over tp consecutive ranks (`tp_group`).
    """

    role: str
    first_rank: int
    ranks: int
    tp: int
    pp: int
    dp: int
    threads: int

    def world_ranks(self) -> list[int]:
        return list(range(self.first_rank, self.first_rank + self.ranks))

    def tp_group(self, world_rank: int) -> list[int]:
        """The world ranks of `world_rank`'s tensor-parallel group: tp consecutive ranks."""
        if world_rank not in self.world_ranks():
            raise ValueError(f"world rank {world_rank} is not a {self.role} rank "
                             f"({self.first_rank}..{self.first_rank + self.ranks - 1})")
        start = self.first_rank + (world_rank - self.first_rank) // self.tp * self.tp
        return list(range(start, start + self.tp))


@dataclass(frozen=True)
class Placement:
    world_size: int
    trainer: RolePlacement
    generator: RolePlacement
    models: tuple[RolePlacement, ...] = ()  # exclusive models, role = the model's name

    def groups(self) -> tuple[RolePlacement, ...]:
        """Every rank group in world order."""
        return (self.trainer, self.generator, *self.models)

    def group_of(self, world_rank: int) -> RolePlacement:
        if not 0 <= world_rank < self.world_size:
            raise ValueError(f"rank {world_rank} outside the world of {self.world_size}")
        return next(g for g in self.groups()
                    if g.first_rank <= world_rank < g.first_rank + g.ranks)

    def role_of(self, world_rank: int) -> str:
        """'trainer', 'generator', or the name of an exclusive model ('reference', ...)."""
        return self.group_of(world_rank).role

    def model(self, name: str) -> RolePlacement | None:
        """The exclusive placement of model `name` (None: colocated with the trainers)."""
        return next((m for m in self.models if m.role == name), None)

    def describe_rank(self, world_rank: int) -> str:
        """'generator 1 (world rank 2)': how errors name a rank."""
        group = self.group_of(world_rank)
        return f"{group.role} {world_rank - group.first_rank} (world rank {world_rank})"

    def to_dict(self) -> dict:
        body: dict[str, Any] = {"world_size": self.world_size, "trainer": asdict(self.trainer),
                                "generator": asdict(self.generator)}
        if self.models:
            body["models"] = {m.role: asdict(m) for m in self.models}
        return body


def trainer_degrees(backend: str, ranks: int, tp: int, pp: int) -> tuple[int, int, int]:
    """(tp, pp, dp) of the trainer ranks; ValueError naming the keys when they do not fit.

    megatron: ranks = tp x pp x dp; the torch engine is data parallel only (tp = pp = 1).
    """
    if backend != "megatron" and (tp, pp) != (1, 1):
        raise ValueError(f"trainer.tp={tp}, trainer.pp={pp}: model parallelism needs "
                         f"trainer.backend=megatron (trainer.backend={backend!r} is data "
                         "parallel only)")
    if ranks % (tp * pp):
        raise ValueError(f"trainer.ranks={ranks} must be a multiple of trainer.tp={tp} x "
                         f"trainer.pp={pp} = {tp * pp} (ranks = tp x pp x data parallel)")
    return tp, pp, ranks // (tp * pp)


def generator_degrees(backend: str, ranks: int, vllm_tp: int) -> tuple[int, int]:
    """(tp, dp) of the generator ranks; ValueError naming the keys when they do not fit.

    vllm: one engine per `generator.vllm.tensor_parallel_size` consecutive ranks; the torch
    engine is one per rank (the vllm section is ignored).
    """
    if backend != "vllm":
        return 1, ranks
    if ranks % vllm_tp:
        raise ValueError(f"generator.ranks={ranks} must be a multiple of "
                         f"generator.vllm.tensor_parallel_size={vllm_tp} (one vLLM engine "
                         f"per {vllm_tp} generator ranks)")
    return vllm_tp, ranks // vllm_tp


def exclusive_models(cfg: Config) -> list[tuple[str, Any]]:
    """(name, models.<name>) of the models on ranks of their own, in world order.

    ValueError naming the model and the fix where the placement cannot work.
    """
    placed = []
    for name in EXCLUSIVE_CAPABLE:
        model = getattr(cfg.models, name)
        if model is None or model.placement != "exclusive":
            continue
        if name == "reward" and cfg.algorithm not in REWARD_MODEL_FLOWS:
            raise ValueError(f"models.reward.placement=exclusive: only algorithm="
                             f"{' or '.join(REWARD_MODEL_FLOWS)} judges with a reward model "
                             f"(algorithm={cfg.algorithm})")
        if cfg.trainer.ranks % model.ranks:
            raise ValueError(f"models.{name}.ranks={model.ranks} must divide trainer.ranks="
                             f"{cfg.trainer.ranks} (trainer i is served by {name} rank i mod "
                             f"{model.ranks})")
        if cfg.trainer.backend != "torch":
            raise ValueError(f"models.{name}.placement=exclusive runs the torch engine; "
                             f"trainer.backend={cfg.trainer.backend} keeps it colocated")
        placed.append((name, model))
    reference = cfg.models.reference
    if reference is not None and reference.path is not None:
        raise ValueError(f"models.reference.path={reference.path!r}: the reference is the "
                         "policy's starting weights (after the SFT warm-up); remove the path")
    reward = cfg.models.reward
    if reward is not None and reward.path is None:
        raise ValueError("models.reward.path is missing: the reward model's HF directory "
                         "(e.g. from hpcalign train-rm)")
    return placed


def auto_threads(requested: int, concurrent_ranks: int) -> int:
    """`requested` torch threads, or (0) this process's cores shared by the ranks that run at once."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, concurrent_ranks))


def compute_placement(cfg: Config) -> Placement:
    """Ranks and degrees of every role.

    With `max_staleness: 0` trainers and generators alternate (one waits while the other
    computes), so each role may use all cores; with overlap they share them.
    """
    t, g = cfg.trainer.ranks, cfg.generator.ranks
    concurrent = max(t, g) if cfg.sync.max_staleness == 0 else t + g
    tp, pp, dp = trainer_degrees(cfg.trainer.backend, t, cfg.trainer.tp, cfg.trainer.pp)
    trainer = RolePlacement("trainer", 0, t, tp=tp, pp=pp, dp=dp,
                            threads=auto_threads(cfg.trainer.threads, concurrent))
    gen_tp, gen_dp = generator_degrees(cfg.generator.backend, g,
                                       cfg.generator.vllm.tensor_parallel_size)
    generator = RolePlacement("generator", t, g, tp=gen_tp, pp=1, dp=gen_dp,
                              threads=auto_threads(cfg.generator.threads, concurrent))
    models, first = [], t + g
    for name, model in exclusive_models(cfg):
        # an exclusive model computes while the trainers wait for it: the trainers' share
        models.append(RolePlacement(name, first, model.ranks, tp=1, pp=1, dp=model.ranks,
                                    threads=auto_threads(model.threads, concurrent)))
        first += model.ranks
    return Placement(world_size=first, trainer=trainer, generator=generator,
                     models=tuple(models))


# The built-in flows' named models beyond the policy (a user's flow lists its own in
# `Flow.models`, which the launcher does not import: plan.json shows its policy).
_FLOW_MODELS = {"grpo": ("reference",), "online_dpo": ("reference", "reward"),
                "ppo": ("reference", "reward", "value")}


def model_map(cfg: Config, placement: Placement) -> dict[str, dict[str, Any]]:
    """Every named model of the run's flow: what it runs with and where (plan.json,
    `hpcalign submit --dry-run`).

    Per model: `trainable`, its `engines` (training / generation), and per place it runs
    (`on`: the trainer ranks, the generator ranks, or ranks of its own) the world ranks,
    the degrees (tp, pp, dp) and, on Slurm, the het component with its partition and
    nodes. Colocated models share the trainer ranks (`colocated_with: policy`).
    """
    def where(group: RolePlacement, component: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"on": group.role, "world_ranks": group.world_ranks(),
                                 "tp": group.tp, "pp": group.pp, "dp": group.dp}
        comp = (getattr(cfg.slurm, component) if component in ("train", "gen")
                else cfg.slurm.model_component(component, group.ranks))
        entry["slurm"] = {"component": component, "partition": comp.partition,
                          "nodes": comp.nodes}
        return entry

    trainers = where(placement.trainer, "train")
    models: dict[str, dict[str, Any]] = {"policy": {
        "trainable": True, "path": cfg.model.path,
        "engines": {"training": cfg.trainer.backend, "generation": cfg.generator.backend},
        "runs_on": [trainers, where(placement.generator, "gen")]}}
    for name in _FLOW_MODELS.get(cfg.algorithm, ()):
        config = getattr(cfg.models, name, None)
        if name == "reward" and config is None:
            continue  # judged by the reward functions on the generators
        own = placement.model(name)
        entry: dict[str, Any] = {"trainable": name == "value"}
        if name == "reference":
            entry["path"] = "the policy's starting weights"
        elif config is not None:
            entry["path"] = config.path
        else:  # the critic without models.value: from the reward model, else the policy
            entry["path"] = (cfg.models.reward.path if cfg.models.reward is not None
                             else "the policy's starting weights")
        if own is not None:
            entry.update(engines={"training": "torch"}, placement="exclusive",
                         runs_on=[where(own, name)])
        elif name == "reference":  # built like the policy, on the same ranks
            entry.update(engines={"training": cfg.trainer.backend}, placement="colocated",
                         colocated_with="policy", runs_on=[trainers])
        else:  # a torch model on every trainer rank, each on its share of the batch
            entry.update(engines={"training": "torch"}, placement="colocated",
                         colocated_with="policy",
                         runs_on=[{**trainers, "tp": 1, "pp": 1,
                                   "dp": placement.trainer.ranks}])
        models[name] = entry
    return models


def describe_models(models: dict[str, dict[str, Any]]) -> list[str]:
    """One line per model of `model_map`: engines, ranks, degrees, partition and nodes."""
    lines = []
    for name, model in models.items():
        places = []
        for place, engine in zip(model["runs_on"], model["engines"].values()):
            ranks = place["world_ranks"]
            span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
            text = (f"{engine} on {place['on']} rank(s) {span} (tp {place['tp']}, pp "
                    f"{place['pp']}, dp {place['dp']})")
            if "slurm" in place and model.get("placement") != "colocated":
                slurm = place["slurm"]
                text += f" partition {slurm['partition']!r}, {slurm['nodes']} node(s)"
            places.append(text)
        kind = "trainable" if model["trainable"] else "frozen"
        where = ("colocated with " + model["colocated_with"] + ": "
                 if model.get("placement") == "colocated" else "")
        lines.append(f"{name:<10} {kind:<9} {where}{'; '.join(places)}")
    return lines
