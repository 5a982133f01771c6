"""GRPO samples/s end to end through the real roles, against the compute floor, in one run.

End to end: `hpcalign run` (mpiexec, 1 trainer + 1 generator, HDF5 shards, MPI control,
gloo weight sync, metrics, TensorBoard) at the benchmark shape of the issue: Qwen2 hidden
256, 4 layers, 4 heads, intermediate 1024, tied embeddings, 44-symbol vocabulary
(~4.2 M parameters), 16 prompts x 4 samples, 32 new tokens (EOS ignored so every step does
the same work), KL 0.04, one AdamW step per batch, float32. Steady state = median step
time after the first `--warmup` steps.

Compute floor: the three computations a GRPO step cannot avoid, timed alone in this
process with plain PyTorch and HF model code at the same shape and thread count: sampling
64 x 32 tokens with a KV cache (a bare loop, not hpcalign's sampler), one reference
forward, one forward + backward + AdamW step. floor_s = their sum.

    python tools/bench/grpo_throughput.py                 # on-policy and overlap
    python tools/bench/grpo_throughput.py --steps 40 --staleness 0
    python tools/bench/grpo_throughput.py --autocast bf16   # the bf16 figure, separately

Prints ONE JSON line. Target: samples_per_s >= 0.9 x floor_samples_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from sampler import reference_loop  # tools/bench/sampler.py: the bare KV-cache loop

from hpcalign.config.schema import ModelInit
from hpcalign.models.precision import autocast
from hpcalign.models.tiny import build_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHAPE = ModelInit(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024,
                  tie_embeddings=True, seed=0)
BATCH, NEW_TOKENS, PROMPT_TOKENS, VOCAB = 64, 32, 8, 44


def _median(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compute_floor(threads: int, repeat: int, precision: str = "none") -> dict:
    """The floor; with precision "bf16" every forward runs under bf16 autocast (as
    `model.autocast: bf16` does in hpcalign), backward and AdamW outside it."""
    torch.set_num_threads(threads)
    model = build_model(SHAPE, vocab_size=VOCAB)
    reference = build_model(SHAPE, vocab_size=VOCAB).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, VOCAB, (BATCH, PROMPT_TOKENS), generator=gen)
    full = torch.randint(4, VOCAB, (BATCH, PROMPT_TOKENS + NEW_TOKENS), generator=gen)

    @torch.no_grad()
    def sample() -> None:
        with autocast(model, precision):
            reference_loop(model, prompts, NEW_TOKENS, gen)

    @torch.no_grad()
    def reference_forward() -> None:
        with autocast(reference, precision):
            reference(input_ids=full).logits.float().log_softmax(-1)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step() -> None:
        with autocast(model, precision):
            logp = model(input_ids=full).logits.float().log_softmax(-1)
        loss = -logp[:, :-1].gather(-1, full[:, 1:, None]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    parts = {"sample_s": _median(sample, repeat), "reference_s": _median(reference_forward, repeat),
             "train_s": _median(train_step, repeat)}
    parts["floor_s"] = sum(parts.values())
    return {k: round(v, 4) for k, v in parts.items()}


def framework(staleness: int, steps: int, warmup: int, workdir: str,
              precision: str = "none") -> dict:
    run_dir = os.path.join(workdir, f"staleness-{staleness}-{precision}")
    argv = [sys.executable, "-m", "hpcalign.cli", "run", os.path.join(ROOT, "configs", "quickstart.yaml"),
            f"run_dir={run_dir}", f"model.path={workdir}/model",
            f"model.init.hidden={SHAPE.hidden}", f"model.init.layers={SHAPE.layers}",
            f"model.init.heads={SHAPE.heads}", f"model.init.kv_heads={SHAPE.kv_heads}",
            f"model.init.intermediate={SHAPE.intermediate}", "generator.prompts_per_step=16",
            "generator.samples_per_prompt=4", f"generator.max_new_tokens={NEW_TOKENS}",
            "generator.ignore_eos=true", "trainer.kl_coef=0.04", "trainer.sft_warmup_steps=0",
            f"trainer.steps={steps}", "checkpoint.every_steps=0", "log.progress=false",
            "log.eval_every_steps=0", f"sync.max_staleness={staleness}",
            f"model.autocast={precision}"]
    subprocess.run(argv, check=True, cwd=ROOT, capture_output=True, timeout=1800)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steady = rows[warmup:]
    step_s = statistics.median(r["time_step_s"] for r in steady)
    phases = {k: round(statistics.median(r[k] for r in steady), 4)
              for k in ("time_generate_s", "time_wait_s", "time_train_s", "time_sync_s")}
    return {"step_s": round(step_s, 4), "samples_per_s": round(BATCH / step_s, 2), **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--staleness", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none",
                        help="bf16: floor and runs under bf16 autocast (a separate figure: "
                             "never mix it with the float32 one)")
    args = parser.parse_args()
    result: dict = {"bench": "grpo_throughput", "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "batch": BATCH, "new_tokens": NEW_TOKENS, "autocast": args.autocast,
                    "params_m": round(sum(p.numel() for p in build_model(SHAPE, VOCAB).parameters()) / 1e6, 2)}
    floor = compute_floor(args.threads, args.repeat, args.autocast)
    result["floor"] = floor
    result["floor_samples_per_s"] = round(BATCH / floor["floor_s"], 2)
    with tempfile.TemporaryDirectory() as workdir:
        for staleness in args.staleness:
            run = framework(staleness, args.steps, args.warmup, workdir, args.autocast)
            run["ratio_to_floor"] = round(run["samples_per_s"] / result["floor_samples_per_s"], 3)
            result[f"staleness_{staleness}"] = run
    after = compute_floor(args.threads, args.repeat, args.autocast)  # the machine may have changed meanwhile
    result["floor_after_s"] = after["floor_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
