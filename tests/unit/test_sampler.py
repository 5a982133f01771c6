"""KV-cache sampler against step-by-step decoding without a cache, plus its contracts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hpcalign.config.schema import ModelInit
from hpcalign.models.sampler import SampleOutput, sample
from hpcalign.models.tiny import build_model

EOS, PAD = 2, 0
PROMPTS = [[1, 4, 5, 6, 40], [1, 9, 40], [1, 7, 8, 9, 10, 11, 12, 40], [1, 40]]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    # big enough init scale that the next-token distributions are not all near-uniform
    model = build_model(ModelInit(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64,
                                  seed=7), vocab_size=44)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.mul_(8)
    return model


def _run(model, prompts=PROMPTS, seed=0, **kw) -> SampleOutput:
    kw.setdefault("max_new_tokens", 6)
    return sample(model, prompts, eos_id=kw.pop("eos_id", EOS), pad_id=PAD,
                  generator=torch.Generator().manual_seed(seed), **kw)


@torch.no_grad()
def _full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits [V] after `ids`, by a plain forward of the whole sequence, no cache."""
    return model(torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def test_same_seed_identical_other_seed_different(model):
    a, b = _run(model, seed=1), _run(model, seed=1)
    assert a == b  # tokens, logprobs and finished, bitwise
    c = _run(model, seed=2)
    assert c.tokens != a.tokens


def test_greedy_equals_argmax_decoding_without_cache(model):
    out = _run(model, top_k=1, max_new_tokens=8, eos_id=-1)
    for prompt, tokens in zip(PROMPTS, out.tokens):
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(_full_logits(model, ids).argmax()))
        assert tokens == ids[len(prompt):]
    tiny_temperature = _run(model, temperature=1e-4, max_new_tokens=8, eos_id=-1)
    assert tiny_temperature.tokens == out.tokens


def test_left_padding_does_not_change_a_prompts_output(model):
    batched = _run(model, top_k=1, max_new_tokens=8, eos_id=-1)
    for i, prompt in enumerate(PROMPTS):
        alone = _run(model, prompts=[prompt], top_k=1, max_new_tokens=8, eos_id=-1)
        assert alone.tokens[0] == batched.tokens[i]
        torch.testing.assert_close(torch.tensor(alone.logprobs[0]),
                                   torch.tensor(batched.logprobs[i]), atol=1e-5, rtol=0)


def test_logprobs_are_of_the_untruncated_tempered_policy(model):
    out = _run(model, top_k=1, temperature=0.7, max_new_tokens=3, eos_id=-1)
    prompt, tokens = PROMPTS[0], out.tokens[0]
    for t in range(3):
        logp = torch.log_softmax(_full_logits(model, prompt + tokens[:t]) / 0.7, -1)
        assert out.logprobs[0][t] == pytest.approx(float(logp[tokens[t]]), abs=1e-5)
        assert out.logprobs[0][t] < -1e-3  # not log(1): top-k truncation is not applied


def test_eos_stops_a_row_and_the_loop(model):
    free = _run(model, top_k=1, max_new_tokens=8, eos_id=-1)
    # pretend a greedy token that first appears at step >= 1 of some row is EOS
    row_i, step, eos = next((r, t, tok) for r, row in enumerate(free.tokens)
                            for t, tok in enumerate(row) if t >= 1 and tok not in row[:t])
    out = _run(model, top_k=1, max_new_tokens=8, eos_id=eos)
    for free_row, row, done in zip(free.tokens, out.tokens, out.finished):
        if eos in free_row:
            cut = free_row.index(eos) + 1
            assert (row, done) == (free_row[:cut], True)
        else:
            assert (row, done) == (free_row, False)
    assert out.finished[row_i] and len(out.tokens[row_i]) == step + 1
    assert all(len(lp) == len(t) for lp, t in zip(out.logprobs, out.tokens))

    calls = []
    counting = _Counting(model, calls)
    same = [PROMPTS[row_i]] * 3  # all rows finish at step `step`: prefill + `step` decodes
    done = _run(counting, prompts=same, top_k=1, max_new_tokens=8, eos_id=eos)
    assert done.finished == [True] * 3 and len(calls) == step + 1


class _Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, calls: list) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, **kwargs):
        self.calls.append(kwargs["input_ids"].shape)
        return self.inner(**kwargs)


@torch.no_grad()
def _support_check(model, out: SampleOutput, allowed) -> set[int]:
    """Every sampled token must be in allowed(logits); returns the first-step tokens seen.

    The logits come from one plain forward of the whole sequences (prompt PROMPTS[0], no
    cache, no padding: every row has the same length because EOS is off).
    """
    full = torch.tensor([PROMPTS[0] + tokens for tokens in out.tokens])
    logits = model(full, use_cache=False).logits.float()  # [B, T, V]
    start = len(PROMPTS[0]) - 1
    for row, tokens in enumerate(out.tokens):
        for t, token in enumerate(tokens):
            assert token in allowed(logits[row, start + t]), (tokens, t)
    return {tokens[0] for tokens in out.tokens}


def test_top_k_restricts_the_support(model):
    out = _run(model, prompts=[PROMPTS[0]] * 48, top_k=3, max_new_tokens=3, eos_id=-1, seed=5)
    seen = _support_check(model, out, lambda lg: set(torch.topk(lg, 3).indices.tolist()))
    assert len(seen) == 3  # all three first-step candidates occur with this seed
    unrestricted = _run(model, prompts=[PROMPTS[0]] * 48, max_new_tokens=1, eos_id=-1, seed=5)
    assert len({t[0] for t in unrestricted.tokens}) > 3


def test_top_p_restricts_the_support(model):
    def nucleus(logits: torch.Tensor, p: float = 0.6) -> set[int]:
        probs, order = torch.sort(logits.softmax(-1), descending=True)
        before = torch.cumsum(probs, 0) - probs  # mass of the tokens ranked above
        return set(order[before < p + 1e-4].tolist())

    first = nucleus(_full_logits(model, PROMPTS[0]))
    assert 1 < len(first) < 44  # the test means something only if p actually truncates
    out = _run(model, prompts=[PROMPTS[0]] * 48, top_p=0.6, max_new_tokens=3, eos_id=-1, seed=5)
    seen = _support_check(model, out, nucleus)
    assert len(seen) > 1


def test_bfloat16_with_padding_stays_finite(model):
    low = build_model(ModelInit(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64,
                                seed=7), vocab_size=44).to(torch.bfloat16)
    out = _run(low, max_new_tokens=4, eos_id=-1)
    assert all(len(t) == 4 for t in out.tokens)
    assert all(torch.isfinite(torch.tensor(lp)).all() for lp in out.logprobs)


def test_argument_checks(model):
    assert _run(model, prompts=[]) == SampleOutput([], [], [])
    with pytest.raises(ValueError):
        _run(model, prompts=[[]])
    with pytest.raises(ValueError):
        _run(model, max_new_tokens=0)


def test_sampling_records_no_autograd_graph(model):
    """Sampling never needs gradients: no forward of it may run with grad enabled, even for
    a trainer's policy whose parameters require grad (its evaluation calls sample())."""
    seen = []
    handle = model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        assert any(p.requires_grad for p in model.parameters())
        _run(model)
    finally:
        handle.remove()
    assert seen and not any(seen)


def test_a_generator_on_another_device_type_is_refused(model):
    """A CPU model with a CUDA generator (stood in by its `device`: none can be built here)."""
    cuda_generator = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="random generator is on cuda:0 but the model on cpu"):
        sample(model, PROMPTS, max_new_tokens=2, eos_id=2, pad_id=0, generator=cuda_generator)
