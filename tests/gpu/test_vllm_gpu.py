"""The vLLM generation engine with the CUDA `vllm` package (`pip install -e .[gpu]`).

The CPU tests' checks on a GPU: log-probs equal the torch trainer's (float32, 1e-4), the
weight sync through vLLM's reload equals a fresh engine, and TP=2 generates when the
machine has two GPUs. Skipped without a GPU or without vllm.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
vllm = pytest.importorskip("vllm")

from standins import qwen_standin  # noqa: E402

from hpcalign.comm.weights import unique_named_tensors  # noqa: E402
from hpcalign.config.schema import Config  # noqa: E402
from hpcalign.engines import SamplingParams, build_generation_engine  # noqa: E402
from hpcalign.engines.torch_training import TorchTrainingEngine  # noqa: E402

GPU = torch.device("cuda", 0)
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]] * 4
PARAMS = SamplingParams(max_new_tokens=16, temperature=0.7)


def config(model_dir: str, tp: int = 1) -> Config:
    return Config(run_dir="unused", model={"path": model_dir}, data={"train": "unused.jsonl"},
                  reward={"functions": ["exact_match"]},
                  generator={"backend": "vllm", "temperature": 0.7,
                             "vllm": {"tensor_parallel_size": tp, "gpu_memory_utilization": 0.3,
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
def test_tensor_parallel_two_generates(model_dir):
    engine = build_generation_engine("vllm", model_dir, config(model_dir, tp=2), device=GPU)
    out = engine.generate(PROMPTS, PARAMS, seed=3)
    assert [len(t) for t in out.token_ids] == [len(lp) for lp in out.logprobs]
    with pytest.raises(NotImplementedError, match="tensor_parallel_size"):
        engine.load_weights([])  # nothing to load is fine
        engine.load_weights([("model.norm.weight", torch.ones(128))])
