"""Per-token log-probs (and entropies) of completions under a causal LM, for the trainer.

`pack_sequences` right-pads prompt + completion pairs into one batch with a mask of the
completion tokens; `token_logprobs` returns, at every position t, log p(token_t | tokens_<t)
under log_softmax(logits / temperature), the same temperature scaling the sampler
(`hpcalign.models.sampler`) records, so the PPO ratio of fresh rollouts starts at 1.

Memory: a [B, T, V] float32 logits tensor is what breaks real runs (64 x 1024 tokens at
Qwen2.5's V = 151,936 is ~40 GB, and autograd keeps about two of them). So we never build
it. The decoder body alone gives the last hidden states [B, T, H]; only the N rows whose
next token is a completion token are kept (prompts and padding need nothing), and the
lm_head runs on them LOGITS_CHUNK_BYTES at a time inside `_ChunkedHeadLogprobs`, a custom
autograd function that keeps only hidden [N, H], logsumexp [N] and entropy [N] for
backward and recomputes each chunk's logits there. Peak memory beyond the body is then
one chunk (a few [rows, V] float32 buffers), not batch x length x vocab; the price is one
more [N, H] x [H, V] matmul in backward. `tools/bench/logprobs_memory.py` measures it
against the plain `log_softmax(model(ids).logits)` path (docs/benchmarks.md).

The body / head split (`_body_and_head`) is found generically (`get_decoder()` or
`base_model`, and `get_output_embeddings()`, tied or not), but trusted only for model types
in PLAIN_HEAD_MODEL_TYPES, whose forward is exactly `lm_head(body(...).last_hidden_state)`:
Gemma 2/3 soft-cap the logits, Granite divides them, Cohere multiplies them, and nothing in
the module tree says so. Any other model takes the old full-logits path (`_full_logits`):
correct, but [B, T, V] in memory.

Precision: the softmax, log-probs and entropies are always float32. The lm_head matmul runs
in the dtype the full path would use: the autocast dtype inside `torch.autocast`
(models/precision.py), else the weight's dtype (float32, or bf16 for a bf16 model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

# NOTE: 64 MiB of float32 logits per chunk = 110 rows at V = 151,936, 8,192 rows at V = 2,048
# (capped by N, so a 44-symbol tiny model takes one chunk). Forward and backward each hold
# two such buffers (plus a bf16 copy under autocast), so ~130 MiB at any vocabulary. Head
# alone, forward + backward of 3,064 rows at V = 151,936, H = 256, 2 threads on the 2-core
# CPU: 16 MiB chunks 21.0 s wall, 32 MiB 14.3 s, 64 MiB 10.8 s, 128 MiB 11.9 s, 256 MiB
# 18.2 s (that last one while the machine's load rose). Below ~100 rows the [rows, H] x
# [H, V] matmul loses efficiency; past 64 MiB nothing got faster, only bigger.
LOGITS_CHUNK_BYTES = 64 * 2**20

# Model types (config.model_type) whose causal-LM forward is `lm_head(last_hidden_state)`
# with nothing after it (checked in transformers' modeling_<type>.py). Others, e.g. gemma2 /
# gemma3 (final_logit_softcapping), granite (logits_scaling), cohere (logit_scale), take
# the full-logits path.
PLAIN_HEAD_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
    "olmo2", "gemma",
})


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
    body: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logp` [B, T] of each token given the tokens before it; `entropy` [B, T] if asked.

    Both are float32 and 0 at position 0 and wherever `completion_mask` is 0. Gradients flow
    when called outside `torch.no_grad()`. `body` replaces the model's decoder body (the
    same module compiled: `compiled_body`) where the body / head split applies.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    split = _body_and_head(model)
    if split is None:
        return _full_logits(model, batch, temperature, with_entropy)
    body, head = (split[0] if body is None else body), split[1]
    input_ids = batch["input_ids"]
    # Right padding: positions 0..len-1 are the real tokens, so the default position ids
    # (0, 1, 2, ...) are correct for every row.
    hidden = body(input_ids=input_ids, attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state  # [B, T, H]
    mask = batch["completion_mask"].bool().clone()
    mask[:, 0] = False  # position 0 has no context: its log-prob is defined as 0
    rows, cols = mask.nonzero(as_tuple=True)  # the N scored tokens, row-major
    # hidden at t-1 predicts token t
    logp_sel, entropy_sel = _ChunkedHeadLogprobs.apply(
        hidden[rows, cols - 1], head.weight, head.bias, input_ids[rows, cols],
        1.0 / temperature, with_entropy, _chunk_rows(head.weight.shape[0]))
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    logp = zeros.index_put((rows, cols), logp_sel)
    entropy = zeros.index_put((rows, cols), entropy_sel) if with_entropy else None
    return logp, entropy


def compiled_body(model: torch.nn.Module) -> torch.nn.Module | None:
    """`torch.compile` of the model's decoder body (dynamic shapes: batches differ in
    length), for `token_logprobs(..., body=)`; None where the split does not apply (those
    models keep the eager full-logits path). Parameters stay the model's own: weight sync,
    checkpoints and the optimizer see the same tensors.

    NOTE: only the body. The chunked head is a custom autograd function over gathered rows
    (its own matmuls dominate), and sampling is not compiled: a KV cache that grows every
    token compiled to 1.04x of eager on the benchmark shape (docs/benchmarks.md)."""
    split = _body_and_head(model)
    return None if split is None else torch.compile(split[0], dynamic=True)


def _chunk_rows(vocab: int) -> int:
    """Rows of logits per chunk: LOGITS_CHUNK_BYTES of float32, at least one row."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder body, lm_head) when `model` is a causal LM whose logits are lm_head(body).

    None sends `token_logprobs` down the full-logits path: an unlisted model type (its
    forward may change the logits after the head), or no body / linear head to be found.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    get_body = getattr(model, "get_decoder", None)
    body = get_body() if callable(get_body) else getattr(model, "base_model", None)
    if body is None or body is model:
        return None
    return body, head


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T + b) at the target token, and the entropy, chunk by chunk.

    Inputs: hidden [N, H], weight [V, H], bias [V] or None, targets [N] int64, inv_temp,
    with_entropy, chunk_rows. Outputs: logp [N] and entropy [N] (zeros without
    with_entropy), float32. With z = (h W^T + b) * inv_temp, p = softmax(z), lse =
    logsumexp(z), H = -sum p log p, backward uses
        d logp / dz = onehot(target) - p,    d H / dz = -p * (log p + H),
    recomputing z per chunk from the saved hidden rows, so nothing [N, V] outlives a chunk.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, inv_temp: float, with_entropy: bool,
                chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = hidden.device.type
        # NOTE: the matmul dtype the full path would use: under torch.autocast F.linear runs
        # in the autocast dtype; we cast explicitly and switch autocast off inside so that
        # forward and the recomputation in backward (which runs outside autocast) agree.
        compute_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                         else weight.dtype)
        with torch.autocast(device, enabled=False):
            logp, lse, entropy = _forward_chunks(hidden, weight.to(compute_dtype), bias, targets,
                                                 inv_temp, with_entropy, chunk_rows)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temp, ctx.with_entropy, ctx.chunk_rows = inv_temp, with_entropy, chunk_rows
        ctx.compute_dtype = compute_dtype
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logp: torch.Tensor | None,
                 grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            grad_entropy = None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight
                                                                  or need_bias):
            return None, None, None, None, None, None, None
        inv_temp = ctx.inv_temp
        # dz/dlogits = inv_temp: folded into the per-row [N] gradients, not the [c, V] ones
        g_logp = grad_logp.float() * inv_temp if grad_logp is not None else None
        g_ent = grad_entropy.float() * inv_temp if grad_entropy is not None else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # float32 accumulation across chunks, whatever the weight dtype
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_weight else None)
        grad_bias = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                     if need_bias else None)
        with torch.autocast(hidden.device.type, enabled=False):
            _backward_chunks(hidden, weight.to(ctx.compute_dtype), bias, targets, lse, entropy,
                             g_logp, g_ent, grad_hidden, grad_weight, grad_bias, inv_temp,
                             ctx.chunk_rows)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


# NOTE: both loops write every [c, V] intermediate into two buffers allocated once, with
# out= and in-place ops. A fresh 64 MiB tensor per op is a fresh mmap on CPU (glibc maps
# blocks over 32 MiB and unmaps them on free), and page-faulting it in cost as much as the
# op itself: exp() of 220 x 151,936 took 111 ms into a new tensor, 10 ms in place.

def _forward_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    targets: torch.Tensor, inv_temp: float, with_entropy: bool, chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logp [N], logsumexp [N] and entropy [N] (zeros unless with_entropy), float32.

    `weight` is already in the matmul dtype.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.zeros_like(logp)
    rows = min(chunk_rows, n)
    z_buf = hidden.new_empty((rows, vocab), dtype=torch.float32)
    exp_buf = torch.empty_like(z_buf)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        z = _logits_into(z_buf[:stop - start], hidden[start:stop], weight, bias, inv_temp)
        # shift by the row max in place: exp(z) then cannot overflow
        shift = z.amax(dim=-1, keepdim=True)
        z.sub_(shift)
        expz = torch.exp(z, out=exp_buf[:stop - start])
        sum_exp = expz.sum(dim=-1)
        log_sum = sum_exp.log()
        lse[start:stop] = shift.squeeze(-1) + log_sum
        logp[start:stop] = z.gather(-1, targets[start:stop, None]).squeeze(-1) - log_sum
        if with_entropy:
            # H = lse - E_p[z] = log_sum - sum(exp(z) z) / sum_exp (z shifted)
            entropy[start:stop] = log_sum - expz.mul_(z).sum(dim=-1) / sum_exp
    return logp, lse, entropy


def _backward_chunks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None, grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None,
    inv_temp: float, chunk_rows: int,
) -> None:
    """`_ChunkedHeadLogprobs.backward`'s loop: fills grad_hidden, adds into grad_weight/bias.

    `weight` is already in the matmul dtype. g_logp / g_ent are the [N] output gradients
    times inv_temp (None when that output got no gradient); per chunk
    dz = g_logp (onehot - p) - g_ent p (log p + H).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = min(chunk_rows, n)
    log_p_buf = hidden.new_empty((rows, vocab), dtype=torch.float32)
    p_buf = torch.empty_like(log_p_buf)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        hidden_c = hidden[start:stop].to(weight.dtype)
        log_p = _logits_into(log_p_buf[:stop - start], hidden_c, weight, bias, inv_temp)
        log_p.sub_(lse[start:stop, None])  # [c, V] log softmax, recomputed
        p = torch.exp(log_p, out=p_buf[:stop - start])
        if g_ent is not None:
            # -p (log p + H) g_ent, built in the log_p buffer
            dz = log_p.add_(entropy[start:stop, None]).mul_(p).mul_(-g_ent[start:stop, None])
            if g_logp is not None:
                dz.addcmul_(p, g_logp[start:stop, None], value=-1.0)
        else:
            dz = p.mul_(-g_logp[start:stop, None])
        if g_logp is not None:
            dz.scatter_add_(1, targets[start:stop, None], g_logp[start:stop, None])
        if grad_bias is not None:
            grad_bias += dz.sum(dim=0)
        if weight.dtype == torch.float32:
            if grad_hidden is not None and grad_hidden.dtype == torch.float32:
                torch.mm(dz, weight, out=grad_hidden[start:stop])
            elif grad_hidden is not None:
                grad_hidden[start:stop] = dz @ weight
            if grad_weight is not None:
                grad_weight.addmm_(dz.t(), hidden_c)
        else:  # bf16 / fp16 matmuls, as the full path's lm_head backward would run them
            dz = dz.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = dz @ weight
            if grad_weight is not None:
                grad_weight += (dz.t() @ hidden_c).float()


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, inv_temp: float) -> torch.Tensor:
    """(hidden W^T + b) * inv_temp written into the float32 [c, V] `out`, which it returns."""
    if weight.dtype == torch.float32:
        torch.mm(hidden.to(weight.dtype), weight.t(), out=out)
    else:
        out.copy_(hidden.to(weight.dtype) @ weight.t())
    if bias is not None:
        out += bias.float()
    if inv_temp != 1.0:
        out *= inv_temp
    return out


def _full_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [B, T, V] path for models `_body_and_head` does not trust: `model(...).logits`."""
    input_ids = batch["input_ids"]
    completion_mask = batch["completion_mask"]
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
