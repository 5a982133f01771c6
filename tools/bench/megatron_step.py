"""GRPO trainer step time: megatron-core TP=1 against the torch engine, TP=2 beside them.

The trainer phase (`time_train_s`: the reference forward + the policy's forward, backward
and AdamW step) of GRPO runs end to end at tools/bench/grpo_throughput.py's shape and
batch (Qwen2 hidden 256, 4 layers, 64 samples x 40 tokens, float32, 1 torch generator,
on-policy), one run per trainer, one after the other in one invocation:

- torch: `trainer.backend=torch` (1 trainer rank);
- megatron TP=1: `trainer.backend=megatron trainer.tp=1` (1 trainer rank);
- megatron TP=2: `trainer.backend=megatron trainer.tp=2 trainer.ranks=2` (2 ranks).

    python tools/bench/megatron_step.py --steps 20 --warmup 4

Prints ONE JSON line: each run's median step and train-phase seconds, and the train
phase of megatron TP=1 over torch's (target: <= 1.2). On CPU megatron-core runs without
its fused kernels (no TE, no apex: local layers, unfused softmax and RMSNorm) and through
the gloo compatibility layer of hpcalign/engines/megatron/compat.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import torch
from grpo_throughput import BATCH, NEW_TOKENS, VARIANTS, framework

TRAINERS = {
    "torch": [],
    "megatron_tp1": ["trainer.backend=megatron", "trainer.tp=1", "trainer.pp=1"],
    "megatron_tp2": ["trainer.backend=megatron", "trainer.tp=2", "trainer.pp=1",
                     "trainer.ranks=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=list(TRAINERS))
    args = parser.parse_args()
    result: dict = {"bench": "megatron_step", "torch_version": torch.__version__,
                    "cpu": platform.processor() or platform.machine(),
                    "threads": len(os.sched_getaffinity(0)), "batch": BATCH,
                    "new_tokens": NEW_TOKENS}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.trainers:
            VARIANTS[name] = TRAINERS[name]
            run = framework(0, args.steps, args.warmup, workdir, variant=name)
            result[name] = {k: run[k] for k in ("step_s", "samples_per_s", "time_train_s",
                                                "time_generate_s")}
    if "torch" in result and "megatron_tp1" in result:
        result["tp1_train_over_torch"] = round(
            result["megatron_tp1"]["time_train_s"] / result["torch"]["time_train_s"], 3)
    if "torch" in result and "megatron_tp2" in result:
        result["tp2_train_over_torch"] = round(
            result["megatron_tp2"]["time_train_s"] / result["torch"]["time_train_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
