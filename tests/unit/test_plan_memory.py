"""Memory formulas against the ZeRO and Megatron papers' tables and hand arithmetic."""

from __future__ import annotations

import pytest

from hpcalign.plan.memory import (
    StateBytes,
    activation_bytes,
    activation_bytes_per_layer,
    kv_bytes_per_token,
    kv_plan,
    kv_tokens,
    params_per_gpu,
    state_bytes_per_param,
    zero_bytes_per_param,
)
from hpcalign.plan.shapes import ModelShape, count_params, preset

ZERO_MIXED_ADAM = StateBytes(weights=2, grads=2, optimizer=12)  # fp16 params + grads, K = 12


@pytest.mark.parametrize("stage,published_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.88)])
def test_zero_table1_7_5b_on_64_gpus(stage: int, published_gb: float) -> None:
    # Rajbhandari et al. 2020, Table 1: 7.5 B parameters, N_d = 64
    got = 7.5e9 * zero_bytes_per_param(stage, 64, ZERO_MIXED_ADAM) / 1e9
    assert got == pytest.approx(published_gb, rel=0.01)


@pytest.mark.parametrize(
    "state,plain,dist_const,dist_shard",
    [
        (StateBytes(2, 4, 12), 18, 6, 12),  # bf16 params, fp32 grads (Megatron default)
        (StateBytes(2, 2, 16), 20, 4, 16),  # fp16 params and grads (+ fp32 grad copy)
        (StateBytes(4, 4, 8), 16, 8, 8),  # fp32 params and grads
    ],
)
def test_megatron_distributed_optimizer_table(state, plain, dist_const, dist_shard) -> None:
    # Megatron-LM docs/distrib_optimizer.md: bytes/param, non-distributed vs 4+16/d etc.
    assert state_bytes_per_param(8, False, state) == plain
    for d in (1, 8, 64):
        assert state_bytes_per_param(d, True, state) == pytest.approx(dist_const + dist_shard / d)


def test_selective_recompute_saves_70_and_65_percent() -> None:
    # Korthikanti et al. 2022 §5: selective recomputation cuts activation memory by 70 % for
    # GPT-3 175B and 65 % for MT-NLG 530B (s = 2048, sequence parallel).
    gpt3 = preset("gpt3-175b")
    mtnlg = ModelShape("530b", 105, 20480, 128, 128, 81920, 51200, True, mlp="gelu")
    for shape, saving in ((gpt3, 0.70), (mtnlg, 0.65)):
        full = activation_bytes_per_layer(shape, 2048, 1, 8, True, "none")
        sel = activation_bytes_per_layer(shape, 2048, 1, 8, True, "selective")
        assert 1 - sel / full == pytest.approx(saving, abs=0.01)


def test_activation_formulas_by_hand() -> None:
    shape = ModelShape("t", 4, 1024, 16, 16, 4096, 1000)
    s, b, h, a = 512, 2, 1024, 16
    sbh = s * b * h
    assert activation_bytes_per_layer(shape, s, b, 1, False, "none") == sbh * (34 + 5 * a * s / h)
    # TP 4 without sequence parallelism: sbh·(10 + 24/t + 5as/(ht))
    assert activation_bytes_per_layer(shape, s, b, 4, False, "none") == pytest.approx(
        sbh * (10 + 24 / 4 + 5 * a * s / (h * 4))
    )
    assert activation_bytes_per_layer(shape, s, b, 4, True, "selective") == sbh * 34 / 4
    assert activation_bytes_per_layer(shape, s, b, 4, True, "full") == 2 * sbh / 4
    assert activation_bytes_per_layer(shape, s, b, 4, False, "full") == 2 * sbh


def test_pipeline_first_stage_holds_all_layers_worth() -> None:
    # 1F1B: with m ≥ p the first stage keeps p micro-batches of L/p layers = L layers' worth
    shape = ModelShape("t", 8, 1024, 16, 16, 4096, 1000)
    per_layer = activation_bytes_per_layer(shape, 512, 1, 2, True, "selective")
    got = activation_bytes(shape, 512, 1, 2, 4, 16, True, "selective")
    assert got == pytest.approx(8 * per_layer)
    # fewer micro-batches than stages: only m in flight
    assert activation_bytes(shape, 512, 1, 2, 4, 2, True, "selective") == pytest.approx(
        4 * per_layer
    )


def test_params_per_gpu_by_hand() -> None:
    counts = count_params(preset("llama2-7b"))
    layer = counts.attention_per_layer + counts.mlp_per_layer
    # pp = 1, tp = 2: everything halves except the norms
    expected = (
        32 * (layer / 2 + counts.norms_per_layer) + 2 * counts.embedding / 2 + counts.final_norm
    )
    assert params_per_gpu(counts, 2, 1) == pytest.approx(expected)
    # pp = 4: 8 layers plus the embedding (first stage) or the head + final norm (last)
    stage = 8 * (layer / 2 + counts.norms_per_layer)
    assert params_per_gpu(counts, 2, 4) == pytest.approx(
        stage + counts.embedding / 2 + counts.final_norm
    )


def test_kv_cache_800_kb_per_token_for_opt_13b() -> None:
    # Kwon et al. 2023 (PagedAttention) §3: OPT-13B needs 2 · 5120 · 40 · 2 B = 800 KB/token
    opt13b = ModelShape("opt-13b", 40, 5120, 40, 40, 20480, 50272, mlp="gelu", norm="layer")
    assert kv_bytes_per_token(opt13b, 1) == 819_200
    # Llama-2-70B (GQA, 8 KV heads of 128): 2 · 80 · 8 · 128 · 2 B = 320 KiB; TP 8 → 1 head/GPU
    assert kv_bytes_per_token(preset("llama2-70b"), 1) == 327_680
    assert kv_bytes_per_token(preset("llama2-70b"), 8) == 327_680 / 8
    # TP beyond the KV heads replicates them: still one head per GPU
    assert kv_bytes_per_token(preset("llama2-70b"), 16) == 327_680 / 8


def test_kv_plan_waves_when_the_cache_is_short() -> None:
    shape = preset("llama2-7b")
    per_seq = kv_bytes_per_token(shape, 1) * kv_tokens(100, 200)
    assert kv_tokens(100, 200) == 304  # rounded up to blocks of 16
    kv = kv_plan(shape, 1, 10, 100, 200, free_bytes=per_seq * 4.5)
    assert (kv.concurrent, kv.waves) == (4, 3)
    assert kv_plan(shape, 1, 10, 100, 200, free_bytes=per_seq * 20).waves == 1
    assert kv_plan(shape, 1, 10, 100, 200, free_bytes=per_seq * 0.5).waves == 0
