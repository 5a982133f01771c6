"""`hpcalign train-rm CONFIG [key=value ...]`: train a reward model on preference pairs.

The reward model of RLHF-PPO, trained as TRL's RewardTrainer trains one: the user's
causal LM with a scalar head (models/reward_model.py), pairs in TRL's format
(data/preferences.py), the Bradley-Terry loss with the dataset's optional margin, AdamW.
Every `trainer.eval_every_steps` and at the end it reports, on `data.eval`, the share of
held-out pairs ranked right (`eval_accuracy`) and the mean reward margin
(`eval_margin`); the training batch's `accuracy` and `margin` beside `loss`. Output in
`run_dir` (mode 0700): `model/` (an HF sequence-classification checkpoint:
`AutoModelForSequenceClassification.from_pretrained(run_dir + "/model")`), `metrics.jsonl`,
`config.yaml`.

    hpcalign train-rm configs/rm-tiny.yaml model.path=BASE data.train=PAIRS.jsonl \\
        data.eval=EVAL.jsonl run_dir=RM

One process (CPU or one GPU); no mid-run checkpoints: a killed run starts again.
"""

from __future__ import annotations

import argparse
import json
import os
import time

HELP = "train a reward model (Bradley-Terry) on preference pairs in TRL's format"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign train-rm", description=HELP)
    parser.add_argument("config", metavar="CONFIG")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    from hpcalign.config.load import load_config
    from hpcalign.config.reward_model import RewardModelConfig

    cfg = load_config(args.config, args.overrides, root=RewardModelConfig)

    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from hpcalign.data.datasets import indices_for_step
    from hpcalign.data.preferences import TokenizedPairs, load_preference_dataset
    from hpcalign.durable import atomic_write_text
    from hpcalign.launch.claim import take_claim
    from hpcalign.models.hf import load_tokenizer
    from hpcalign.models.reward_model import load_reward_model, reward_pad_id, save_reward_model
    from hpcalign.roles.device import role_device

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "some weights newly initialized": the score head, meant
    tokenizer = load_tokenizer(cfg.model.path)
    train = TokenizedPairs(load_preference_dataset(cfg.data.train), tokenizer, cfg.data.max_tokens)
    held_out = (TokenizedPairs(load_preference_dataset(cfg.data.eval), tokenizer,
                               cfg.data.max_tokens)
                if cfg.data.eval else None)
    try:
        device = role_device(cfg.trainer.device, "trainer.device")
    except RuntimeError as err:
        from hpcalign.errors import UserError

        raise UserError(str(err)) from err
    claim = take_claim(cfg.run_dir, "train-rm")
    try:
        from hpcalign.config.load import dump_config

        atomic_write_text(os.path.join(cfg.run_dir, "config.yaml"), dump_config(cfg))
        model = load_reward_model(cfg.model.path, cfg.model.dtype, seed=cfg.seed).to(device)
        pad = reward_pad_id(tokenizer)
        tcfg = cfg.trainer
        optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr,
                                      weight_decay=tcfg.weight_decay)
        metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
        open(metrics_path, "w").close()
        start = time.perf_counter()
        for step in range(tcfg.steps):
            model.train()
            rows = indices_for_step(len(train), cfg.seed, step, tcfg.batch)
            chosen, rejected = _rewards(model, train, rows, pad, device)
            margin = (torch.tensor([train.margins[i] for i in rows], device=device)
                      if tcfg.use_margin else None)
            from hpcalign.models.reward_model import bradley_terry_loss

            loss = bradley_terry_loss(chosen, rejected, margin).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (float(torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip))
                         if tcfg.grad_clip > 0 else float("nan"))
            optimizer.step()
            with torch.no_grad():
                difference = chosen - rejected
                row = {"step": step, "loss": float(loss),
                       "accuracy": float((difference > 0).float().mean()),
                       "margin": float(difference.mean()), "grad_norm": grad_norm,
                       "time_s": time.perf_counter() - start}
            last = step == tcfg.steps - 1
            if held_out is not None and (last or (tcfg.eval_every_steps
                                                  and (step + 1) % tcfg.eval_every_steps == 0)):
                row.update(evaluate(model, held_out, pad, device, tcfg.batch))
            with open(metrics_path, "a") as f:
                f.write(json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v)
                                    for k, v in row.items()}) + "\n")
        save_reward_model(model.cpu(), tokenizer, cfg.model.path,
                          os.path.join(cfg.run_dir, "model"))
    finally:
        claim.release()
    summary = (f"train-rm: {tcfg.steps} steps on {len(train)} pairs, loss {row['loss']:.4f}, "
               f"batch accuracy {row['accuracy']:.3f}")
    if "eval_accuracy" in row:
        summary += (f", held-out accuracy {row['eval_accuracy']:.3f} (margin "
                    f"{row['eval_margin']:.3f}) on {len(held_out)} pairs")
    print(f"{summary}; saved {os.path.join(cfg.run_dir, 'model')}")
    return 0


def _rewards(model, pairs, rows, pad: int, device):
    """(chosen rewards [P], rejected rewards [P]) of pairs `rows`, in one forward."""
    from hpcalign.models.reward_model import pack_right, sequence_rewards

    sequences = ([pairs.prompts[i] + pairs.chosen[i] for i in rows]
                 + [pairs.prompts[i] + pairs.rejected[i] for i in rows])
    ids, mask = pack_right(sequences, pad, device)
    rewards = sequence_rewards(model, ids, mask)
    return rewards[:len(rows)], rewards[len(rows):]


def evaluate(model, pairs, pad: int, device, batch: int) -> dict[str, float]:
    """`eval_accuracy` (share of pairs with r_chosen > r_rejected) and `eval_margin`."""
    import torch

    model.eval()
    differences = []
    with torch.no_grad():
        for first in range(0, len(pairs), batch):
            chosen, rejected = _rewards(model, pairs, range(first, min(first + batch, len(pairs))),
                                        pad, device)
            differences.append(chosen - rejected)
    difference = torch.cat(differences)
    return {"eval_accuracy": float((difference > 0).float().mean()),
            "eval_margin": float(difference.mean())}
