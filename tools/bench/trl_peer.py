"""The peer of tools/bench/grpo_throughput.py: TRL's GRPOTrainer at the same shape.

Runs inside the bench's own TRL venv (grpo_throughput.py makes it; TRL is never a runtime
dependency of hpcalign), so it imports nothing of hpcalign. Same model directory, same
prompts, same batch (P prompts x K samples, one optimizer step per generation batch),
same completion length with EOS suppressed (`min_new_tokens`, as hpcalign's
`generator.ignore_eos`), same KL coefficient, float32 on CPU, the same thread count.
Steady state = median wall time of a training step (TRL generates inside it) after the
warm-up steps. Prints ONE JSON line.

    .venv-trl/bin/python tools/bench/trl_peer.py --model DIR --prompts FILE.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def partial_match(completions, answer, **kwargs):
    """hpcalign's built-in `partial_match`, restated (this venv has no hpcalign)."""
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        if completion == gold:
            scores.append(1.0)
        else:
            matches = sum(1 for a, b in zip(completion, gold) if a == b)
            scores.append(matches / max(len(completion), len(gold), 1))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL with prompt and answer")
    parser.add_argument("--out", required=True, help="scratch output directory")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kl", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    batch = args.prompts_per_step * args.samples_per_prompt
    config = GRPOConfig(
        output_dir=args.out, use_cpu=True, bf16=False, fp16=False, report_to="none",
        per_device_train_batch_size=batch, generation_batch_size=batch,
        num_generations=args.samples_per_prompt, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, beta=args.kl,
        num_iterations=1, learning_rate=1e-6, max_steps=args.steps, logging_steps=1,
        save_strategy="no", seed=0, temperature=1.0, dataloader_num_workers=0,
        disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    dataset = load_dataset("json", data_files=args.prompts, split="train")

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer = GRPOTrainer(model=model, reward_funcs=partial_match, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[StepTimer()])
    trainer.train()
    steady = times[args.warmup:]
    step_s = statistics.median(steady)
    print(json.dumps({"peer": "trl", "trl": trl.__version__, "torch": torch.__version__,
                      "steps": len(times), "step_s": round(step_s, 4),
                      "samples_per_s": round(batch / step_s, 2)}))


if __name__ == "__main__":
    main()
