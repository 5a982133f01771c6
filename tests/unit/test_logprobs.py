"""pack_sequences / token_logprobs against a manual forward of each sequence alone, and the
chunked lm_head path against the full [B, T, V] logits (values, gradients, saved tensors)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from hpcalign.config.schema import ModelInit
from hpcalign.models import logprobs as logprobs_module
from hpcalign.models.logprobs import pack_sequences, token_logprobs
from hpcalign.models.precision import autocast
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


# --- the chunked lm_head path against the full [B, T, V] logits --------------------------

VOCAB = 97  # not a power of two, like real vocabularies after padding is removed
CHUNK_PROMPTS = [[1, 4, 5, 40], [1, 9, 9, 9, 9, 9, 40], [1, 40], [], [1, 7, 8]]
CHUNK_COMPLETIONS = [[6, 7, 2], [11, 96], [12, 13, 14, 15, 16, 90, 91], [3, 4, 5], []]


def _tiny(arch: str, tied: bool, vocab: int = VOCAB, hidden: int = 32) -> torch.nn.Module:
    model = build_model(ModelInit(arch=arch, hidden=hidden, layers=2, heads=4, kv_heads=2,
                                  intermediate=64, tie_embeddings=tied, seed=5),
                        vocab_size=vocab)
    if not tied:  # an independent head, not a copy of the embedding
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    return model.train()  # dropout is 0 in these configs; train() as the trainer runs it


def _reference(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float):
    """log p and entropy from `model(...).logits` [B, T, V], written out independently."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()
    logp_all = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    pad = torch.zeros(ids.shape[0], 1)
    return (torch.cat([pad, torch.where(mask, logp, 0.0)], 1),
            torch.cat([pad, torch.where(mask, entropy, 0.0)], 1))


def _scored_rows(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["completion_mask"][:, 1:].sum())


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(
        monkeypatch, arch, tied, temperature):
    model = _tiny(arch, tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = pack_sequences(CHUNK_PROMPTS, CHUNK_COMPLETIONS, PAD)
    n = _scored_rows(batch)
    assert n == 3 + 2 + 7 + 2  # the completion without a prompt: its first token has no context
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(2)
    w_logp, w_ent = torch.randn((2, *batch["input_ids"].shape), generator=gen)
    ref_logp, ref_ent = _reference(model, batch, temperature)
    ref_grads = torch.autograd.grad((w_logp * ref_logp).sum() + (w_ent * ref_ent).sum(), params)
    for rows in (1, 4, 5, n, n + 5):  # 4 and 5 do not divide 14
        monkeypatch.setattr(logprobs_module, "LOGITS_CHUNK_BYTES", rows * 4 * VOCAB)
        logp, entropy = token_logprobs(model, batch, temperature, with_entropy=True)
        assert logp.dtype == entropy.dtype == torch.float32
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, ref_ent, atol=1e-5, rtol=0)
        mask = batch["completion_mask"].bool()
        mask[:, 0] = False
        assert bool((logp[~mask] == 0).all()) and bool((entropy[~mask] == 0).all())
        grads = torch.autograd.grad((w_logp * logp).sum() + (w_ent * entropy).sum(), params)
        for param, grad, ref in zip(params, grads, ref_grads):
            scale = float(ref.abs().max())
            assert scale > 0, "every parameter should get a gradient here"
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * scale,
                                       msg=lambda m, p=param: f"{p.shape}: {m}")


@pytest.mark.parametrize("with_entropy", [True, False])
def test_gradient_of_logp_alone_equals_the_full_logits(with_entropy):
    """The trainer's case: entropy computed for the metrics, only logp in the loss."""
    model = _tiny("qwen2", tied=True)
    batch = pack_sequences(CHUNK_PROMPTS, CHUNK_COMPLETIONS, PAD)
    params = list(model.parameters())
    weights = torch.randn(batch["input_ids"].shape, generator=torch.Generator().manual_seed(4))
    ref_logp, _ = _reference(model, batch, 0.9)
    ref_grads = torch.autograd.grad((weights * ref_logp).sum(), params)
    logp, entropy = token_logprobs(model, batch, 0.9, with_entropy=with_entropy)
    assert (entropy is not None) == with_entropy
    for grad, ref in zip(torch.autograd.grad((weights * logp).sum(), params), ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _saved_numels(fn) -> list[int]:
    """numel of every tensor autograd saves for backward while `fn` runs."""
    numels: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        numels.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return numels


def test_no_rows_by_vocab_tensor_is_saved_for_backward():
    vocab, hidden = 4096, 16  # so that the head weight [V, H] is smaller than [N, V]
    model = _tiny("qwen2", tied=True, vocab=vocab, hidden=hidden)
    batch = pack_sequences(CHUNK_PROMPTS * 3, CHUNK_COMPLETIONS * 3, PAD)
    n = _scored_rows(batch)
    assert vocab * hidden < n * vocab
    full = _saved_numels(lambda: _reference(model, batch, 1.0))
    assert max(full) >= n * vocab  # the check can see a logits tensor when there is one
    ours = _saved_numels(lambda: token_logprobs(model, batch, 1.0, with_entropy=True))
    assert max(ours) <= vocab * hidden, sorted(ours)[-5:]  # the weight itself, not a copy


def test_a_model_that_changes_its_logits_takes_the_full_path():
    """Gemma 2 soft-caps lm_head's output: lm_head(body) alone would give other log-probs."""
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, final_logit_softcapping=2.0, attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(config).float()
    with torch.no_grad():  # peaked distributions, so that the soft cap matters
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    batch = pack_sequences(CHUNK_PROMPTS, CHUNK_COMPLETIONS, PAD)
    ref_logp, ref_ent = _reference(model, batch, 1.0)
    logp, entropy = token_logprobs(model, batch, with_entropy=True)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, ref_ent, atol=1e-5, rtol=0)
    hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
    uncapped = torch.log_softmax(model.lm_head(hidden), -1)[:, :-1]
    uncapped = uncapped.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    assert float((uncapped[mask] - ref_logp[:, 1:][mask]).abs().max().detach()) > 1e-2


@pytest.mark.parametrize("precision", ["autocast", "bf16-params"])
def test_bf16_chunked_path_stays_close_to_the_full_logits(monkeypatch, precision):
    """bf16 matmuls, float32 softmax: chunking changes only the matmul blocking."""
    model = _tiny("llama", tied=False)
    if precision == "bf16-params":
        model.to(torch.bfloat16)
    monkeypatch.setattr(logprobs_module, "LOGITS_CHUNK_BYTES", 5 * 4 * VOCAB)
    batch = pack_sequences(CHUNK_PROMPTS, CHUNK_COMPLETIONS, PAD)
    weights = torch.randn((2, *batch["input_ids"].shape), generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (_reference, lambda m, b, t: token_logprobs(m, b, t, with_entropy=True)):
        model.zero_grad(set_to_none=True)
        with autocast(model, "bf16" if precision == "autocast" else "none"):
            logp, entropy = fn(model, batch, 0.8)
        ((weights[0] * logp).sum() + (weights[1] * entropy).sum()).backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        results.append((logp.detach(), entropy.detach(), grads))
    (ref_logp, ref_ent, ref_grads), (logp, entropy, grads) = results
    assert logp.dtype == entropy.dtype == torch.float32
    assert all(p.grad.dtype == p.dtype for p in model.parameters())
    # measured: 5e-7 and 7e-7 apart, cosine 1.000000; the margins allow other matmul blocking
    torch.testing.assert_close(logp, ref_logp, atol=1e-3, rtol=0)
    torch.testing.assert_close(entropy, ref_ent, atol=1e-3, rtol=0)
    assert float(torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0)) > 0.9999
