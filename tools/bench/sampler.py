"""Benchmark `hpcalign.models.sampler.sample` against a plain HF KV-cache loop, in one run.

Shape of the GRPO benchmark in shared/FACTS.md: a Qwen2 with hidden 256, 4 layers, 4 heads,
intermediate 1024, tied embeddings, vocab 44, float32; 64 prompts x 32 new tokens, EOS off
so every row runs the full length. The reference is the least a KV-cache sampler can do:
prefill, then 31 calls `model(next_token, cache=...)` with softmax + multinomial, equal-length
prompts, no masks, no log-probs. `sample` is timed on the same equal-length prompts and on
mixed-length (left-padded) prompts like the "reverse" task's.

    python tools/bench/sampler.py                     # 2 threads, both attention kernels
    python tools/bench/sampler.py --threads 1 --repeat 9 --attn sdpa

NOTE: on a busy machine (load > cores) run it with `OMP_WAIT_POLICY=PASSIVE`: with the
default (spinning) OpenMP wait policy, 2 threads on 2 shared cores made one batch take 6-14 s
instead of ~1 s (measured 2026-11-29, load ~9 on 2 cores); CPU seconds stay comparable.

Prints ONE JSON line: median wall and CPU seconds per 64 x 32 batch (compare CPU seconds when
the machine is shared). Target (FACTS.md): ~0.30 s wall on 2 idle threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import DynamicCache

from hpcalign.config.schema import ModelInit
from hpcalign.models.sampler import sample
from hpcalign.models.tiny import build_model


@torch.no_grad()
def reference_loop(model, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator) -> None:
    cache = DynamicCache()
    logits = model(input_ids=prompts, cache=cache, use_cache=True).logits[:, -1]
    for step in range(new_tokens):
        token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        if step + 1 < new_tokens:
            logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]


def _median_s(fn, repeat: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of this process (all threads) per call.

    CPU seconds are the figure to compare on a busy machine: other jobs stretch wall time.
    """
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _bench_model(model, equal: torch.Tensor, mixed: list[list[int]], new_tokens: int,
                 repeat: int) -> dict:
    def ours(prompts):
        return lambda: sample(model, prompts, max_new_tokens=new_tokens, eos_id=-1, pad_id=0,
                              generator=torch.Generator().manual_seed(1))

    ref_s, ref_cpu = _median_s(lambda: reference_loop(model, equal, new_tokens,
                                                      torch.Generator().manual_seed(1)), repeat)
    equal_s, equal_cpu = _median_s(ours(equal.tolist()), repeat)
    mixed_s, mixed_cpu = _median_s(ours(mixed), repeat)
    return {"reference_s": round(ref_s, 4), "sample_equal_s": round(equal_s, 4),
            "sample_mixed_s": round(mixed_s, 4),
            "reference_cpu_s": round(ref_cpu, 4), "sample_equal_cpu_s": round(equal_cpu, 4),
            "sample_mixed_cpu_s": round(mixed_cpu, 4),
            "overhead_equal_cpu": round(equal_cpu / ref_cpu - 1, 3),
            "overhead_mixed_cpu": round(mixed_cpu / ref_cpu - 1, 3),
            "tokens_per_s_mixed": round(len(mixed) * new_tokens / mixed_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--attn", choices=["sdpa", "eager", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    init = ModelInit(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024,
                     tie_embeddings=True, seed=0)
    gen = torch.Generator().manual_seed(0)
    # "<bos> letters =": 7 tokens equal-length, 5..8 tokens mixed (reverse task, 3-6 letters)
    equal = torch.randint(4, 30, (args.batch, 7), generator=gen)
    equal[:, 0], equal[:, -1] = 1, 40
    mixed = [[1, *torch.randint(4, 30, (3 + i % 4,), generator=gen).tolist(), 40]
             for i in range(args.batch)]

    result: dict = {"bench": "sampler", "threads": args.threads, "batch": args.batch,
                    "new_tokens": args.new_tokens, "repeat": args.repeat,
                    "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    for attn in (["sdpa", "eager"] if args.attn == "both" else [args.attn]):
        model = build_model(init, vocab_size=44)
        model.set_attn_implementation(attn)
        result[attn] = _bench_model(model, equal, mixed, args.new_tokens, args.repeat)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
