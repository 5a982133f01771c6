"""`hpcalign rollout` tokens/s with 1 and 2 workers, and what shard writing costs, in one run.

The GRPO benchmark model (tools/bench/grpo_throughput.py's SHAPE: Qwen2 hidden 256, 4
layers, ~4.2 M parameters, char vocabulary) samples `--prompts` "reverse" prompts x K
completions of up to T tokens through the real command (`python -m hpcalign.cli rollout`,
subprocesses, HDF5 shards, manifest), on the same cores both ways: 1 worker with all the
threads, then 2 workers with half each. Shard writing cost = the rollouts' own
`write_s` (HDF5 write, checksums, fsync, rename) against `sample_s` (generation and
scoring alone), summed over parts from their `rollout-summary-*.json`.

Context, timed in this process at the same shape: the same samples drawn the way a
training step draws them (one `generate` call for the whole batch) against one call per
prompt group (what makes offline samples independent of batch size and workers).

    python tools/bench/rollout_throughput.py
    python tools/bench/rollout_throughput.py --prompts 128 --max-new-tokens 64

Prints ONE JSON line. Target: shard_write_share <= 0.05.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from grpo_throughput import SHAPE  # the GRPO benchmark's model shape

from hpcalign.models.tiny import init_model


def _prompts(path: str, count: int) -> None:
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with open(path, "w") as f:
        for _ in range(count):
            word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
            f.write(json.dumps({"prompt": word + "=", "answer": word[::-1]}) + "\n")


def _rollout(model: str, prompts: str, out: str, workers: int, threads: int,
             args: argparse.Namespace) -> dict:
    argv = [sys.executable, "-m", "hpcalign.cli", "rollout", "--checkpoint", model,
            "--prompts", prompts, "--out", out, "--samples-per-prompt", str(args.k),
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
            "--workers", str(workers), "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    parts = [json.load(open(p)) for p in glob.glob(os.path.join(out, "rollout-summary-*.json"))]
    tokens = sum(p["completion_tokens"] for p in parts)
    sample_s = sum(p["sample_s"] for p in parts)
    write_s = sum(p["write_s"] for p in parts)
    return {"workers": workers, "threads": threads, "wall_s": round(wall, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "sampling_tokens_per_s": round(tokens / (max(p["sample_s"] for p in parts)), 1),
            "sample_s": round(sample_s, 3), "write_s": round(write_s, 4),
            "shards": sum(p["shards_written"] for p in parts)}


def _batched_vs_grouped(model_dir: str, args: argparse.Namespace, threads: int) -> dict:
    """Tokens/s of one generate call over the whole batch vs one call per prompt group."""
    import torch

    from hpcalign.engines import SamplingParams
    from hpcalign.engines.torch_generation import TorchGenerationEngine
    from hpcalign.models.hf import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_dir)
    engine = TorchGenerationEngine(model.requires_grad_(False), tokenizer)
    params = SamplingParams(samples_per_prompt=args.k, max_new_tokens=args.max_new_tokens,
                            ignore_eos=True)
    prompts = [tokenizer("abcd=").input_ids] * (args.batch_size * args.k)
    seeds = list(range(len(prompts)))

    def grouped() -> None:
        for first in range(0, len(prompts), args.k):
            engine.generate(prompts[first:first + args.k], params, 0,
                            sample_seeds=seeds[first:first + args.k])

    out = {}
    for name, fn in (("batched", lambda: engine.generate(prompts, params, 0)),
                     ("grouped", grouped)):
        fn()
        start = time.perf_counter()
        fn()
        out[f"{name}_tokens_per_s"] = round(len(prompts) * args.max_new_tokens /
                                            (time.perf_counter() - start), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per shard")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        init_model(model, SHAPE)
        prompts = os.path.join(tmp, "prompts.jsonl")
        _prompts(prompts, args.prompts)
        one = _rollout(model, prompts, os.path.join(tmp, "w1"), 1, args.threads, args)
        two = _rollout(model, prompts, os.path.join(tmp, "w2"), 2, max(1, args.threads // 2),
                       args)
        context = _batched_vs_grouped(model, args, args.threads)
    write_share = max(r["write_s"] / (r["write_s"] + r["sample_s"]) for r in (one, two))
    print(json.dumps({
        "bench": "rollout_throughput", "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)), "prompts": args.prompts, "k": args.k,
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "one_worker": one, "two_workers": two,
        "two_vs_one_tokens_per_s": round(two["tokens_per_s"] / one["tokens_per_s"], 3),
        "shard_write_share": round(write_share, 4), **context,
    }))


if __name__ == "__main__":
    main()
