"""The vLLM generation engine with the CUDA `vllm` package (`pip install -e .[gpu]`).

The CPU tests' checks on a GPU: log-probs equal the torch trainer's (float32, 1e-4), the
weight sync through vLLM's reload equals a fresh engine, and, when the machine has two
GPUs, one TP=2 engine over two generator ranks (vLLM's external launcher, as on CPU in
tests/integration/test_vllm_tp.py). Skipped without a GPU or without vllm.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
vllm = pytest.importorskip("vllm")

from standins import qwen_standin  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from test_vllm_tp import check_reports, run_world  # noqa: E402

from hpcalign.comm.weights import unique_named_tensors  # noqa: E402
from hpcalign.config.schema import Config  # noqa: E402
from hpcalign.engines import SamplingParams, build_generation_engine  # noqa: E402
from hpcalign.engines.torch_training import TorchTrainingEngine  # noqa: E402

GPU = torch.device("cuda", 0)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]] * 4
PARAMS = SamplingParams(max_new_tokens=16, temperature=0.7)


def config(model_dir: str) -> Config:
    return Config(run_dir="unused", model={"path": model_dir}, data={"train": "unused.jsonl"},
                  reward={"functions": ["exact_match"]},
                  generator={"backend": "vllm", "temperature": 0.7,
                             "vllm": {"gpu_memory_utilization": 0.3,
                                      "max_model_len": 256}})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return qwen_standin(tmp_path_factory.mktemp("vllm-gpu") / "qwen", hidden=128)


def test_logprobs_and_weight_sync_on_a_gpu(model_dir, tmp_path):
    engine = build_generation_engine("vllm", model_dir, config(model_dir), device=GPU)
    trainer = TorchTrainingEngine.build(model_dir, config(model_dir), device=GPU)
    out = engine.generate(PROMPTS, PARAMS, seed=3)
    batch = trainer.pack(PROMPTS, out.token_ids)
    logp, _ = trainer.logprobs(batch, temperature=0.7)
    mask = batch["completion_mask"].bool()
    worst = max(float((logp[i][mask[i]].cpu() - torch.tensor(lp)).abs().max())
                for i, lp in enumerate(out.logprobs))
    assert worst < 1e-4, worst

    gen = torch.Generator(device=GPU).manual_seed(0)
    changed = [(n, t.detach() + 0.2 * torch.randn(t.shape, generator=gen, device=GPU))
               for n, t in unique_named_tensors(trainer.named_weights())]
    engine.load_weights(changed)
    after = engine.generate(PROMPTS, PARAMS, seed=3)
    assert after.token_ids != out.token_ids
    with torch.no_grad():
        for (_, param), (_, value) in zip(trainer.named_weights(), changed):
            param.copy_(value)
    fresh_dir = str(tmp_path / "changed")
    trainer.save_model(fresh_dir)
    del engine
    fresh = build_generation_engine("vllm", fresh_dir, config(fresh_dir), device=GPU)
    assert fresh.generate(PROMPTS, PARAMS, seed=3).token_ids == after.token_ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 needs two GPUs")
def test_tensor_parallel_two_over_generator_ranks(model_dir, tmp_path):
    """tests/integration/test_vllm_tp.py's engine checks on GPUs, NCCL world, rank r on GPU r:
    trainer 0 + one TP=2 engine over ranks 1, 2 with three GPUs (the sync through
    `NamedWeightSender`); the two engine ranks alone with two (through `load_weights`)."""
    ranks = 3 if torch.cuda.device_count() >= 3 else 2
    check_reports(run_world(model_dir, str(tmp_path), ranks=ranks, device_kind="cuda"))
