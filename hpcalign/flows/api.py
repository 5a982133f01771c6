"""Flows: an online algorithm as plain Python over named models (`algorithm:` in the config).

ChatLearn splits an RLHF algorithm into an *environment* part (make experience: sample
completions, score them) and a *trainer* part (update the trainable models), plus the
weight syncs it declares. In hpcalign the environment part runs on the generator ranks —
the policy's generation engine samples each step's prompt groups and the reward functions
score them into an HDF5 shard — and a flow is the trainer part: what the trainer ranks do
with one step's experience.

    from hpcalign.flows import Flow, FlowResult, Step

    class MyFlow(Flow):
        models = ("policy",)                       # what the trainer builds for it
        def train(self, experience):               # one step's rollouts
            policy = self.ctx.models["policy"]     # a training engine (hpcalign.engines)
            ...                                    # engine.pack / logprobs / train_step
            return FlowResult(result, {"my_metric": 1.0})

    # config: algorithm: mypkg.flows:MyFlow   (+ flow: {key: value} -> MyFlow(**flow))

The built-in flows are written the same way: `grpo` (flows/grpo.py), `online_dpo`
(flows/online_dpo.py), `ppo` (flows/ppo.py); examples/raft_flow.py is a user's. Named
models: `policy` (trainable, its generation engine on the generator ranks), `reference`
(the policy's starting weights, frozen), and whatever a flow builds itself in `setup`
(PPO's `reward` and `value`) and saves in the policy's checkpoint (`save`/`restore`).

No central driver: every rank derives the flow's static schedule (`Flow.schedule()`, the
same for every step, never data-dependent) and its digest; at start-up world rank 0
sends its digest to every rank, and a rank whose own differs (another code version, a flow
whose schedule depends on where it runs) fails by name before any collective is joined
(`check_schedule`), never a hang.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from hpcalign.engines.base import TrainStepResult

ENVIRONMENT, TRAINER, SYNC = "environment", "trainer", "sync"


@dataclass(frozen=True)
class Step:
    """One entry of a flow's schedule: `model` does `op` on the ranks `where`."""

    phase: str  # environment | trainer | sync
    model: str
    op: str
    where: str  # generators | trainers | trainers->generators


@dataclass(frozen=True)
class Experience:
    """One step's rollouts, as the generators' shards hold them (whole step, every rank).

    A group is one prompt's samples: `group_ids[i]` is the prompt row of sample i, equal
    rows are adjacent. `rewards` are NaN where no reward function applied.
    """

    step: int
    rewards: torch.Tensor  # [N] float
    group_ids: torch.Tensor  # [N] int
    prompts: list[np.ndarray]  # N prompt token ids
    completions: list[np.ndarray]  # N completion token ids (EOS included when sampled)
    old_logprobs: list[np.ndarray]  # N per-token log-probs of the sampling policy

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, keep: list[int]) -> Experience:
        """The samples `keep`, in that order."""
        return Experience(self.step, self.rewards[keep], self.group_ids[keep],
                          *([seq[i] for i in keep] for seq in
                            (self.prompts, self.completions, self.old_logprobs)))


@dataclass(frozen=True)
class FlowResult:
    """A step's update (`TrainStepResult`: summed loss metrics, grad norm) and the flow's
    own metrics for the step's line of metrics.jsonl."""

    result: TrainStepResult
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def skipped(cls, **metrics: float) -> FlowResult:
        """No update this step (nothing to learn from): NaN loss metrics."""
        return cls(TrainStepResult(metrics={"kl": float("nan")}, grad_norm=float("nan")),
                   metrics)


@dataclass
class FlowContext:
    """What a flow may use on its trainer rank.

    Data parallel: every trainer rank sees the whole step; each data-parallel replica
    (`dp_index` of `dp_size`) updates on its `share(n)`, and the engines sum gradients
    over the replicas (a megatron replica's TP/PP ranks take the same share).
    """

    cfg: Any  # hpcalign.config.schema.Config
    models: dict[str, Any]  # name -> training engine: "policy" (with optimizer), "reference"
    device: torch.device
    run_dir: str
    reference_dir: str  # the policy's starting weights (after the SFT warm-up)
    trainer_ranks: int
    trainer_group: Any  # torch.distributed group of every trainer rank
    dp_size: int
    dp_index: int
    dp_group: Any  # torch.distributed group of the data-parallel replicas
    fault_hook: Any = None  # (step) -> None, after the backward pass (fault injection)

    def share(self, n: int) -> np.ndarray:
        """This replica's contiguous slice of n samples (or pairs)."""
        return np.array_split(np.arange(n), self.dp_size)[self.dp_index]

    def after_backward(self, step: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook(step)


class Flow:
    """Base of every flow. Subclasses set `models` and implement `train`."""

    models: tuple[str, ...] = ("policy", "reference")
    """Named models the trainer builds before `setup` (of registry.MODEL_NAMES)."""
    has_state: bool = False
    """True when `save`/`restore` hold state of the flow's own (its extra models)."""

    def setup(self, ctx: FlowContext) -> None:
        """Called once on every trainer rank, before a resume's `restore`."""
        self.ctx = ctx

    def train(self, experience: Experience) -> FlowResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.train")

    def save(self, directory: str) -> None:
        """Write the flow's own state into the checkpoint being written at `directory`."""

    def restore(self, directory: str) -> None:
        """Read what `save` wrote into the checkpoint `directory`."""

    def schedule(self) -> tuple[Step, ...]:
        """One step's work, in order: the environment part on the generators, this
        flow's trainer part, the policy's sync. Static: the same on every rank and step."""
        trainer = [Step(TRAINER, name, "logprobs", "trainers")
                   for name in self.models if name != "policy"]
        return (Step(ENVIRONMENT, "policy", "generate", "generators"),
                Step(ENVIRONMENT, "reward_functions", "score", "generators"),
                *trainer, Step(TRAINER, "policy", "train", "trainers"),
                Step(SYNC, "policy", "weights", "trainers->generators"))


def schedule_digest(flow: Flow, placement: dict[str, Any]) -> str:
    """SHA-256 over the flow's identity, models, schedule and the placement."""
    body = {"flow": f"{type(flow).__module__}.{type(flow).__qualname__}",
            "models": list(flow.models), "schedule": [asdict(s) for s in flow.schedule()],
            "placement": placement}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_schedule(own: str, leader: str, who: str) -> None:
    """Raise, naming this rank, when its schedule digest is not world rank 0's."""
    if own != leader:
        raise RuntimeError(
            f"{who} derived another schedule for this run's flow than world rank 0 "
            f"(digest {own[:12]} vs {leader[:12]}): every rank must run the same hpcalign "
            "and flow code with the same config (check PYTHONPATH and installed versions "
            "on every node)")
