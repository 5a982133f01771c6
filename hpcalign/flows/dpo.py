"""Offline DPO: a policy trained on preference pairs against its frozen reference.

The flow over two named models, `policy` (a training engine) and `reference` (a frozen
one), in one process (CPU or one GPU):

1. *experience, once*: the reference's summed log-probs of every chosen and rejected
   completion (train and eval pairs), kept in `RUN_DIR/reference/*.h5`
   (`data/reference_logps.py`) and reused by every step, epoch and resume — the reference
   is never run again (`reference_forwards` in the metrics counts its forwards);
2. *train*: per step, `trainer.batch` pairs in seeded shuffled epochs
   (`data.datasets.indices_for_step`), the policy's log-probs of both completions in one
   packed batch, `hpcalign.algorithms.dpo_loss` (TRL's definitions), one AdamW step
   through `TrainingEngine.train_step`;
3. checkpoints (`checkpoint.every_steps`: policy weights, optimizer, RNG, the step) from
   which a killed run resumes bitwise; metrics per step in `RUN_DIR/metrics.jsonl`:
   `loss`, `rewards_chosen`, `rewards_rejected`, `reward_margin`, `preference_accuracy`
   (TRL's names, the implicit rewards beta * log-ratio), and `eval_preference_accuracy` /
   `eval_reward_margin` on `data.eval` every `trainer.eval_every_steps` and at the end.

    hpcalign run configs/dpo-tiny.yaml models.policy.path=DIR data.train=PAIRS.jsonl \\
        data.eval=EVAL.jsonl run_dir=RUN
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch

from hpcalign.config.dpo import DPOConfig
from hpcalign.data.preferences import TokenizedPairs

log = logging.getLogger(__name__)


def pair_batch(engine: Any, pairs: TokenizedPairs, rows: Any) -> dict[str, torch.Tensor]:
    """One packed batch [2P, T]: the chosen completions of `rows`, then the rejected."""
    prompts = [pairs.prompts[i] for i in rows]
    return engine.pack(prompts + prompts, [pairs.chosen[i] for i in rows]
                       + [pairs.rejected[i] for i in rows])


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob [B], completion tokens [B]) of per-token log-probs [B, T]."""
    fmask = mask.to(logp.dtype)
    return (logp * fmask).sum(-1), fmask.sum(-1)


def preference_scores(total: torch.Tensor, tokens: torch.Tensor,
                      loss_type: str) -> torch.Tensor:
    """What the loss compares: summed log-probs, or per-token means for IPO (as TRL does)."""
    return total / tokens.clamp(min=1) if loss_type == "ipo" else total


def _reference_logps(engine: Any, pairs: TokenizedPairs, batch: int):
    from hpcalign.data.reference_logps import ReferenceLogps

    out = {name: [] for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
    for first in range(0, len(pairs), batch):
        rows = range(first, min(first + batch, len(pairs)))
        packed = pair_batch(engine, pairs, rows)
        total, tokens = sequence_logps(engine.logprobs(packed, temperature=1.0)[0],
                                       packed["completion_mask"])
        half = len(rows)
        out["chosen"].append(total[:half].double().cpu())
        out["rejected"].append(total[half:].double().cpu())
        out["chosen_tokens"].append(tokens[:half].long().cpu())
        out["rejected_tokens"].append(tokens[half:].long().cpu())
    return ReferenceLogps(**{k: torch.cat(v).numpy() for k, v in out.items()})


def _stored_reference(engine: Any, pairs: TokenizedPairs, path: str, model_hash: str, data_path: str,
                      batch: int, counter: dict[str, int]):
    """The reference log-probs of `pairs`: read back, or computed now and stored."""
    from hpcalign.data.manifest import content_hash
    from hpcalign.data.reference_logps import ReferenceLogps

    data_hash = content_hash(data_path)
    store = ReferenceLogps.load_or_none(path, data_hash=data_hash, model_hash=model_hash,
                                        pairs=len(pairs))
    if store is None:
        store = _reference_logps(engine, pairs, batch)
        counter["reference_forwards"] += -(-len(pairs) // batch)
        store.save(path, data_hash=data_hash, model_hash=model_hash)
    return store


def _evaluate(policy: Any, pairs: TokenizedPairs, ref, cfg: DPOConfig) -> dict[str, float]:
    from hpcalign.algorithms import dpo_implicit_rewards

    margins = []
    for first in range(0, len(pairs), cfg.trainer.batch):
        rows = np.arange(first, min(first + cfg.trainer.batch, len(pairs)))
        packed = pair_batch(policy, pairs, rows)
        total, _ = sequence_logps(policy.logprobs(packed, temperature=1.0)[0],
                                  packed["completion_mask"])
        total = total.double().cpu()
        half = len(rows)
        chosen = dpo_implicit_rewards(total[:half], torch.from_numpy(ref.chosen[rows]),
                                      cfg.dpo.beta)
        rejected = dpo_implicit_rewards(total[half:], torch.from_numpy(ref.rejected[rows]),
                                        cfg.dpo.beta)
        margins.append(chosen - rejected)
    margin = torch.cat(margins)
    return {"eval_preference_accuracy": float((margin > 0).double().mean()),
            "eval_reward_margin": float(margin.mean())}


def _loss_fn(cfg: DPOConfig, ref: Any, rows: np.ndarray, device: torch.device):
    """The `LossFn` of one step over pairs `rows` (chosen rows first, then rejected)."""
    from hpcalign.algorithms import dpo_implicit_rewards, dpo_loss

    half, beta, loss_type = len(rows), cfg.dpo.beta, cfg.dpo.loss_type
    ref_c, ref_r, ref_ct, ref_rt = (torch.from_numpy(a[rows]).to(device) for a in (
        ref.chosen, ref.rejected, ref.chosen_tokens, ref.rejected_tokens))

    def loss_fn(_index: int, batch: dict[str, torch.Tensor], logp: torch.Tensor,
                _entropy: Any) -> tuple[torch.Tensor, dict[str, float]]:
        total, tokens = sequence_logps(logp, batch["completion_mask"])
        total, tokens = total.double(), tokens.double()
        chosen, rejected = total[:half], total[half:]
        losses = dpo_loss(preference_scores(chosen, tokens[:half], loss_type),
                          preference_scores(rejected, tokens[half:], loss_type),
                          preference_scores(ref_c, ref_ct, loss_type),
                          preference_scores(ref_r, ref_rt, loss_type),
                          beta=beta, loss_type=loss_type,
                          label_smoothing=cfg.dpo.label_smoothing)
        with torch.no_grad():
            reward_c = dpo_implicit_rewards(chosen, ref_c, beta)
            reward_r = dpo_implicit_rewards(rejected, ref_r, beta)
            metrics = {"loss": float(losses.mean()),
                       "rewards_chosen": float(reward_c.mean()),
                       "rewards_rejected": float(reward_r.mean()),
                       "reward_margin": float((reward_c - reward_r).mean()),
                       "preference_accuracy": float((reward_c > reward_r).double().mean())}
        return losses.mean().float(), metrics

    return loss_fn


def run_dpo(cfg: DPOConfig) -> int:
    """Train (or resume) the DPO run of `cfg`; 0 when done."""
    from transformers.utils import logging as hf_logging

    from hpcalign import faults
    from hpcalign.config.load import dump_config
    from hpcalign.config.schema import Config
    from hpcalign.data.datasets import indices_for_step
    from hpcalign.data.manifest import content_hash
    from hpcalign.data.preferences import load_preference_dataset
    from hpcalign.durable import atomic_write_text
    from hpcalign.engines import OptimizerSpec, build_training_engine
    from hpcalign.errors import UserError
    from hpcalign.launch.claim import take_claim
    from hpcalign.launch.rundir import list_checkpoints
    from hpcalign.plan.placement import auto_threads
    from hpcalign.roles.device import role_device

    hf_logging.disable_progress_bar()
    try:
        device = role_device(cfg.trainer.device, "trainer.device")
    except RuntimeError as err:
        raise UserError(str(err)) from err
    claim = take_claim(cfg.run_dir, "run")
    # floats depend on the intra-op thread count: fix it, so a resumed run (or one started
    # from another process) computes exactly what the uninterrupted one did
    threads_before = torch.get_num_threads()
    torch.set_num_threads(auto_threads(cfg.trainer.threads, 1))
    try:
        faults.configure(cfg.run_dir)
        atomic_write_text(os.path.join(cfg.run_dir, "config.yaml"), dump_config(cfg))
        tcfg = cfg.trainer

        def engine_config(model) -> Config:  # what a torch engine reads: the model section
            return Config(run_dir=cfg.run_dir, model=model)

        reference_cfg = cfg.reference
        reference = build_training_engine("torch", reference_cfg.path,
                                          engine_config(reference_cfg), device=device)
        train = TokenizedPairs(load_preference_dataset(cfg.data.train), reference.tokenizer,
                       cfg.data.max_tokens)
        held_out = (TokenizedPairs(load_preference_dataset(cfg.data.eval), reference.tokenizer,
                           cfg.data.max_tokens) if cfg.data.eval else None)
        counter = {"reference_forwards": 0}
        model_hash = content_hash(reference_cfg.path)
        ref_dir = os.path.join(cfg.run_dir, "reference")
        ref_train = _stored_reference(reference, train, os.path.join(ref_dir, "train.h5"),
                                      model_hash, cfg.data.train, tcfg.batch, counter)
        ref_eval = (_stored_reference(reference, held_out, os.path.join(ref_dir, "eval.h5"),
                                      model_hash, cfg.data.eval, tcfg.batch, counter)
                    if held_out is not None else None)
        del reference  # never run again

        policy = build_training_engine(
            "torch", cfg.models.policy.path, engine_config(cfg.models.policy), device=device,
            optimizer=OptimizerSpec(lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                    grad_clip=tcfg.grad_clip))
        start = 0
        steps = list_checkpoints(cfg.run_dir)
        if steps:
            start = int(policy.load_checkpoint(cfg.run_dir, steps[-1])["step"])
            log.info("resumed from checkpoint step %d", start)
        metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")
        _keep_metrics_before(metrics_path, start)
        began = time.perf_counter()
        row: dict[str, Any] = {}
        for step in range(start, tcfg.steps):
            rows = indices_for_step(len(train), cfg.seed, step, tcfg.batch)
            loss_fn = _loss_fn(cfg, ref_train, rows, device)
            result = policy.train_step([pair_batch(policy, train, rows)], loss_fn, temperature=1.0)
            row = {"step": step, **result.metrics,
                   "grad_norm": None if np.isnan(result.grad_norm) else result.grad_norm,
                   "reference_forwards": counter["reference_forwards"],
                   "time_s": time.perf_counter() - began}
            last = step == tcfg.steps - 1
            if ref_eval is not None and (last or (tcfg.eval_every_steps and
                                                  (step + 1) % tcfg.eval_every_steps == 0)):
                row.update(_evaluate(policy, held_out, ref_eval, cfg))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            every = cfg.checkpoint.every_steps
            if last or (every and (step + 1) % every == 0):
                policy.save_checkpoint(cfg.run_dir, step + 1,
                                       {"step": step + 1, "policy_version": step + 1,
                                        "seed": cfg.seed}, keep=cfg.checkpoint.keep)
                faults.maybe_fire("after-checkpoint", step=step + 1)
        policy.save_model(os.path.join(cfg.run_dir, "model"))
        atomic_write_text(os.path.join(cfg.run_dir, "state.json"),
                          json.dumps({"state": "done", "step": tcfg.steps}) + "\n")
    finally:
        torch.set_num_threads(threads_before)
        claim.release()
    summary = f"dpo: {tcfg.steps} steps on {len(train)} pairs"
    if row:
        summary += f", loss {row['loss']:.4f}, preference accuracy {row['preference_accuracy']:.3f}"
        if "eval_preference_accuracy" in row:
            summary += f", held-out {row['eval_preference_accuracy']:.3f}"
    print(f"{summary}; reference forwards this run: {counter['reference_forwards']}; "
          f"model in {os.path.join(cfg.run_dir, 'model')}")
    return 0


def _keep_metrics_before(path: str, step: int) -> None:
    """metrics.jsonl holds exactly the steps before `step` (a resumed run rewrites the rest)."""
    from hpcalign.durable import atomic_write_text

    kept = []
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            try:
                if json.loads(line).get("step", step) < step:
                    kept.append(line)
            except ValueError:
                continue  # a torn last line of a killed run
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
