"""An exclusive model's rank: serve the trainers' requests until the run ends.

`models.reference.placement: exclusive` (or `models.reward`, for PPO) gives a frozen model
ranks of its own after the generators. Rank r of it serves trainers r, r + R, r + 2R, ...
(R = its ranks) in a fixed loop over them: each request is a header on the control plane
and a packed batch over torch.distributed (comm/model_service.py); the answer is one
float32 tensor. The reference waits for the trainer leader's "load" (its weights are the
policy's starting point, which the SFT warm-up may write first); a reward model loads its
own `models.reward.path` at once. Waits are bounded (`comm.timeout_s` between requests,
`comm.startup_timeout_s` for the first), and the leader's "stop" ends the loop.
"""

from __future__ import annotations

import logging
import time

import torch

from hpcalign.comm.control import TAG_MODEL
from hpcalign.comm.model_service import recv_batch
from hpcalign.errors import ProtocolError, RoleTimeoutError
from hpcalign.roles.context import RoleContext

log = logging.getLogger(__name__)
_SLEEP_S = (0.0002, 0.005)


class ModelServer:
    def __init__(self, ctx: RoleContext, name: str, wire: torch.device) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.name = name
        self.wire = wire
        group = ctx.placement.model(name)
        assert group is not None, name
        index = ctx.rank - group.first_rank
        trainers = ctx.placement.trainer.world_ranks()
        self.clients = [t for i, t in enumerate(trainers) if i % group.ranks == index]
        self.leader = trainers[0]
        self.engine = None
        self.built_from: str | None = None
        self.served = 0

    def _build(self, path: str) -> None:
        if self.engine is not None and path == self.built_from:
            return  # every trainer it serves sends "load" before its first request
        self.built_from = path
        device = self.ctx.device
        if self.name == "reference":
            from hpcalign.engines import build_training_engine

            self.engine = build_training_engine("torch", path, self.cfg, device=device)
        else:
            from hpcalign.models.reward_model import load_reward_model

            model = load_reward_model(path, self.cfg.models.reward.dtype, seed=self.cfg.seed)
            self.engine = model.to(device).eval().requires_grad_(False)
        log.info("%s: built from %s", self.ctx.placement.describe_rank(self.ctx.rank), path)

    def _next(self, timeout_s: float) -> tuple[int, dict]:
        """The next request of any client (the leader's "stop" included), bounded."""
        control = self.ctx.control
        sources = list(dict.fromkeys([*self.clients, self.leader]))
        deadline = time.monotonic() + timeout_s
        sleep = _SLEEP_S[0]
        while True:
            for source in sources:
                message = control.poll(source, TAG_MODEL)
                if message is not None:
                    return source, message
            if time.monotonic() > deadline:
                names = ", ".join(self.ctx.placement.describe_rank(s) for s in sources)
                raise RoleTimeoutError(
                    f"{self.ctx.placement.describe_rank(self.ctx.rank)} waited {timeout_s:.0f} s "
                    f"for a request from {names}, which sent nothing: hung, dead or too slow "
                    "(raise comm.timeout_s if it is only slow)")
            time.sleep(sleep)
            sleep = min(sleep * 1.5, _SLEEP_S[1])

    def _answer(self, source: int, message: dict) -> None:
        if self.engine is None:
            raise ProtocolError(f"{self.name} got {message['op']!r} from "
                                f"{self.ctx.placement.describe_rank(source)} before 'load'")
        batch = {k: v.to(self.ctx.device)
                 for k, v in recv_batch(message["tensors"], source, self.wire).items()}
        with torch.no_grad():
            if message["op"] == "logprobs":
                answer = self.engine.logprobs(batch, temperature=float(message["temperature"]))[0]
            else:
                from hpcalign.models.reward_model import sequence_rewards

                answer = sequence_rewards(self.engine, batch["input_ids"],
                                          batch["attention_mask"])
        torch.distributed.send(answer.float().contiguous().to(self.wire), dst=source)
        self.served += 1

    def run(self) -> None:
        cfg = self.cfg
        if self.name == "reward":
            self._build(cfg.models.reward.path)
        timeout = cfg.comm.startup_timeout_s
        while True:
            source, message = self._next(timeout)
            op = message.get("op")
            if op == "stop":
                log.info("%s: stop after %d requests", self.name, self.served)
                return
            if op == "load":
                self._build(str(message["path"]))
            elif op in ("logprobs", "score"):
                self._answer(source, message)
                timeout = cfg.comm.timeout_s
            else:
                raise ProtocolError(f"{self.name} got an unknown request {message!r} from "
                                    f"{self.ctx.placement.describe_rank(source)}")
