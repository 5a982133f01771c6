"""Per-token log-probs (and entropies) of completions under a causal LM, for the trainer.

`pack_sequences` right-pads prompt + completion pairs into one batch with a mask of the
completion tokens; `token_logprobs` runs one full forward and returns, at every position t,
log p(token_t | tokens_<t) under log_softmax(logits / temperature), the same temperature
scaling the sampler (`hpcalign.models.sampler`) records, so the PPO ratio of fresh rollouts
starts at 1.

Memory: logits are [B, T, V]; we take one log_softmax over V and gather the token column,
and compute the entropy from the same log-probs only when asked (no [B, T, V] copies kept
beyond what autograd needs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_sequences(
    prompts: list[Sequence[int]], completions: list[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `completion_mask`, all [B, T] int64.

    `completion_mask[b, t]` is 1 where token t of row b belongs to the completion.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("pack_sequences needs at least one sequence")
    total = max(len(p) + len(c) for p, c in zip(prompts, completions))
    batch = len(prompts)
    input_ids = torch.full((batch, total), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, total), dtype=torch.long)
    completion_mask = torch.zeros((batch, total), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        n_prompt, n_all = len(prompt), len(prompt) + len(completion)
        if n_all:
            input_ids[row, :n_all] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[row, :n_all] = 1
        completion_mask[row, n_prompt:n_all] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


def token_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logp` [B, T] of each token given the tokens before it; `entropy` [B, T] if asked.

    Both are 0 at position 0 and wherever `completion_mask` is 0. Gradients flow when called
    outside `torch.no_grad()`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    input_ids = batch["input_ids"]
    completion_mask = batch["completion_mask"]
    # Right padding: positions 0..len-1 are the real tokens, so the default position ids
    # (0, 1, 2, ...) are correct for every row.
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1, :].float()  # [B, T-1, V] predicts tokens 1..T-1
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    target = input_ids[:, 1:].unsqueeze(-1)
    mask = completion_mask[:, 1:].bool()
    zeros = logp_all.new_zeros((logp_all.shape[0], 1))
    # NOTE: torch.where, not a multiply, so a -inf at a masked position cannot become NaN.
    logp = torch.where(mask, logp_all.gather(-1, target).squeeze(-1), 0.0)  # [B, T-1]
    logp = torch.cat([zeros, logp], dim=1)
    entropy = None
    if with_entropy:
        # xlogy(p, p) is 0 where p == 0, so a vocabulary entry of probability 0 adds nothing
        ent = -torch.special.xlogy(logp_all.exp(), logp_all.exp()).sum(-1)  # [B, T-1]
        entropy = torch.cat([zeros, torch.where(mask, ent, 0.0)], dim=1)
    return logp, entropy
