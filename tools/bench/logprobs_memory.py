"""Peak memory and time of per-token log-probs + entropy, hpcalign's chunked path vs the plain one.

What the trainer does per micro-batch: log-probs and entropies of every completion token
(forward, with grad), a loss from the log-probs, backward (the entropy is a metric: no
gradient, as in hpcalign's GRPO loss and TRL). Shape: a tiny Qwen2 from transformers'
Qwen2Config (hidden 256, 2 layers, 4 heads, intermediate 1024, tied embeddings as in
Qwen2.5-0.5B) at Qwen2.5's vocabulary, 151,936, float32; 8 rows x 512 tokens, no padding.

- `plain`: `torch.log_softmax(model(ids).logits, -1).gather(...)` and the entropy from the
  same [B, T, V] log-probs under no_grad: what TRL and most trainers do. It computes every
  position whatever the mask, so it runs once per repeat.
- `ours` with the completion mask on the last 3/4 of each row (a 128-token prompt, 384
  completion tokens), and with every token masked in (`all`: N = 8 x 511 scored rows), so
  the figure is not only from skipping prompts.

Each measurement runs in a fresh subprocess (the order rotates every repeat): build the
model, one small warm-up step (kernels initialised, parameter .grad allocated), then
peak = ru_maxrss after the measured forward + backward minus ru_maxrss before it (on CUDA:
torch.cuda.max_memory_allocated over the same step). Time: wall and CPU seconds of that step.

    python tools/bench/logprobs_memory.py                  # 2 threads, 3 repeats
    python tools/bench/logprobs_memory.py --repeat 5 --chunk-mib 256

Prints ONE JSON line with medians. Targets: ours <= 25% of plain's peak at <= 1.1x its time.
NOTE: on a busy machine set OMP_WAIT_POLICY=PASSIVE (see tools/bench/sampler.py) and compare
CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from hpcalign.models import logprobs

MASKS = {"completion": 0.25, "all": 0.0}  # fraction of each row that is prompt


def plain_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The full-logits path of TRL-style trainers: [B, T, V] logits and log-probs."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
    logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def ours_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    logp, entropy = logprobs.token_logprobs(model, batch, with_entropy=True)
    return logp[:, 1:], entropy[:, 1:]


def _model(args: argparse.Namespace) -> torch.nn.Module:
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=1024,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=True, attn_implementation="sdpa", dtype="float32")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(args.device).train()


def _batch(batch: int, length: int, vocab: int, prompt_frac: float, device: str):
    gen = torch.Generator().manual_seed(1)
    completion = torch.zeros(batch, length, dtype=torch.long)
    completion[:, int(length * prompt_frac):] = 1
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=gen).to(device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
            "completion_mask": completion.to(device)}


def _step(model: torch.nn.Module, fn, batch: dict[str, torch.Tensor]) -> float:
    """Forward, a GRPO-like loss (per-row advantages on the completion tokens), backward."""
    logp, entropy = fn(model, batch)
    mask = batch["completion_mask"][:, 1:].float()
    advantages = torch.linspace(-1, 1, logp.shape[0], device=logp.device)[:, None]
    loss = -(logp * advantages * mask).sum() / mask.sum()
    loss.backward()
    return float((entropy.detach() * mask).sum() / mask.sum())


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    if args.chunk_mib:
        logprobs.LOGITS_CHUNK_BYTES = args.chunk_mib * 2**20
    fn = ours_logprobs if args.child == "ours" else plain_logprobs
    model = _model(args)
    _step(model, fn, _batch(1, 64, args.vocab, MASKS[args.mask], args.device))  # warm-up
    model.zero_grad(set_to_none=False)  # .grad stays allocated: part of the baseline
    batch = _batch(args.batch, args.length, args.vocab, MASKS[args.mask], args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, start_cpu = time.perf_counter(), time.process_time()
    entropy = _step(model, fn, batch)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss_kb) / 1024
    print(json.dumps({"peak_mb": peak_mb, "wall_s": wall, "cpu_s": cpu, "entropy": entropy}))


def _run_child(args: argparse.Namespace, variant: str, mask: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--mask", mask,
           "--threads", str(args.threads), "--batch", str(args.batch),
           "--length", str(args.length), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--device", args.device,
           "--chunk-mib", str(args.chunk_mib)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-mib", type=int, default=0,
                        help="override logprobs.LOGITS_CHUNK_BYTES (0: the module's value)")
    parser.add_argument("--child", choices=["ours", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--mask", choices=sorted(MASKS), default="completion",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    runs = [("plain", "completion"), ("ours", "completion"), ("ours", "all")]
    samples: dict[str, list[dict]] = {"plain": [], "ours_completion": [], "ours_all": []}
    entropies: dict[str, float] = {}
    for rep in range(args.repeat):
        for variant, mask in runs[rep % 3:] + runs[:rep % 3]:  # rotate the order
            key = "plain" if variant == "plain" else f"ours_{mask}"
            result = _run_child(args, variant, mask)
            samples[key].append(result)
            entropies[key] = round(result["entropy"], 5)

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in samples[key])

    chunk_bytes = args.chunk_mib * 2**20 or logprobs.LOGITS_CHUNK_BYTES
    result: dict = {
        "bench": "logprobs_memory", "device": args.device, "threads": args.threads,
        "repeat": args.repeat, "batch": args.batch, "length": args.length,
        "vocab": args.vocab, "hidden": args.hidden, "layers": 2,
        "chunk_rows": max(1, chunk_bytes // (4 * args.vocab)),
        "completion_mask": "last 3/4 of each row (ours_completion), every token (ours_all)",
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    for key in samples:
        result[key] = {"peak_mb": round(med(key, "peak_mb"), 1), "wall_s": round(med(key, "wall_s"), 3),
                       "cpu_s": round(med(key, "cpu_s"), 3)}
    for key in ("ours_completion", "ours_all"):
        result[f"{key}_vs_plain"] = {
            "peak": round(med(key, "peak_mb") / med("plain", "peak_mb"), 3),
            "wall": round(med(key, "wall_s") / med("plain", "wall_s"), 3),
            "cpu": round(med(key, "cpu_s") / med("plain", "cpu_s"), 3)}
    # same masked mean entropy from both paths on the completion mask: a cheap sanity check
    result["mean_entropy"] = entropies
    print(json.dumps(result))


if __name__ == "__main__":
    main()
