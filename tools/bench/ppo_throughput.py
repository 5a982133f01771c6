"""RLHF-PPO samples/s with four models, colocated and exclusive, against its compute floor.

End to end: `hpcalign run` with `algorithm=ppo` at the GRPO benchmark's shape
(tools/bench/grpo_throughput.py: Qwen2 hidden 256, 4 layers, ~4.2 M parameters, 16
prompts x 4 samples, 32 new tokens with EOS ignored, float32): the policy (trainer +
torch generator), a frozen reference, a reward model and a critic of that size (the
reward model is the policy's starting checkpoint with a seeded scalar head, the critic
starts from it), `ppo.epochs=2`, `ppo.minibatches=2`, on-policy (`sync.max_staleness=0`).
Two placements, one after the other:

- colocated: reference, reward model and critic on the trainer rank, beside the policy
  (2 MPI ranks: 1 trainer + 1 generator);
- exclusive: the reference and the reward model on ranks of their own (4 ranks), serving
  the trainer's requests (the critic is trained, so it stays with the policy).

Compute floor, timed alone in this process with plain PyTorch and HF model classes at the
same shape and thread count: sampling 64 x 32 tokens with a KV cache (a bare loop), the
reference's, reward model's and critic's forwards over the batch, and `epochs x
minibatches` (policy forward + backward + AdamW, critic forward + backward + AdamW) over
the minibatches. floor_s = their sum; measured again at the end (the machine moves).

    python tools/bench/ppo_throughput.py                       # both placements
    python tools/bench/ppo_throughput.py --placement colocated --steps 20

Prints ONE JSON line. Target: samples_per_s >= 0.85 x floor_samples_per_s (on-policy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
from grpo_throughput import (
    BATCH,
    NEW_TOKENS,
    PROMPT_TOKENS,
    ROOT,
    SHAPE,
    VOCAB,
    _median,
    steady_state,
)
from sampler import reference_loop  # tools/bench/sampler.py: the bare KV-cache loop
from transformers import AutoModelForSequenceClassification

from hpcalign.models.tiny import build_model

EPOCHS, MINIBATCHES = 2, 2
PLACEMENTS = {
    "colocated": [],
    "exclusive": ["models.reference.placement=exclusive", "models.reward.placement=exclusive"],
}


def _scalar_model(policy: torch.nn.Module) -> torch.nn.Module:
    """An HF sequence classifier (num_labels=1) on the policy's architecture."""
    fields = {k: v for k, v in policy.config.to_dict().items() if k not in ("id2label", "label2id")}
    config = policy.config.__class__.from_dict({**fields, "num_labels": 1})
    return AutoModelForSequenceClassification.from_config(config)


def compute_floor(threads: int, repeat: int) -> dict:
    torch.set_num_threads(threads)
    policy = build_model(SHAPE, vocab_size=VOCAB)
    reference = build_model(SHAPE, vocab_size=VOCAB).requires_grad_(False)
    reward = _scalar_model(policy).requires_grad_(False)
    critic = _scalar_model(policy)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, VOCAB, (BATCH, PROMPT_TOKENS), generator=gen)
    full = torch.randint(4, VOCAB, (BATCH, PROMPT_TOKENS + NEW_TOKENS), generator=gen)
    size = BATCH // MINIBATCHES

    @torch.no_grad()
    def sample() -> None:
        reference_loop(policy, prompts, NEW_TOKENS, gen)

    @torch.no_grad()
    def forwards() -> None:  # reference log-probs, reward score, old values
        reference(input_ids=full).logits.float().log_softmax(-1)
        reward(input_ids=full)
        critic.model(input_ids=full).last_hidden_state @ critic.score.weight.T

    policy_opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-6)

    def updates() -> None:
        for _ in range(EPOCHS):
            for first in range(0, BATCH, size):
                rows = full[first:first + size]
                logp = policy(input_ids=rows).logits.float().log_softmax(-1)
                loss = -logp[:, :-1].gather(-1, rows[:, 1:, None]).mean()
                policy_opt.zero_grad(set_to_none=True)
                loss.backward()
                policy_opt.step()
                values = critic.score(critic.model(input_ids=rows).last_hidden_state)
                critic_opt.zero_grad(set_to_none=True)
                values.float().square().mean().backward()
                critic_opt.step()

    parts = {"sample_s": _median(sample, repeat), "forwards_s": _median(forwards, repeat),
             "updates_s": _median(updates, repeat)}
    parts["floor_s"] = sum(parts.values())
    return {k: round(v, 4) for k, v in parts.items()}


def framework(placement: str, steps: int, warmup: int, workdir: str) -> dict:
    run_dir = os.path.join(workdir, f"ppo-{placement}")
    model_dir = os.path.join(workdir, "model")
    argv = [sys.executable, "-m", "hpcalign.cli", "run",
            os.path.join(ROOT, "configs", "quickstart.yaml"), f"run_dir={run_dir}",
            f"model.path={model_dir}", f"model.init.hidden={SHAPE.hidden}",
            f"model.init.layers={SHAPE.layers}", f"model.init.heads={SHAPE.heads}",
            f"model.init.kv_heads={SHAPE.kv_heads}",
            f"model.init.intermediate={SHAPE.intermediate}",
            "algorithm=ppo", f"models.reward.path={model_dir}", "models.reward.init=null",
            f"ppo.epochs={EPOCHS}", f"ppo.minibatches={MINIBATCHES}",
            "generator.prompts_per_step=16", "generator.samples_per_prompt=4",
            f"generator.max_new_tokens={NEW_TOKENS}", "generator.ignore_eos=true",
            "trainer.sft_warmup_steps=0", f"trainer.steps={steps}",
            "checkpoint.every_steps=0", "log.progress=false", "log.eval_every_steps=0",
            "log.tensorboard=true", "sync.max_staleness=0", *PLACEMENTS[placement]]
    subprocess.run(argv, check=True, cwd=ROOT, capture_output=True, timeout=1800)
    return steady_state(run_dir, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--placement", nargs="+", choices=sorted(PLACEMENTS),
                        default=["colocated", "exclusive"])
    args = parser.parse_args()
    result: dict = {"bench": "ppo_throughput", "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "batch": BATCH, "new_tokens": NEW_TOKENS, "epochs": EPOCHS,
                    "minibatches": MINIBATCHES, "models": 4}
    floor = compute_floor(args.threads, args.repeat)
    result["floor"] = floor
    result["floor_samples_per_s"] = round(BATCH / floor["floor_s"], 2)
    with tempfile.TemporaryDirectory() as workdir:
        for placement in args.placement:
            run = framework(placement, args.steps, args.warmup, workdir)
            run["ratio_to_floor"] = round(run["samples_per_s"] / result["floor_samples_per_s"], 3)
            result[placement] = run
    result["floor_after_s"] = compute_floor(args.threads, args.repeat)["floor_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
