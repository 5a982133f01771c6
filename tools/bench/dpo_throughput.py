"""Offline DPO pairs/s: hpcalign's flow, TRL 1.16's DPOTrainer and the compute floor, in one run.

At the GRPO benchmark's model shape (tools/bench/grpo_throughput.py SHAPE: Qwen2 hidden
256, 4 layers, ~4.2 M parameters, char vocabulary), float32: 64 pairs a step, prompts of
8 tokens, chosen and rejected completions of 32 tokens. hpcalign = `hpcalign run
configs/dpo-tiny.yaml` (the reference log-probs computed once before the first step, as
the flow always does); TRL = DPOTrainer with `precompute_ref_log_probs`
(tools/bench/trl_dpo_peer.py, in the bench's own TRL venv); floor = what a DPO step cannot
avoid, timed alone in this process with plain PyTorch and HF model code: the policy's
forward + backward over the 128 sequences (chosen and rejected) and one AdamW step, the
reference log-probs given. Steady state = median step time after `--warmup` steps.

    python tools/bench/dpo_throughput.py
    python tools/bench/dpo_throughput.py --steps 30 --no-trl

Prints ONE JSON line. Targets: pairs_per_s >= 1.25 x TRL's and >= 0.9 x the floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from grpo_throughput import ROOT, SHAPE, trl_python

from hpcalign.models.tiny import init_model

PAIRS, PROMPT_CHARS, COMPLETION_CHARS = 64, 7, 32
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _pairs(path: str, count: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(count):
            prompt = "".join(rng.choice(LETTERS) for _ in range(PROMPT_CHARS)) + "="
            chosen, rejected = ("".join(rng.choice(LETTERS) for _ in range(COMPLETION_CHARS))
                                for _ in range(2))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def _floor(model_dir: str, repeat: int, threads: int) -> float:
    """Median seconds of policy forward + backward over 2 x PAIRS sequences + AdamW."""
    from hpcalign.models.hf import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    length = 1 + PROMPT_CHARS + 1 + COMPLETION_CHARS  # <bos>, prompt, "=", completion
    ids = torch.randint(4, 30, (2 * PAIRS, length))
    ref = torch.zeros(2 * PAIRS, dtype=torch.float64)

    def step() -> None:
        logits = model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        total = logp[:, -COMPLETION_CHARS:].sum(-1).double()
        h = (total[:PAIRS] - total[PAIRS:]) - (ref[:PAIRS] - ref[PAIRS:])
        loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hpcalign(model_dir: str, pairs: str, workdir: str, steps: int, warmup: int,
              threads: int) -> float:
    run_dir = os.path.join(workdir, "run")
    argv = [sys.executable, "-m", "hpcalign.cli", "run", os.path.join(ROOT, "configs",
            "dpo-tiny.yaml"), f"models.policy.path={model_dir}", f"data.train={pairs}",
            f"run_dir={run_dir}", f"trainer.steps={steps}", f"trainer.batch={PAIRS}",
            "trainer.eval_every_steps=0", "checkpoint.every_steps=0", "trainer.lr=1e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(argv, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    times = [b["time_s"] - a["time_s"] for a, b in zip(rows, rows[1:])]
    return statistics.median(times[warmup:-1])  # the last step also checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-trl", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        init_model(model, SHAPE)
        pairs = os.path.join(tmp, "pairs.jsonl")
        _pairs(pairs, PAIRS * (args.steps + 2))
        floor_s = _floor(model, max(5, args.steps // 2), args.threads)
        ours_s = _hpcalign(model, pairs, tmp, args.steps, args.warmup, args.threads)
        trl = None
        if not args.no_trl:
            out = subprocess.run([trl_python(), os.path.join(ROOT, "tools", "bench",
                                  "trl_dpo_peer.py"), "--model", model, "--pairs", pairs,
                                  "--out", os.path.join(tmp, "trl"), "--batch", str(PAIRS),
                                  "--steps", str(args.steps), "--warmup", str(args.warmup),
                                  "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True, timeout=3600)
            trl = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"bench": "dpo_throughput", "machine": platform.processor() or platform.machine(),
              "cores": len(os.sched_getaffinity(0)), "threads": args.threads, "pairs": PAIRS,
              "step_s": round(ours_s, 4), "pairs_per_s": round(PAIRS / ours_s, 2),
              "floor_step_s": round(floor_s, 4), "floor_pairs_per_s": round(PAIRS / floor_s, 2),
              "of_floor": round(floor_s / ours_s, 3)}
    if trl is not None:
        result.update(trl=trl, vs_trl=round(trl["step_s"] / ours_s, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
