"""The megatron engine on CUDA (NCCL, stock megatron-core: `compat` patches nothing).

The same case and script as tests/integration/test_megatron_engine.py, run with the nccl
backend; the reference is the torch engine on the CPU. Tolerance 1e-4 (GPU matmuls sum in
another order; TF32 is off by default for float32 matmuls in torch). Skipped without a
GPU; TP=2 needs two GPUs (NCCL refuses two ranks on one GPU).
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from hpcalign.launch.local import run_mpiexec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
pytest.importorskip("megatron.core")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "integration", "mpi_scripts")


def _run(n: int, model: str, out: str, tp: int) -> tuple[dict, dict]:
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    argv = [exe, "--oversubscribe", "--bind-to", "none", *root, "-n", str(n), sys.executable,
            os.path.join(SCRIPTS, "megatron_parity.py"), model, out, str(tp), "1", "nccl"]
    result = run_mpiexec(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    with open(os.path.join(out, "metrics.json")) as handle:
        return load_file(os.path.join(out, "result.safetensors")), json.load(handle)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="TP=2 over NCCL needs two GPUs"))])
def test_megatron_on_cuda_matches_the_torch_engine(tmp_path, tp):
    from megatron_case import SPEC, TEMPERATURE, batches, loss_fn_for, reference_inputs
    from standins import qwen_standin

    from hpcalign.config.schema import Config
    from hpcalign.engines import build_training_engine
    from hpcalign.engines.megatron import compat

    assert not compat.needed()  # the CUDA path: no patch applies
    model = qwen_standin(tmp_path / "qwen")
    engine = build_training_engine("torch", model, Config(run_dir=str(tmp_path), model={
        "path": model}), device=torch.device("cpu"), optimizer=SPEC)
    packed, advantages, noise = batches(engine)
    olds, refs, _ = reference_inputs(engine, packed, noise)
    engine.train_step(packed, loss_fn_for(packed, advantages, olds, refs),
                      temperature=TEMPERATURE, with_entropy=True)
    expected = {f"weights/{k}": v.detach() for k, v in engine.named_weights()}
    out = tmp_path / f"tp{tp}"
    out.mkdir()
    tensors, _ = _run(tp, model, str(out), tp)
    for i in range(2):
        assert (tensors[f"logp/{i}"] - olds[i]).abs().max().item() < 1e-4
    for key, value in expected.items():
        assert (tensors[key] - value).abs().max().item() < 1e-4, key
