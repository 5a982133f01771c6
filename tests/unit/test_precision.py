"""`model.autocast: bf16`: forwards in bfloat16, parameters, grads and log-probs in float32.

The float32 computation is the independent reference: bf16 must be close to it (a few
bf16 ulps on log-probs, the same gradient direction) yet not equal (else it did not run).
"""

from __future__ import annotations

import pytest
import torch

from hpcalign.config.load import load_config
from hpcalign.config.schema import ModelInit
from hpcalign.errors import ConfigError
from hpcalign.models.logprobs import pack_sequences, token_logprobs
from hpcalign.models.precision import autocast
from hpcalign.models.sampler import sample
from hpcalign.models.tiny import build_model

PROMPTS = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13]]
COMPLETIONS = [[20, 21, 22, 2], [23, 24], [25, 26, 27, 28, 29, 2]]


@pytest.fixture
def model() -> torch.nn.Module:
    return build_model(ModelInit(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                 seed=0), vocab_size=44)


def _logprobs_and_grads(model: torch.nn.Module, mode: str):
    model.zero_grad(set_to_none=True)
    batch = pack_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    with autocast(model, mode):
        logp, _ = token_logprobs(model, batch)
    (-logp.sum()).backward()  # outside the context, as autocast asks
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logp.detach(), grads


def test_none_is_plain_float32(model):
    batch = pack_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    plain, _ = token_logprobs(model, batch)
    with autocast(model, "none"):
        same, _ = token_logprobs(model, batch)
    assert torch.equal(plain, same)


def test_bf16_logprobs_and_gradients_stay_float32_and_close(model):
    logp32, grads32 = _logprobs_and_grads(model, "none")
    logp16, grads16 = _logprobs_and_grads(model, "bf16")
    assert logp16.dtype == torch.float32 and grads16.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(logp16, logp32), "bf16 autocast changed nothing: it did not run"
    assert torch.allclose(logp16, logp32, atol=5e-2)
    cosine = torch.nn.functional.cosine_similarity(grads16, grads32, dim=0)
    assert cosine > 0.99, float(cosine)


def test_bf16_sampling_runs_and_reports_float32_logprobs(model):
    with autocast(model, "bf16"):
        out = sample(model, PROMPTS, max_new_tokens=5, temperature=1.0, eos_id=2, pad_id=0,
                     generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in out.tokens] == [len(lp) for lp in out.logprobs]
    flat = torch.cat([torch.as_tensor(lp) for lp in out.logprobs])
    assert flat.dtype == torch.float32 and bool((flat <= 0).all())


def test_unknown_mode_is_refused(model, tmp_path):
    with pytest.raises(ValueError, match="autocast mode 'fp8'"):
        autocast(model, "fp8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: /tmp/m\n")
    with pytest.raises(ConfigError, match="model.autocast") as err:
        load_config(str(cfg), ["model.autocast=fp16"])
    assert "fp16" in str(err.value) and "bf16" in str(err.value)
