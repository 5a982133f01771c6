"""Per-token log-probs and entropies from vocabulary-sharded logits (no full-logits gather).

Each TP rank holds logits [B, T, V_pad / tp] for its slice of the (padded) vocabulary.
`tensor_parallel.vocab_parallel_cross_entropy` gives -log p(target) with two TP
all-reduces of [B, T] scalars (max and sum of exp), never the [B, T, V] logits; the
entropy is built the same way (`reduce_from_tensor_model_parallel_region`: an
all-reduce whose backward is the identity, so each shard's gradient stays local).

The padded vocabulary rows (zeros in the output layer, so logit 0) are set to -inf
first: they would otherwise take probability mass the HF model does not have, and could
be sampled. Conventions are `hpcalign.models.logprobs.token_logprobs`'s: float32 under
log_softmax(logits / temperature), 0 at position 0 and outside `completion_mask`.
"""

from __future__ import annotations

import torch


def shard_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                   completion_mask: torch.Tensor, *, temperature: float, vocab: int,
                   tp_rank: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp [B, T], entropy [B, T] or None) from this TP rank's logits [B, T, V_pad/tp]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    part = logits.shape[-1]
    # position t predicts token t + 1: drop the last position's logits
    scaled = logits[:, :-1].float() / temperature  # [B, T-1, V_pad/tp]
    ids = torch.arange(tp_rank * part, (tp_rank + 1) * part, device=logits.device)
    padding = ids >= vocab  # [V_pad/tp], True on the vocabulary padding
    if bool(padding.any()):
        scaled = scaled.masked_fill(padding, float("-inf"))
    scaled = scaled.contiguous()
    targets = input_ids[:, 1:].contiguous()
    keep = completion_mask[:, 1:].bool()
    logp_tail = -vocab_parallel_cross_entropy(scaled.clone(), targets)  # [B, T-1]
    zero = torch.zeros(input_ids.shape[0], 1, dtype=torch.float32, device=logits.device)
    logp = torch.cat([zero, torch.where(keep, logp_tail, 0.0)], dim=1)
    if not with_entropy:
        return logp, None
    # H = log Z - sum_v p_v z_v with z = scaled - max (max over every shard; no grad needed)
    local_max = scaled.detach().amax(dim=-1)
    torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX,
                                 group=_tp_group())
    z = scaled - local_max.unsqueeze(-1)
    exp_z = torch.exp(z)
    sum_exp = reduce_from_tensor_model_parallel_region(exp_z.sum(dim=-1))
    weighted = reduce_from_tensor_model_parallel_region(
        torch.where(padding, 0.0, exp_z * z).sum(dim=-1))
    entropy_tail = torch.log(sum_exp) - weighted / sum_exp
    entropy = torch.cat([zero, torch.where(keep, entropy_tail, 0.0)], dim=1)
    return logp, entropy


def _tp_group() -> torch.distributed.ProcessGroup:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()
