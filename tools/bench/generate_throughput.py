"""Tokens/s of the torch and vLLM generation engines side by side, in one run.

Both engines get the same random-weight Qwen2 directory, the same prompts (left-padded
mixed lengths, like the "reverse" task's) and EOS off, so every row decodes the full
`--new-tokens`: the work is equal and counted as rows x new tokens. Shapes:

- `grpo`: the GRPO benchmark's model (hidden 256, 4 layers, 4 heads, intermediate 1024,
  vocab 44, tied) at its batch, 64 prompts x 32 new tokens;
- `qwen2-150m`: hidden 768, 8 layers, 12 heads / 2 KV heads (head_dim 64), intermediate
  2048, vocab 151936 (Qwen2's), tied: ~165M parameters, 64 x 128 by default.

Each engine warms up first (vLLM's first calls per shape are slow, FACTS.md), then
`--repeat` timed batches; the median counts. Needs vLLM (the .venv-vllm of `make test`);
without it only torch is measured and `vllm` is null.

    .venv-vllm/bin/python tools/bench/generate_throughput.py --shape grpo
    .venv-vllm/bin/python tools/bench/generate_throughput.py --shape qwen2-150m --repeat 3
    .venv-vllm/bin/python tools/bench/generate_throughput.py --tiny       # smoke run, seconds

Prints ONE JSON line: {"shape", "rows", "new_tokens", "threads", "torch": {...}, "vllm": {...},
"vllm_over_torch"} with median wall seconds and tokens/s per engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from hpcalign.config.schema import Config, ModelInit
from hpcalign.engines import SamplingParams, build_generation_engine
from hpcalign.models.hf import save_model
from hpcalign.models.tiny import DEFAULT_SYMBOLS, build_model
from hpcalign.models.tokenizer import build_char_tokenizer

SHAPES = {  # ModelInit fields, vocab size, rows, new tokens
    "grpo": (dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024), 44, 64, 32),
    "qwen2-150m": (dict(hidden=768, layers=8, heads=12, kv_heads=2, intermediate=2048),
                   151936, 64, 128),
    "tiny": (dict(hidden=64, layers=1, heads=2, kv_heads=2, intermediate=128), 44, 4, 4),
}


def build_dir(path: str, shape: str) -> str:
    """A random-weight model directory of `shape` (char tokenizer: ids only matter here)."""
    fields, vocab, _, _ = SHAPES[shape]
    tokenizer = build_char_tokenizer(DEFAULT_SYMBOLS)
    model = build_model(ModelInit(arch="qwen2", **fields), max(vocab, len(tokenizer)))
    save_model(model, tokenizer, path)
    return path


def prompts(rows: int) -> list[list[int]]:
    """Mixed-length prompts of in-vocabulary ids (4..9 tokens)."""
    return [[5 + (i * 7 + j) % 30 for j in range(4 + i % 6)] for i in range(rows)]


def measure(engine, rows: int, new_tokens: int, repeat: int) -> dict[str, float]:
    params = SamplingParams(samples_per_prompt=1, max_new_tokens=new_tokens, ignore_eos=True)
    batch = prompts(rows)
    for seed in range(2):  # warm-up: first shapes, kernels, caches
        engine.generate(batch, params, seed=seed)
    walls = []
    for seed in range(repeat):
        start = time.perf_counter()
        out = engine.generate(batch, params, seed=100 + seed)
        walls.append(time.perf_counter() - start)
        assert sum(len(t) for t in out.token_ids) == rows * new_tokens
    wall = statistics.median(walls)
    return {"wall_s": round(wall, 4), "tokens_per_s": round(rows * new_tokens / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="grpo")
    parser.add_argument("--tiny", action="store_true", help="smoke run: --shape tiny --repeat 1")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.repeat = "tiny", 1
    _, _, rows, new_tokens = SHAPES[args.shape]
    rows, new_tokens = args.rows or rows, args.new_tokens or new_tokens
    torch.set_num_threads(args.threads)
    result = {"shape": args.shape, "rows": rows, "new_tokens": new_tokens,
              "threads": args.threads, "machine": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_dir(os.path.join(tmp, "model"), args.shape)
        cfg = Config(run_dir=tmp, model={"path": model_dir}, seed=0, task={"name": "reverse"},
                     generator={"vllm": {"kv_cache_gb": 1.0, "max_model_len": 512}})
        cpu = torch.device("cpu")
        torch_engine = build_generation_engine("torch", model_dir, cfg, device=cpu)
        result["torch"] = measure(torch_engine, rows, new_tokens, args.repeat)
        del torch_engine
        try:
            import vllm  # noqa: F401
        except ImportError:
            result["vllm"] = None
        else:
            start = time.perf_counter()
            vllm_engine = build_generation_engine("vllm", model_dir, cfg, device=cpu)
            result["vllm_startup_s"] = round(time.perf_counter() - start, 2)
            result["vllm"] = measure(vllm_engine, rows, new_tokens, args.repeat)
            result["vllm_over_torch"] = round(result["vllm"]["tokens_per_s"]
                                              / result["torch"]["tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM may spawn: the guard is required
    main()
