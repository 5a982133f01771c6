"""Batched KV-cache sampling of completions from an HF causal LM (the torch generator backend).

All prompts go through the model at once: prompts of different lengths are left-padded, with
an attention mask and position ids that make every row see exactly its own prompt, so a
prompt's completion does not depend on what else is in the batch (up to float rounding).
Each step feeds one new token per row through the HF KV cache (`DynamicCache`).

A row ends at the first of the model's EOS ids it samples (`eos_id` may list several, as
Qwen2.5's `generation_config.json` does: `<|im_end|>` and `<|endoftext|>`). Rows that
emitted EOS stay in the batch (fed `<pad>`, results ignored) rather than
being cut out of the cache: re-indexing every layer's cache each step costs more than the
few wasted rows at these sizes. The loop stops as soon as every row has finished.

Log-probs: `SampleOutput.logprobs` holds log-softmax(logits / temperature) of each sampled
token, i.e. under the temperature-scaled policy BEFORE top-k / top-p truncation. That is the
distribution `hpcalign.models.logprobs.token_logprobs` recomputes in the trainer, so with
top_k = 0 and top_p = 1 the PPO ratio starts at 1 (up to float rounding, ~1e-6); with truncation the recorded
value is the policy's own log-prob of the token, not the truncated sampler's.

All randomness comes from the `generator` argument (`torch.multinomial(..., generator=...)`):
the same generator state and inputs give bitwise-identical outputs. A list of generators,
one per row, gives every sequence its own random stream, so a row's tokens do not depend
on how many rows share its batch (offline rollouts: `engines/rollouts.py`, per-sample seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class SampleOutput:
    """Completions of one `sample` call, one entry per prompt, in prompt order."""

    tokens: list[list[int]]
    """Completion ids per sequence (EOS included when emitted; nothing after it)."""
    logprobs: list[list[float]]
    """Log-prob of each sampled token under the temperature-scaled, untruncated policy."""
    finished: list[bool]
    """True if the sequence emitted EOS within `max_new_tokens`."""


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`logits` [B, V] with tokens outside the top-k / nucleus set to -inf (in place).

    Top-k keeps every token tied with the k-th largest logit; top-p applies after top-k.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # keep a token while the mass strictly before it is < top_p (the top one is always kept)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def _padding_masks(
    key_ok: torch.Tensor, prompt_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Additive 4-D attention masks: prefill [B, 1, P, P] and all decode steps [B, 1, 1, P + N].

    None for both when no prompt is padded (the model then uses plain causal attention).
    NOTE: HF passes a 4-D mask through unchanged, so each decode step hands the model a view
    (the first P + t + 1 columns) of one mask built here, instead of HF rebuilding a mask
    from a 2-D one every step (~5% of the step time at the benchmark shape). Additive
    (0 / dtype min) masks work with both the "sdpa" and the "eager" attention code.
    """
    if bool(key_ok.all()):
        return None, None
    blocked = torch.finfo(dtype).min
    additive = torch.zeros(key_ok.shape, dtype=dtype, device=key_ok.device)
    additive.masked_fill_(~key_ok, blocked)
    step_mask = additive[:, None, None, :]  # [B, 1, 1, P + N]
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=key_ok.device).tril()
    allowed = causal[None, None] & key_ok[:, None, None, :prompt_len]  # [B, 1, P, P]
    # a padding query sees itself, so no row is fully masked (its softmax is then well defined
    # whatever the kernel does with an all-blocked row); real queries never see padding
    allowed |= torch.eye(prompt_len, dtype=torch.bool, device=key_ok.device)[None, None]
    prefill_mask = torch.zeros(allowed.shape, dtype=dtype, device=key_ok.device)
    prefill_mask.masked_fill_(~allowed, blocked)
    return prefill_mask, step_mask


def seeded_generator(model: torch.nn.Module, seed: int) -> torch.Generator:
    """A random generator on the model's device (CUDA sampling needs a CUDA generator).

    CPU and CUDA streams differ: equal seeds give equal samples on equal devices.
    """
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | Sequence[int],
    pad_id: int,
    generator: torch.Generator | Sequence[torch.Generator],
) -> SampleOutput:
    """Sample up to `max_new_tokens` tokens after each prompt (prompts include any `<bos>`).

    `eos_id`: the id, or the ids, that end a completion (-1 or an empty list: never stop
    early); `pad_id` only fills finished rows and left padding, which are masked.
    `generator`: one for the batch, or one per prompt (each row then draws from its own).
    """
    if not prompts:
        return SampleOutput(tokens=[], logprobs=[], finished=[])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    device = next(model.parameters()).device
    eos_ids = [int(eos_id)] if isinstance(eos_id, int) else [int(e) for e in eos_id]
    eos_ids = [e for e in eos_ids if e >= 0]
    row_generators = list(generator) if isinstance(generator, list | tuple) else None
    if row_generators is not None and len(row_generators) != len(prompts):
        raise ValueError(f"{len(row_generators)} random generators for {len(prompts)} prompts: "
                         "pass one for the batch or one per prompt")
    for gen in row_generators or [generator]:
        if gen.device.type != device.type:
            raise ValueError(f"the random generator is on {gen.device} but the model on "
                             f"{device}: use seeded_generator(model, seed)")
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    prompt_len = int(lengths.max())
    total_len = prompt_len + max_new_tokens

    # Left-padded prompts [B, P]; key_ok [B, P + N] says which cache positions are real tokens
    # (generated positions always are).
    input_ids = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
    key_ok = torch.ones((batch, total_len), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        pad = prompt_len - len(prompt)
        input_ids[row, pad:] = torch.tensor(prompt, dtype=torch.long)
        key_ok[row, :pad] = False
    position_ids = (key_ok[:, :prompt_len].cumsum(-1) - 1).clamp_(min=0)
    input_ids, key_ok, position_ids = (t.to(device) for t in (input_ids, key_ok, position_ids))
    next_position = lengths.to(device).unsqueeze(1)  # [B, 1] position of the next token
    prefill_mask, step_mask = _padding_masks(key_ok, prompt_len, next(model.parameters()).dtype)
    out_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = DynamicCache()
    eos_tensor = torch.tensor(eos_ids, dtype=torch.long, device=device)

    logits = model(
        input_ids=input_ids,
        attention_mask=prefill_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1, :]
    steps = 0
    for step in range(max_new_tokens):
        scaled = logits.float() / temperature
        logp_all = torch.log_softmax(scaled, dim=-1)  # [B, V] untruncated policy
        if top_k > 0 or top_p < 1.0:
            probs = torch.softmax(_truncate(scaled, top_k, top_p), dim=-1)
        else:
            probs = logp_all.exp()
        if row_generators is None:
            token = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
        else:  # every row from its own stream, whatever else is in the batch
            token = torch.cat([torch.multinomial(probs[row], 1, generator=gen)
                               for row, gen in enumerate(row_generators)]).unsqueeze(1)
        token.masked_fill_(finished.unsqueeze(1), pad_id)
        out_tokens[:, step : step + 1] = token
        out_logprobs[:, step : step + 1] = logp_all.gather(-1, token)
        finished |= torch.isin(token.squeeze(1), eos_tensor)
        steps = step + 1
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = model(
            input_ids=token,
            attention_mask=None if step_mask is None else step_mask[..., : prompt_len + step + 1],
            position_ids=next_position + step,
            cache=cache,
            use_cache=True,
        ).logits[:, -1, :]

    tokens_list = out_tokens[:, :steps].tolist()
    logprobs_list = out_logprobs[:, :steps].tolist()
    result = SampleOutput(tokens=[], logprobs=[], finished=finished.tolist())
    for row in range(batch):
        row_tokens, row_logprobs = tokens_list[row], logprobs_list[row]
        if result.finished[row]:
            end = next(t for t, token in enumerate(row_tokens) if token in eos_ids) + 1
            row_tokens, row_logprobs = row_tokens[:end], row_logprobs[:end]
        result.tokens.append(row_tokens)
        result.logprobs.append(row_logprobs)
    return result
