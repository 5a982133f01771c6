"""The peer of tools/bench/dpo_throughput.py: TRL's DPOTrainer at the same shape.

Runs inside the bench's own TRL venv (made by grpo_throughput.trl_python; TRL is never a
runtime dependency of hpcalign), importing nothing of hpcalign. Same model directory,
same pairs (JSONL: prompt, chosen, rejected), same batch of pairs per optimizer step, the
reference log-probs precomputed before training (`precompute_ref_log_probs`, as hpcalign
stores them), sigmoid loss, float32 on CPU, the same thread count. Steady state = median
wall time of a training step after the warm-up steps. Prints ONE JSON line.

    .venv-trl/bin/python tools/bench/trl_dpo_peer.py --model DIR --pairs FILE.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    config = DPOConfig(
        output_dir=args.out, use_cpu=True, bf16=False, fp16=False, report_to="none",
        per_device_train_batch_size=args.batch, learning_rate=1e-4, beta=0.1,
        loss_type=["sigmoid"], precompute_ref_log_probs=True, max_steps=args.steps,
        logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.pairs, split="train")
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    step_s = statistics.median(times[args.warmup:])
    print(json.dumps({"peer": "trl", "trl": trl.__version__, "torch": torch.__version__,
                      "steps": len(times), "step_s": round(step_s, 4),
                      "pairs_per_s": round(args.batch / step_s, 2)}))


if __name__ == "__main__":
    main()
