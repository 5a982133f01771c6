"""The megatron-core training engine on CPU/gloo, under real mpiexec (1-4 ranks).

Checked against independent computations: HF transformers' own forward (logits), the
torch engine (log-probs, entropies, one GRPO step of AdamW with clipping), and the input
safetensors files (conversion round trips, bit for bit). Layouts: TP=1, TP=2, PP=2,
TP=2 x PP=2 and DP=2, on a tiny tied-embedding Qwen2 (GQA 4:2, q/k/v bias, vocabulary 400
padded to 512; bf16 for one round trip) and an untied Llama without biases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from megatron_case import SPEC, TEMPERATURE, batches, fixed_ids, loss_fn_for, reference_inputs
from safetensors.torch import load_file
from standins import llama_standin, qwen_standin

from hpcalign.launch.local import run_mpiexec

pytest.importorskip("megatron.core")

SCRIPTS = os.path.join(os.path.dirname(__file__), "mpi_scripts")
TOL = 1e-5


def mpiexec(n: int, script: str, *args: str, timeout: float = 300) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    argv = [exe, "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    argv += ["-n", str(n), sys.executable, os.path.join(SCRIPTS, script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_mpiexec(argv, env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def hpcalign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcalign.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron-models")
    return {"qwen": qwen_standin(root / "qwen"),
            "llama": llama_standin(root / "llama"),
            "qwen-bf16": qwen_standin(root / "qwen-bf16", dtype="bfloat16", seed=1)}


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    """The untied Llama converted for TP=2 by the real CLI."""
    out = str(tmp_path_factory.mktemp("converted") / "llama-tp2")
    result = hpcalign("convert", "hf-to-megatron", models["llama"], out, "--tp", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


# ------------------------------------------------------------ conversion
def _assert_same_hf_dir(src: str, back: str) -> None:
    before = load_file(os.path.join(src, "model.safetensors"))
    after = load_file(os.path.join(back, "model.safetensors"))
    assert sorted(after) == sorted(before)  # tied: no lm_head; padding never saved
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(back, name), "rb") as b:
            assert a.read() == b.read(), name


def test_round_trip_is_bitwise_float32_untied_tp2(models, converted, tmp_path):
    with open(os.path.join(converted, "hpcalign_megatron.json")) as handle:
        meta = json.load(handle)
    assert (meta["padded_vocab"], meta["tp"], meta["pp"]) == (512, 2, 1)  # 400 -> k x 256
    back = str(tmp_path / "back")
    result = hpcalign("convert", "megatron-to-hf", converted, back)
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_same_hf_dir(models["llama"], back)


def test_round_trip_is_bitwise_bfloat16_tied_tp2_pp2(models, tmp_path):
    mega, back = str(tmp_path / "mega"), str(tmp_path / "back")
    for args in (("hf-to-megatron", models["qwen-bf16"], mega, "--tp", "2", "--pp", "2"),
                 ("megatron-to-hf", mega, back)):
        result = hpcalign("convert", *args)
        assert result.returncode == 0, result.stderr[-4000:]
    _assert_same_hf_dir(models["qwen-bf16"], back)


def test_convert_refuses_layouts_the_model_cannot_take(models, tmp_path, capsys):
    from hpcalign.cli import main

    # in-process: each refusal comes before megatron or torch.distributed are touched
    assert main(["convert", "hf-to-megatron", models["qwen"], str(tmp_path / "x"),
                 "--tp", "4"]) == 2
    assert "num_key_value_heads=2 is not a multiple of tp=4" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["convert", "hf-to-megatron", models["qwen"], str(tmp_path / "full")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert main(["convert", "megatron-to-hf", models["qwen"], str(tmp_path / "y")]) == 2
    assert "not an hpcalign megatron checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------ logits against HF
def _hf_logits(model_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("source,tp", [("qwen-hf", 1), ("llama-converted", 2)])
def test_logits_equal_hf(models, converted, tmp_path, source, tp):
    model = models["qwen"] if source == "qwen-hf" else converted
    hf_dir = models["qwen"] if source == "qwen-hf" else models["llama"]
    mpiexec(tp, "megatron_logits.py", model, str(tmp_path), str(tp))
    out = load_file(os.path.join(tmp_path, "logits.safetensors"))
    assert int(out["padded_vocab"]) == 512  # 400 rounded up to a multiple of tp x 128
    expected = _hf_logits(hf_dir, fixed_ids(400))
    assert out["logits"].shape == expected.shape
    assert (out["logits"] - expected).abs().max().item() < TOL


# ------------------------------------------------------------ log-probs and one GRPO step
@pytest.fixture(scope="module")
def torch_reference(models, tmp_path_factory):
    """The torch engine on the same case: log-probs, entropies, weights after the step."""
    from hpcalign.config.schema import Config
    from hpcalign.engines import build_training_engine

    run_dir = str(tmp_path_factory.mktemp("torch-ref"))
    cfg = Config(run_dir=run_dir, model={"path": models["qwen"]})
    engine = build_training_engine("torch", models["qwen"], cfg, device=torch.device("cpu"),
                                   optimizer=SPEC)
    before = {k: v.detach().clone() for k, v in engine.named_weights()}
    packed, advantages, noise = batches(engine)
    olds, refs, entropies = reference_inputs(engine, packed, noise)
    result = engine.train_step(packed, loss_fn_for(packed, advantages, olds, refs),
                               temperature=TEMPERATURE, with_entropy=True)
    out = {f"weights/{k}": v.detach().clone() for k, v in engine.named_weights()}
    for i in range(2):
        out[f"logp/{i}"], out[f"entropy/{i}"] = olds[i], entropies[i]
    return out, {**result.metrics, "grad_norm": result.grad_norm}, before


_RUNS: dict[tuple[int, int, int], tuple[dict, dict]] = {}


def _layout(models, tmp_path_factory, n: int, tp: int, pp: int) -> tuple[dict, dict]:
    if (n, tp, pp) not in _RUNS:
        out = tmp_path_factory.mktemp(f"layout-{n}-{tp}-{pp}")
        mpiexec(n, "megatron_parity.py", models["qwen"], str(out), str(tp), str(pp))
        with open(out / "metrics.json") as handle:
            _RUNS[n, tp, pp] = load_file(str(out / "result.safetensors")), json.load(handle)
    return _RUNS[n, tp, pp]


def _max_diff(a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in b if k.startswith(prefix)]
    assert keys and sorted(k for k in a if k.startswith(prefix)) == sorted(keys)
    return max((a[k] - b[k]).abs().max().item() for k in keys)


@pytest.mark.parametrize("n,tp,pp", [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 2, 2), (2, 1, 1)],
                         ids=["tp1", "tp2", "pp2", "tp2xpp2", "dp2"])
def test_layouts_agree_with_each_other_and_the_torch_engine(models, tmp_path_factory,
                                                            torch_reference, n, tp, pp):
    reference, ref_metrics, before = torch_reference
    tensors, metrics = _layout(models, tmp_path_factory, n, tp, pp)
    baseline, base_metrics = _layout(models, tmp_path_factory, 1, 1, 1)
    for other, other_metrics in ((reference, ref_metrics), (baseline, base_metrics)):
        assert _max_diff(tensors, other, "logp/") < TOL
        assert _max_diff(tensors, other, "entropy/") < TOL
        assert _max_diff(tensors, other, "weights/") < TOL
        for key, value in other_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=TOL, abs=1e-7), key
    # the step really moved the weights (by ~lr), so the comparison above means something
    moved = max((tensors[f"weights/{k}"] - v).abs().max().item() for k, v in before.items())
    assert moved > 10 * TOL


# ------------------------------------------------------------ checkpoints
def test_resume_at_another_tp_continues_the_run(models, tmp_path):
    """Checkpoint at TP=2, resume at TP=1 (dist_checkpointing reshards model and AdamW
    state): the second step gives the weights the uninterrupted TP=2 run has."""
    run_dir = str(tmp_path)
    mpiexec(2, "megatron_resume.py", models["qwen"], run_dir, "2", "save")
    step_dir = os.path.join(run_dir, "checkpoints", "step-000001")
    assert sorted(os.listdir(step_dir)) == ["megatron", "model", "state.json"]
    hf = load_file(os.path.join(step_dir, "model", "model.safetensors"))
    assert hf["model.embed_tokens.weight"].shape[0] == 400  # HF export: padding cut off
    mpiexec(1, "megatron_resume.py", models["qwen"], run_dir, "1", "load")
    saved = load_file(os.path.join(run_dir, "after-save.safetensors"))
    resumed = load_file(os.path.join(run_dir, "after-load.safetensors"))
    assert max((saved[k] - resumed[k]).abs().max().item() for k in saved) < TOL
    with open(os.path.join(run_dir, "state-load.json")) as handle:
        loaded = json.load(handle)
    with open(os.path.join(run_dir, "state-save.json")) as handle:
        continued = json.load(handle)
    assert loaded["state"] == {"step": 1, "policy_version": 1}
    assert loaded["grad_norm"] == pytest.approx(continued["grad_norm"], rel=TOL)


def _save_then_load(model_dir: str, run_dir: str, saved: tuple[int, int],
                    loaded: tuple[int, int]) -> tuple[dict, dict, dict, dict]:
    """Checkpoint at TP x PP `saved`, resume at `loaded`: both second steps' weights and
    metrics."""
    for (tp, pp), mode in ((saved, "save"), (loaded, "load")):
        mpiexec(tp * pp, "megatron_resume.py", model_dir, run_dir, str(tp), mode, str(pp))
    weights = [load_file(os.path.join(run_dir, f"after-{m}.safetensors")) for m in ("save", "load")]
    states = []
    for mode in ("save", "load"):
        with open(os.path.join(run_dir, f"state-{mode}.json")) as handle:
            states.append(json.load(handle))
    return weights[0], weights[1], states[0], states[1]


def test_resume_at_another_pp_continues_the_run(models, tmp_path):
    """Checkpoint at TP=1 x PP=2, resume at TP=2 x PP=1: the layers move between ranks and
    split within them; the second step still gives the uninterrupted run's weights."""
    saved, resumed, continued, loaded = _save_then_load(models["qwen"], str(tmp_path),
                                                        (1, 2), (2, 1))
    assert max((saved[k] - resumed[k]).abs().max().item() for k in saved) < TOL
    assert loaded["grad_norm"] == pytest.approx(continued["grad_norm"], rel=TOL)


def test_resume_at_the_same_layout_is_bitwise(models, tmp_path):
    """Checkpoint and resume at TP=2: weights after the next step equal bit for bit, and
    so do its metrics (the fixed-layout guarantee of the GRPO runs)."""
    saved, resumed, continued, loaded = _save_then_load(models["qwen"], str(tmp_path),
                                                        (2, 1), (2, 1))
    assert saved.keys() == resumed.keys()
    assert [k for k in saved if not torch.equal(saved[k], resumed[k])] == []
    assert {k: v for k, v in loaded.items() if k != "state"} == \
        {k: v for k, v in continued.items() if k != "state"}
