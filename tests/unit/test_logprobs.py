"""pack_sequences / token_logprobs against a manual forward of each sequence alone."""

from __future__ import annotations

import pytest
import torch

from hpcalign.config.schema import ModelInit
from hpcalign.models.logprobs import pack_sequences, token_logprobs
from hpcalign.models.sampler import sample
from hpcalign.models.tiny import build_model

PAD = 0


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model = build_model(ModelInit(hidden=32, layers=2, heads=4, kv_heads=4, intermediate=64,
                                  seed=11), vocab_size=44)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.mul_(6)
    return model


def test_pack_sequences_layout():
    batch = pack_sequences([[1, 4], [1, 5, 6, 7]], [[8, 9, 2], [10]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 4, 8, 9, 2], [1, 5, 6, 7, 10]]
    batch = pack_sequences([[1, 4], [1, 5, 6]], [[8], []], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 4, 8], [1, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1], [0, 0, 0]]
    batch2 = pack_sequences([[1], [1, 2, 3, 4]], [[4, 5], [6]], pad_id=PAD)
    assert batch2["input_ids"][0].tolist() == [1, 4, 5, PAD, PAD]
    assert batch2["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch2["completion_mask"][0].tolist() == [0, 1, 1, 0, 0]
    assert all(v.dtype == torch.long for v in batch2.values())
    with pytest.raises(ValueError):
        pack_sequences([[1]], [], pad_id=PAD)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_a_manual_forward_of_each_sequence(model, temperature):
    prompts = [[1, 4, 5, 40], [1, 9, 9, 9, 9, 9, 40], [1, 40]]
    completions = [[6, 7, 2], [11], [12, 13, 14, 15, 16]]
    batch = pack_sequences(prompts, completions, PAD)
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch, temperature, with_entropy=True)
    assert logp.shape == entropy.shape == batch["input_ids"].shape
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = prompt + completion
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].float() / temperature
        for t in range(logp.shape[1]):
            if len(prompt) <= t < len(ids):
                dist = torch.log_softmax(logits[t - 1], -1)
                expected_ent = -sum(float(dist[v].exp() * dist[v]) for v in range(44))
                assert float(logp[row, t]) == pytest.approx(float(dist[ids[t]]), abs=1e-5)
                assert float(entropy[row, t]) == pytest.approx(expected_ent, abs=1e-5)
            else:
                assert float(logp[row, t]) == 0.0 and float(entropy[row, t]) == 0.0
    assert token_logprobs(model, batch, temperature)[1] is None


def test_sampler_logprobs_equal_token_logprobs(model):
    prompts = [[1, 4, 5, 6, 40], [1, 9, 40], [1, 7, 8, 9, 10, 11, 12, 40]] * 3
    for temperature in (1.0, 0.8):
        out = sample(model, prompts, max_new_tokens=7, temperature=temperature, eos_id=2,
                     pad_id=PAD, generator=torch.Generator().manual_seed(3))
        batch = pack_sequences(prompts, out.tokens, PAD)
        with torch.no_grad():
            logp, _ = token_logprobs(model, batch, temperature)
        mask = batch["completion_mask"].bool()
        for row in range(len(prompts)):
            recomputed = logp[row][mask[row]]
            torch.testing.assert_close(recomputed, torch.tensor(out.logprobs[row]),
                                       atol=1e-5, rtol=0)


def test_gradients_flow_only_through_completion_tokens(model):
    batch = pack_sequences([[1, 4, 40]], [[5, 6]], PAD)
    logp, _ = token_logprobs(model, batch)
    logp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad(set_to_none=True)
