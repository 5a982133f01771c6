"""Offline sampling IS the generator role's sampling: `sample_and_score` over the policy a
training step sampled from, its rows and its seed gives that step's shard, byte for byte
(the promise of docs/rollout.md, "Same sampling as training")."""

import os

import numpy as np
from local_runs import run_to_end

from hpcalign.data.datasets import indices_for_step
from hpcalign.data.shards import read_shard, shard_path, write_shard
from hpcalign.data.sources import load_sources
from hpcalign.engines import SamplingParams
from hpcalign.engines.rollouts import sample_and_score
from hpcalign.engines.torch_generation import TorchGenerationEngine
from hpcalign.launch.rundir import read_run_config
from hpcalign.models.hf import load_model
from hpcalign.roles.context import shard_seed


def test_step_zero_shard_equals_offline_sampling_of_its_policy(tmp_path):
    run_dir = tmp_path / "run"
    run_to_end(run_dir, "trainer.steps=2")
    cfg = read_run_config(str(run_dir))
    # policy version 0 = the model after the SFT warm-up, which the trainer saved here
    model, tokenizer = load_model(os.path.join(run_dir, "sft"))
    engine = TorchGenerationEngine(model.requires_grad_(False), tokenizer)
    sources = load_sources(cfg)
    gen = cfg.generator
    params = SamplingParams(samples_per_prompt=gen.samples_per_prompt,
                            max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                            top_p=gen.top_p, top_k=gen.top_k, ignore_eos=gen.ignore_eos)
    rows = indices_for_step(len(sources.train), cfg.seed, 0, gen.prompts_per_step)
    scored = sample_and_score(engine, sources.train, sources.rewards, np.asarray(rows), params,
                              seed=shard_seed(cfg.seed, 0, 0), step=0, policy_version=0,
                              generator_rank=0, attrs={"task": sources.name},
                              max_prompt_tokens=cfg.data.max_prompt_tokens,
                              truncation=cfg.data.truncation)
    stored_path = shard_path(str(run_dir), 0, 0)
    stored = read_shard(stored_path)
    assert np.array_equal(scored.batch.completion_tokens.flat, stored.completion_tokens.flat)
    assert np.array_equal(scored.batch.rewards, stored.rewards, equal_nan=True)
    offline = write_shard(str(tmp_path / "offline" / "shard-0000.h5"), scored.batch)
    with open(stored_path, "rb") as a, open(offline.path, "rb") as b:
        assert a.read() == b.read()  # byte for byte, so the checksums agree too
