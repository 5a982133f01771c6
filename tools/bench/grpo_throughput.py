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

Peer, in the same run: TRL 1.16's GRPOTrainer at the same shape, model, prompts and
batch (tools/bench/trl_peer.py; EOS suppressed with `min_new_tokens`, KL 0.04, one
optimizer step per generation batch, float32, same threads), run from a venv of its own
that the bench makes on first use (`tools/bench/.venv-trl`: TRL is never a runtime
dependency). `--model DIR` runs all three (floor, hpcalign, TRL) on a user's HF model
instead, hpcalign through configs/grpo-hf.yaml with a JSONL of "reverse" prompts and the
built-in `partial_match` reward (TRL gets the same function, restated).

    python tools/bench/grpo_throughput.py                 # on-policy and overlap, + TRL
    python tools/bench/grpo_throughput.py --steps 40 --staleness 0
    python tools/bench/grpo_throughput.py --model DIR --staleness 0
    python tools/bench/grpo_throughput.py --autocast bf16 --no-trl   # the bf16 figure
    python tools/bench/grpo_throughput.py --variant dapo --staleness 0 --compile off
    .venv-vllm/bin/python tools/bench/grpo_throughput.py --variant vllm_generator --no-trl

Prints ONE JSON line. Targets: samples_per_s >= 0.9 x floor_samples_per_s, and
>= 1.25 x TRL's samples_per_s.
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
from sampler import reference_loop  # tools/bench/sampler.py: the bare KV-cache loop

from hpcalign.config.schema import ModelInit
from hpcalign.models.precision import autocast
from hpcalign.models.tiny import build_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TRL_VENV = os.path.join(ROOT, "tools", "bench", ".venv-trl")
TRL_VERSION = "1.16.0"
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


def _models(model_dir: str | None) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(policy, frozen reference, vocabulary size): the benchmark shape, or a user's model."""
    if model_dir is None:
        return (build_model(SHAPE, vocab_size=VOCAB),
                build_model(SHAPE, vocab_size=VOCAB).requires_grad_(False), VOCAB)
    from transformers import AutoModelForCausalLM

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    policy = load()
    return policy, load().requires_grad_(False), policy.config.vocab_size


def compute_floor(threads: int, repeat: int, precision: str = "none",
                  model_dir: str | None = None) -> dict:
    """The floor; with precision "bf16" every forward runs under bf16 autocast (as
    `model.autocast: bf16` does in hpcalign), backward and AdamW outside it."""
    torch.set_num_threads(threads)
    model, reference, vocab = _models(model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, vocab, (BATCH, PROMPT_TOKENS), generator=gen)
    full = torch.randint(4, vocab, (BATCH, PROMPT_TOKENS + NEW_TOKENS), generator=gen)

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


def write_prompts(path: str, count: int = 512) -> str:
    """"reverse" prompts as a TRL dataset (prompt + answer), for `--model` and for TRL."""
    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(count):
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
            handle.write(json.dumps({"prompt": word + "=", "answer": word[::-1]}) + "\n")
    return path


# `--variant NAME`: the GRPO family and the other online flows, as config overrides of the
# same run (docs/user-guide.md "GRPO family", docs/flows.md), against the same floor
VARIANTS: dict[str, list[str]] = {
    "grpo": [],
    "rloo": ["trainer.advantage_estimator=rloo"],
    "reinforce_pp": ["trainer.advantage_estimator=reinforce_pp"],
    "reinforce_pp_baseline": ["trainer.advantage_estimator=reinforce_pp_baseline"],
    "dapo": ["trainer.clip_eps_low=0.2", "trainer.clip_eps_high=0.28",
             "trainer.dynamic_sampling=true", "trainer.loss_aggregation=token-mean"],
    "dr_grpo": ["trainer.scale_rewards=false", "trainer.loss_aggregation=seq-mean-token-sum-norm"],
    "gspo": ["trainer.importance_ratio=sequence", "trainer.loss_aggregation=seq-mean-token-mean"],
    "kl_in_reward": ["trainer.kl_in_reward=true", "trainer.kl_estimator=k1"],
    "two_updates": ["trainer.updates_per_batch=2"],
    "online_dpo": ["algorithm=online_dpo"],
    # the same GRPO with a vLLM generator (run from .venv-vllm; the floor stays the HF one)
    "vllm_generator": ["generator.backend=vllm", "generator.vllm.kv_cache_gb=0.5",
                       "generator.vllm.max_model_len=64", "generator.vllm.enforce_eager=true"],
    "ppo": ["algorithm=ppo"],
}


def framework(staleness: int, steps: int, warmup: int, workdir: str,
              precision: str = "none", model_dir: str | None = None,
              compile_model: bool = False, variant: str = "grpo") -> dict:
    run_dir = os.path.join(workdir, f"{variant}-staleness-{staleness}-{precision}-"
                                    f"{int(compile_model)}")
    if model_dir is None:  # the quickstart's task on the benchmark shape, built by init
        model_args = [os.path.join(ROOT, "configs", "quickstart.yaml"),
                      f"model.path={workdir}/model",
                      f"model.init.hidden={SHAPE.hidden}", f"model.init.layers={SHAPE.layers}",
                      f"model.init.heads={SHAPE.heads}", f"model.init.kv_heads={SHAPE.kv_heads}",
                      f"model.init.intermediate={SHAPE.intermediate}"]
    else:  # a user's model: their config, a dataset and a TRL reward function
        model_args = [os.path.join(ROOT, "configs", "grpo-hf.yaml"), f"model.path={model_dir}",
                      f"data.train={os.path.join(workdir, 'prompts.jsonl')}",
                      "reward.functions=[hpcalign.rewards.builtin:partial_match]",
                      "trainer.micro_batch=0", "comm.timeout_s=600"]
    argv = [sys.executable, "-m", "hpcalign.cli", "run", *model_args,
            f"run_dir={run_dir}", "generator.prompts_per_step=16",
            "generator.samples_per_prompt=4", f"generator.max_new_tokens={NEW_TOKENS}",
            "generator.ignore_eos=true", "trainer.kl_coef=0.04", "trainer.sft_warmup_steps=0",
            f"trainer.steps={steps}", "checkpoint.every_steps=0", "log.progress=false",
            "log.eval_every_steps=0", "log.tensorboard=true", f"sync.max_staleness={staleness}",
            f"model.autocast={precision}", f"model.compile={str(compile_model).lower()}",
            *VARIANTS[variant]]
    subprocess.run(argv, check=True, cwd=ROOT, capture_output=True, timeout=1800)
    return steady_state(run_dir, warmup)


def steady_state(run_dir: str, warmup: int) -> dict:
    """Median step time, samples/s and phase times of a finished run after `warmup` steps."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steady = rows[warmup:]
    step_s = statistics.median(r["time_step_s"] for r in steady)
    phases = {k: round(statistics.median(r[k] for r in steady), 4)
              for k in ("time_generate_s", "time_sample_s", "time_reward_s", "time_wait_s",
                        "time_train_s", "time_sync_s") if k in steady[0]}
    return {"step_s": round(step_s, 4), "samples_per_s": round(BATCH / step_s, 2), **phases}


def trl_python() -> str:
    """The TRL venv's python, made on first use with this torch and transformers."""
    python = os.path.join(TRL_VENV, "bin", "python")
    if not os.path.exists(os.path.join(TRL_VENV, ".installed")):
        import transformers

        subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
        pins = [f"torch=={torch.__version__}", f"transformers=={transformers.__version__}",
                f"trl=={TRL_VERSION}"]
        subprocess.run([python, "-m", "pip", "install", "-q", *pins], check=True)
        open(os.path.join(TRL_VENV, ".installed"), "w").close()
    return python


def trl_peer(model_dir: str, prompts: str, steps: int, warmup: int, threads: int,
             workdir: str) -> dict:
    argv = [trl_python(), os.path.join(ROOT, "tools", "bench", "trl_peer.py"),
            "--model", model_dir, "--prompts", prompts, "--out", os.path.join(workdir, "trl"),
            "--prompts-per-step", "16", "--samples-per-prompt", "4",
            "--new-tokens", str(NEW_TOKENS), "--kl", "0.04", "--steps", str(steps),
            "--warmup", str(warmup), "--threads", str(threads)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--staleness", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="a user's HF model directory instead of the benchmark shape")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL peer")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both",
                        help="model.compile for hpcalign's runs (both: eager and compiled, "
                             "side by side; compiled results as staleness_<s>_compiled)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="grpo",
                        help="a GRPO-family option set or another flow (same shape and floor)")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none",
                        help="bf16: floor and runs under bf16 autocast (a separate figure: "
                             "never mix it with the float32 one)")
    args = parser.parse_args()
    result: dict = {"bench": "grpo_throughput", "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "batch": BATCH, "new_tokens": NEW_TOKENS, "autocast": args.autocast,
                    "variant": args.variant,
                    "model": args.model or "benchmark shape (init-model)",
                    "params_m": round(sum(p.numel() for p in _models(args.model)[0].parameters()) / 1e6, 2)}
    floor = compute_floor(args.threads, args.repeat, args.autocast, args.model)
    result["floor"] = floor
    result["floor_samples_per_s"] = round(BATCH / floor["floor_s"], 2)
    with tempfile.TemporaryDirectory() as workdir:
        prompts = write_prompts(os.path.join(workdir, "prompts.jsonl"))
        variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        for staleness in args.staleness:
            for compiled in variants:
                run = framework(staleness, args.steps, args.warmup, workdir, args.autocast,
                                args.model, compiled, args.variant)
                run["ratio_to_floor"] = round(run["samples_per_s"] / result["floor_samples_per_s"], 3)
                result[f"staleness_{staleness}" + ("_compiled" if compiled else "")] = run
        if not args.no_trl and args.variant == "grpo":  # TRL's peer is plain GRPO
            peer = trl_peer(args.model or os.path.join(workdir, "model"), prompts, args.steps,
                            args.warmup, args.threads, workdir)
            result["trl"] = peer
            for key, run in list(result.items()):
                if key.startswith("staleness_"):
                    run["ratio_to_trl"] = round(run["samples_per_s"] / peer["samples_per_s"], 3)
    after = compute_floor(args.threads, args.repeat, args.autocast, args.model)  # the machine may have changed meanwhile
    result["floor_after_s"] = after["floor_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
