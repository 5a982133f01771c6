"""The torch engines against the direct computation they replaced, on real tiny models.

The "direct" code below is what roles/trainer.py and roles/generator.py did before the seam
(load_model, AdamW, token_logprobs, grpo_loss, clip_grad_norm_, sample): the engines must
give the same numbers bitwise, since the quickstart's figures must not move.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from standins import llama_standin, nopad_standin, qwen_standin
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpcalign.algorithms.grpo import grpo_loss
from hpcalign.comm.weights import WeightSpec
from hpcalign.config.load import load_config
from hpcalign.config.schema import ModelInit, TrainerConfig
from hpcalign.engines import (
    GENERATION_ENGINES,
    TRAINING_ENGINES,
    OptimizerSpec,
    SamplingParams,
    build_generation_engine,
    build_training_engine,
)
from hpcalign.models.hf import eos_token_ids, load_model, padding_id
from hpcalign.models.logprobs import pack_sequences, token_logprobs
from hpcalign.models.sampler import sample, seeded_generator
from hpcalign.models.tiny import init_model
from hpcalign.roles.checkpoint import list_checkpoints
from hpcalign.roles.update import grpo_update

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")
TINY = ModelInit(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64)


@pytest.fixture(scope="module")
def char_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("engines") / "char")
    init_model(path, TINY)
    return path


def _cfg(model_dir: str):
    return load_config(QUICKSTART, [f"model.path={model_dir}", "run_dir=/tmp/unused"])


def _samples(n: int, seed: int = 0):
    """n (prompt, completion, old log-prob) triples of char-model ids, fixed by `seed`."""
    rng = np.random.default_rng(seed)
    prompts = [np.array([1, *rng.integers(4, 30, size=rng.integers(2, 6))]) for _ in range(n)]
    completions = [rng.integers(4, 30, size=rng.integers(1, 7)) for _ in range(n)]
    old = [rng.normal(-3.0, 0.3, size=len(c)).astype(np.float32) for c in completions]
    return prompts, completions, old


def test_registries_name_the_torch_engines():
    assert set(TRAINING_ENGINES) == {"torch", "megatron"}
    assert "torch" in GENERATION_ENGINES
    with pytest.raises(ValueError, match="training engine 'jax' is not one of: torch, megatron"):
        build_training_engine("jax", "/nowhere", None)


@pytest.mark.parametrize("coalesced", [False, True], ids=["as-loaded", "coalesced"])
def test_train_step_equals_the_direct_grpo_step_bitwise(char_dir, coalesced):
    """Also once `weight_sender` has laid the parameters out bucket by bucket (as the
    trainer role does): the same step, bit for bit, and the buckets stay flat."""
    cfg = _cfg(char_dir)
    spec = OptimizerSpec(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0)
    engine = build_training_engine("torch", char_dir, cfg, device=torch.device("cpu"),
                                   optimizer=spec)
    if coalesced:
        sender = engine.weight_sender(bucket_mb=0.01)  # ~10 KB: several buckets
        buckets = WeightSpec.of(engine.named_weights(), sender.bucket_bytes).buckets()
        assert sum(len(b.indices) > 1 for b in buckets) >= 2
    reference = build_training_engine("torch", char_dir, cfg, device=torch.device("cpu"))
    prompts, completions, old = _samples(6)
    advantages = torch.linspace(-1, 1, 6)
    token_count = float(sum(len(c) for c in completions))
    tcfg = TrainerConfig(clip_eps=0.2, kl_coef=0.05, micro_batch=0)
    result = grpo_update(engine, reference, prompts, completions, old, advantages, token_count,
                         tcfg, temperature=0.7)

    # the pre-seam trainer, verbatim
    model, _ = load_model(char_dir)
    ref, _ = load_model(char_dir)
    model.train()
    ref.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    optimizer.zero_grad(set_to_none=True)
    batch = pack_sequences(prompts, completions, 0)
    mask = batch["completion_mask"]
    old_logp = torch.zeros(mask.shape)
    for row, (p, lp) in enumerate(zip(prompts, old)):
        old_logp[row, len(p):len(p) + len(lp)] = torch.from_numpy(lp)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(ref, batch, 0.7)
    logp, entropy = token_logprobs(model, batch, 0.7, with_entropy=True)
    loss, parts = grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2,
                            kl_coef=0.05, token_count=token_count)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0))
    optimizer.step()

    assert result.metrics["loss"] == float(loss.detach()) and result.grad_norm == grad_norm
    assert result.metrics["pg_loss"] == parts["pg_loss"]
    assert result.metrics["clip_frac"] == parts["clip_frac"]
    for (name, mine), theirs in zip(engine.named_weights(), model.parameters()):
        assert torch.equal(mine, theirs), name
    if coalesced:  # still one storage per bucket after the optimizer step
        weights = [t for _, t in engine.named_weights()]
        for bucket in buckets:
            parts = [weights[i] for i in bucket.indices]
            assert len({p.untyped_storage().data_ptr() for p in parts}) == 1
            assert [p.storage_offset() - parts[0].storage_offset() for p in parts] == \
                list(bucket.offsets)


def test_pg_loss_and_clip_frac_do_not_depend_on_the_micro_batch(char_dir):
    """The logged values are the step's token means whatever the micro-batching (the old
    trainer scaled them by ntok/token_count a second time whenever micro_batch > 0)."""
    cfg = _cfg(char_dir)
    prompts, completions, old = _samples(8, seed=3)
    advantages = torch.tensor([1.5, -1.0, 0.5, -0.5, 2.0, -2.0, 0.1, -0.1])
    token_count = float(sum(len(c) for c in completions))
    logged = {}
    for micro in (0, 3, 1):
        engine = build_training_engine("torch", char_dir, cfg, device=torch.device("cpu"),
                                       optimizer=OptimizerSpec(lr=1e-2, grad_clip=1.0))
        reference = build_training_engine("torch", char_dir, cfg, device=torch.device("cpu"))
        # `old` is far from the model's log-probs: ratios are off 1 and clipping acts
        logged[micro] = grpo_update(engine, reference, prompts, completions, old, advantages,
                                    token_count, TrainerConfig(clip_eps=0.05, micro_batch=micro),
                                    temperature=1.0).metrics
    assert logged[0]["clip_frac"] > 0 and abs(logged[0]["pg_loss"]) > 1e-4
    for micro in (3, 1):
        for key in ("pg_loss", "clip_frac", "loss", "kl", "entropy"):
            assert math.isclose(logged[micro][key], logged[0][key], rel_tol=1e-5,
                                abs_tol=1e-7), (micro, key, logged[micro][key], logged[0][key])


def test_generate_equals_the_sampler_and_stops_on_every_eos(tmp_path):
    path = qwen_standin(tmp_path / "qwen")
    cfg = _cfg(path)
    engine = build_generation_engine("torch", path, cfg, device=torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    im_end, endoftext = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    assert engine.eos_token_ids == (im_end, endoftext) and engine.pad_token_id == endoftext
    prompts = [tokenizer("reverse abc").input_ids, tokenizer("add 2+3=").input_ids] * 8
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    out = engine.generate(prompts, params, seed=5)
    model, _ = load_model(path)
    direct = sample(model, prompts, max_new_tokens=12, eos_id=[im_end, endoftext],
                    pad_id=endoftext, generator=seeded_generator(model, 5))
    assert out.token_ids == direct.tokens and out.logprobs == direct.logprobs
    assert out.finished == direct.finished
    # a row ends at the FIRST of either EOS id, and only finished rows end in one
    for ids, reason in zip(out.token_ids, out.finish_reasons):
        eos_at = [t for t, token in enumerate(ids) if token in (im_end, endoftext)]
        assert eos_at == ([len(ids) - 1] if reason == "stop" else [])
        assert reason == "stop" or len(ids) == 12
    assert engine.generate(prompts, params, seed=5) == out  # seeded: the same again
    never = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), seed=5)
    assert all(len(ids) == 6 for ids in never.token_ids)


def test_special_tokens_follow_each_family(tmp_path):
    qwen, llama, nopad = (build(tmp_path / build.__name__)
                          for build in (qwen_standin, llama_standin, nopad_standin))
    for path in (qwen, llama, nopad):
        model, tokenizer = load_model(path)
        eos = eos_token_ids(model, tokenizer)
        assert list(eos) == model.generation_config.eos_token_id
        assert padding_id(tokenizer, eos) == (tokenizer.pad_token_id
                                              if tokenizer.pad_token_id is not None else eos[0])
    _, tokenizer = load_model(nopad)
    assert tokenizer.pad_token_id is None


def test_named_weights_load_into_a_generation_engine(char_dir, tmp_path):
    cfg = _cfg(char_dir)
    trainer = build_training_engine("torch", char_dir, cfg, device=torch.device("cpu"),
                                    optimizer=OptimizerSpec(lr=0.1))
    with torch.no_grad():
        for _, tensor in trainer.named_weights():
            tensor.add_(0.25)
    generator = build_generation_engine("torch", char_dir, cfg, device=torch.device("cpu"))
    generator.load_weights(trainer.named_weights())
    for (name, sent), received in zip(trainer.named_weights(), generator.model.parameters()):
        assert torch.equal(sent, received), name
    view = trainer.generation_view()  # shares the trainer's weights: no copy, always current
    prompts = [[1, 4, 5, 6]] * 4
    params = SamplingParams(max_new_tokens=5)
    mine, theirs = view.generate(prompts, params, 3), generator.generate(prompts, params, 3)
    # equal weights in two models: equal samples, log-probs equal up to BLAS rounding
    assert mine.token_ids == theirs.token_ids and mine.finish_reasons == theirs.finish_reasons
    np.testing.assert_allclose(mine.logprobs, theirs.logprobs, rtol=0, atol=1e-5)
    assert trainer.model.training  # the view's greedy eval leaves the policy in train mode


@pytest.mark.parametrize("build", [qwen_standin, llama_standin])
def test_checkpoint_keeps_the_users_files_and_resumes_exactly(build, tmp_path):
    path = build(tmp_path / "model")
    cfg = _cfg(path)
    engine = build_training_engine("torch", path, cfg, device=torch.device("cpu"),
                                   optimizer=OptimizerSpec(lr=1e-2))
    tokenizer = engine.tokenizer
    prompts = [tokenizer("reverse abc").input_ids, tokenizer("hello world").input_ids]
    completions = [tokenizer("cba").input_ids, tokenizer("dlrow").input_ids]
    batch = engine.pack(prompts, completions)

    def nll(_i, b, logp, _e):
        loss = -(logp * b["completion_mask"]).sum()
        return loss, {"loss": float(loss.detach())}

    engine.train_step([batch], nll, temperature=1.0)
    run_dir = str(tmp_path / "run")
    saved = engine.save_checkpoint(run_dir, 1, {"step": 1, "policy_version": 1}, keep=2)
    assert list_checkpoints(run_dir) == [1]
    model_dir = os.path.join(saved, "model")
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):  # tokenizer files, config, generation config
            with open(os.path.join(path, name), "rb") as a, open(os.path.join(model_dir, name), "rb") as b:
                assert a.read() == b.read(), name
    original, again = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(model_dir)
    for text in ("reverse abc", "ÜnïcΘde 😀 12+7=19\n"):
        assert again(text).input_ids == original(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert (again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    for (name, mine), theirs in zip(engine.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(mine, theirs), name
    # a fresh engine restored from the checkpoint takes the same next step as the original
    twin = build_training_engine("torch", path, cfg, device=torch.device("cpu"),
                                 optimizer=OptimizerSpec(lr=1e-2))
    assert twin.load_checkpoint(run_dir, 1)["step"] == 1
    for e in (engine, twin):
        e.train_step([e.pack(prompts, completions)], nll, temperature=1.0)
    for (name, a), (_, b) in zip(engine.named_weights(), twin.named_weights()):
        assert torch.equal(a, b), name
    assert json.load(open(os.path.join(saved, "state.json")))["policy_version"] == 1


def test_compiled_engine_matches_eager_in_float32(tmp_path):
    """model.compile: the compiled decoder body gives the eager log-probs and entropies to
    1e-5 and, after two AdamW steps over batches of two different lengths (dynamic shapes,
    no recompile per length), the eager weights to 1e-5, on a Qwen2 stand-in."""
    path = qwen_standin(tmp_path / "qwen", hidden=32, layers=1)
    engines = {}
    for flag in (False, True):
        cfg = load_config(QUICKSTART, [f"model.path={path}", "run_dir=/tmp/unused",
                                       f"model.compile={str(flag).lower()}"])
        engines[flag] = build_training_engine("torch", path, cfg, device=torch.device("cpu"),
                                              optimizer=OptimizerSpec(lr=1e-2))
    assert engines[False].body is None and engines[True].body is not None
    tokenizer = engines[False].tokenizer

    def nll_and_entropy(_i, b, logp, entropy):
        mask = b["completion_mask"]
        loss = -(logp * mask).sum() / mask.sum() - 0.01 * (entropy * mask).sum() / mask.sum()
        return loss, {"loss": float(loss.detach())}

    for texts in (("reverse abc", "cba"), ("hello there, world", "dlrow ,ereht olleh")):
        prompts = [tokenizer(texts[0]).input_ids, tokenizer("hi").input_ids]
        completions = [tokenizer(texts[1]).input_ids, tokenizer("ih").input_ids]
        outs = {}
        for flag, engine in engines.items():
            batch = engine.pack(prompts, completions)
            outs[flag] = engine.logprobs(batch, temperature=0.7, with_entropy=True)
            engine.train_step([batch], nll_and_entropy, temperature=0.7, with_entropy=True)
        torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(engines[True].named_weights(), engines[False].named_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # the compiled path really ran
    assert not torch.equal(engines[True].model.lm_head.weight,
                           AutoModelForCausalLM.from_pretrained(path).lm_head.weight)  # it trained
