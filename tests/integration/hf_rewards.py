"""TRL-signature reward functions for the runs in test_local_hf.py, loaded by import path
on the generator ranks (PYTHONPATH=tests/integration), written as a TRL user writes them."""

from __future__ import annotations


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def shared_prefix(prompts, completions, completion_ids, answer, **kwargs):
    """Characters of the answer the completion gets right from the start, over its length;
    None (not applicable) for rows whose answer is empty."""
    rewards = []
    for completion, gold in zip(completions, answer):
        if not gold:
            rewards.append(None)
            continue
        text = _text(completion).strip()
        agree = 0
        for a, b in zip(text, gold):
            if a != b:
                break
            agree += 1
        rewards.append(agree / max(len(gold), len(text)))
    return rewards


def brevity(completions, completion_ids, **kwargs):
    """Shorter is better: -tokens / 100 (uses completion_ids, as TRL passes them)."""
    return [-len(ids) / 100 for ids in completion_ids]
