"""The one GRPO-style case every megatron layout and the torch engine are run on.

Shared by tests/integration/test_megatron_engine.py (the torch engine, in-process) and
mpi_scripts/megatron_parity.py (the megatron engine, under mpiexec), so both sides build
the same batch and loss from nothing but the engine's tokenizer and fixed seeds.
"""

from __future__ import annotations

import torch

from hpcalign.algorithms.grpo import grpo_loss
from hpcalign.engines import OptimizerSpec

# NOTE: one AdamW step from zero moments moves each weight by ~lr * sign(grad), except
# where the gradient is near zero and float rounding decides: at lr = 5e-4 that noise
# stays below 1e-5 (at 1e-2 it reached 1e-4 between two correct engines) while a wrong
# gradient moves a weight by ~1e-3. grad_clip < the grad norm (5.4): the clip path runs.
SPEC = OptimizerSpec(lr=5e-4, betas=(0.9, 0.99), weight_decay=0.01, grad_clip=1.0)
TEMPERATURE = 0.9


def fixed_ids(vocab: int) -> torch.Tensor:
    """[3, 13] token ids for the logits comparison."""
    return torch.randint(0, vocab, (3, 13), generator=torch.Generator().manual_seed(3))


def batches(engine):
    """Two micro-batches (B = 3 and 2, different lengths), advantages, reference noise."""
    gen = torch.Generator().manual_seed(7)
    vocab = len(engine.tokenizer)

    def seqs(n, low, high):
        return [torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=gen)),),
                              generator=gen).tolist() for _ in range(n)]

    packed = [engine.pack(seqs(3, 2, 5), seqs(3, 1, 6)), engine.pack(seqs(2, 3, 6), seqs(2, 2, 7))]
    advantages = [torch.randn(3, generator=gen).to(engine.device),
                  torch.randn(2, generator=gen).to(engine.device)]
    noise = [0.05 * torch.randn(b["input_ids"].shape, generator=gen).to(engine.device)
             for b in packed]
    return packed, advantages, noise


def reference_inputs(engine, packed, noise):
    """old = the engine's own log-probs (ratio 1), ref = old + noise (a KL term)."""
    olds, refs, entropies = [], [], []
    for batch, eps in zip(packed, noise):
        logp, entropy = engine.logprobs(batch, temperature=TEMPERATURE, with_entropy=True)
        olds.append(logp)
        refs.append(torch.where(batch["completion_mask"].bool(), logp + eps, 0.0))
        entropies.append(entropy)
    return olds, refs, entropies


def loss_fn_for(packed, advantages, olds, refs):
    """GRPO loss over the global token count of both micro-batches (they add up)."""
    token_count = float(sum(b["completion_mask"][:, 1:].sum() for b in packed))

    def loss_fn(index, batch, logp, entropy):
        loss, parts = grpo_loss(logp, olds[index], refs[index], advantages[index],
                                batch["completion_mask"], clip_eps=0.2, kl_coef=0.05,
                                token_count=token_count)
        fmask = batch["completion_mask"].float()
        return loss, {"loss": float(loss.detach()), "pg_loss": parts["pg_loss"],
                      "entropy": float((entropy.detach() * fmask).sum()) / token_count}

    return loss_fn
