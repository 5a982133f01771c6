"""FLOPs and time model against hand arithmetic and published training-run MFU."""

from __future__ import annotations

import pytest

from hpcalign.plan.flops import (
    decode_flops_per_token,
    generate_time,
    ring_s,
    sync_time,
    train_flops_per_token,
    train_time,
)
from hpcalign.plan.hardware import hardware
from hpcalign.plan.memory import kv_plan
from hpcalign.plan.shapes import ModelShape, count_params, preset


def test_training_flops_equal_narayanan_formula() -> None:
    # Narayanan et al. 2021 eq. (3) without recomputation: 72·B·s·l·h²·(1 + s/6h + V/12lh)
    shape = preset("gpt3-175b")
    B, s, layers, h, V = 1536, 2048, 96, 12288, 50257
    paper = 72 * B * s * layers * h**2 * (1 + s / (6 * h) + V / (12 * layers * h))
    ours = B * s * train_flops_per_token(shape, count_params(shape), s)
    assert ours == pytest.approx(paper, rel=2e-4)  # biases (13h per layer) are the difference


def test_six_n_rule_without_attention() -> None:
    shape = preset("llama2-7b")
    counts = count_params(shape)
    per_token = train_flops_per_token(shape, counts, seq=1)
    assert per_token == pytest.approx(6 * counts.matmul_active, rel=1e-3)
    assert decode_flops_per_token(shape, counts, 0) == 2 * counts.matmul_active


def test_ring_allreduce_and_bubble_by_hand() -> None:
    assert ring_s(1e9, 8, 100) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9)
    assert ring_s(1e9, 1, 100) == 0.0
    shape = ModelShape("t", 8, 1024, 16, 16, 4096, 1000)
    t = train_time(shape, count_params(shape), hardware("h100-80g"), 1, 4, 1, 12, 512, 1, "none")
    assert t.microbatches == 12
    assert t.bubble_s == pytest.approx(t.compute_s * 3 / 12)  # (p − 1)/m
    t2 = train_time(
        shape, count_params(shape), hardware("h100-80g"), 1, 4, 1, 12, 512, 1, "none", vpp=2
    )
    assert t2.bubble_s == pytest.approx(t.bubble_s / 2)  # interleaved: (p − 1)/(v·m)


def test_full_recompute_costs_a_third_more_compute() -> None:
    shape = preset("llama2-7b")
    counts, hw = count_params(shape), hardware("a100-80g")
    none = train_time(shape, counts, hw, 1, 1, 1, 8, 4096, 1, "none")
    full = train_time(shape, counts, hw, 1, 1, 1, 8, 4096, 1, "full")
    assert full.compute_s / none.compute_s == pytest.approx(4 / 3)
    assert full.model_flops == none.model_flops


def test_decode_is_memory_bound_at_small_batch() -> None:
    # one sequence of Llama-2-7B on one H100: reading 13.5 GB of weights per token dominates
    shape, hw = preset("llama2-7b"), hardware("h100-80g")
    counts = count_params(shape)
    kv = kv_plan(shape, 1, 1, 16, 100, free_bytes=40e9)
    t = generate_time(shape, counts, hw, 1, 1, kv, 16, 100)
    per_token = counts.total * 2 / (hw.hbm_gbps * 1e9 * hw.hbm_efficiency)
    assert t.total_s == pytest.approx(100 * per_token, rel=0.05)
    assert t.memory_s > 10 * t.compute_s


def test_generator_pipeline_saves_memory_not_weight_reads() -> None:
    # PP 2 halves the weights and KV cache per GPU, but with 2 micro-batches in flight each
    # stage reads its half once per micro-batch: a memory-bound decode round costs the same
    shape, hw = preset("llama2-7b"), hardware("h100-80g")
    counts = count_params(shape)
    kv1 = kv_plan(shape, 1, 4, 16, 100, free_bytes=40e9)
    kv2 = kv_plan(shape, 1, 4, 16, 100, free_bytes=40e9, pp=2)
    assert kv2.bytes_per_seq == kv1.bytes_per_seq / 2
    one = generate_time(shape, counts, hw, 1, 1, kv1, 16, 100)
    two = generate_time(shape, counts, hw, 1, 1, kv2, 16, 100, pp=2)
    assert two.total_s == pytest.approx(one.total_s, rel=0.05)
    assert two.pp_comm_s > 0 and one.pp_comm_s == 0


def test_weight_sync_by_hand() -> None:
    counts = count_params(preset("llama2-70b"))
    hw = hardware("h100-80g")
    got = sync_time(counts, hw, train_tp=8, train_pp=2, gen_tp=4, colocated=False)
    assert got == pytest.approx(counts.total * 2 / 4 / 50e9)
    # a generator TP 4 × PP 2 receives half as much per GPU; then the trainer side (/16) sets it
    got = sync_time(counts, hw, train_tp=8, train_pp=2, gen_tp=4, colocated=False, gen_pp=2)
    assert got == pytest.approx(counts.total * 2 / 8 / 50e9)


def _mfu(shape, hw_name, tp, pp, dp, batch, seq, recompute, vpp=1) -> tuple[float, float]:
    hw = hardware(hw_name)
    t = train_time(shape, count_params(shape), hw, tp, pp, dp, batch, seq, 1, recompute, vpp)
    mfu = t.model_flops / (t.total_s * tp * pp * dp * hw.peak_flops)
    return mfu, mfu * (4 / 3 if recompute == "full" else 1.0)


# Published large runs (docs/planner.md, "Validation"); predictions must land within 5 points.
def test_mfu_narayanan_2021_gpt_1t() -> None:
    # Table 1: 1T GPT (128 layers, h 25600, 160 heads) on 3072 A100, TP 8, PP 64, batch 3072,
    # full recomputation: 163 TFLOP/s per GPU counting the recomputation = 52 % of peak.
    shape = ModelShape(
        "1t",
        128,
        25600,
        160,
        160,
        102400,
        51200,
        True,
        mlp="gelu",
        norm="layer",
        position_embeddings=2048,
    )
    _, hfu = _mfu(shape, "a100-80g", 8, 64, 6, 3072, 2048, "full")
    assert hfu == pytest.approx(0.52, abs=0.05)


def test_mfu_korthikanti_2022_530b_selective_vs_full() -> None:
    # Abstract: MT-NLG 530B on 2240 A100 (TP 8, PP 35): MFU 54.2 % with selective
    # recomputation + sequence parallelism, 42.1 % with full recomputation (batch 1920).
    shape = ModelShape(
        "530b",
        105,
        20480,
        128,
        128,
        81920,
        51200,
        True,
        mlp="gelu",
        norm="layer",
        position_embeddings=2048,
    )
    selective, _ = _mfu(shape, "a100-80g", 8, 35, 8, 1920, 2048, "selective")
    full, _ = _mfu(shape, "a100-80g", 8, 35, 8, 1920, 2048, "full")
    assert selective == pytest.approx(0.542, abs=0.05)
    assert full == pytest.approx(0.421, abs=0.05)
    assert selective / full == pytest.approx(0.542 / 0.421, rel=0.05)


def test_mfu_llama3_405b_on_8192_h100() -> None:
    # Dubey et al. 2024, Table 4: 8192 H100, TP 8, PP 16, DP 64, seq 8192, 32 sequences per
    # DP rank: 430 TFLOP/s, 43 % BF16 MFU. Modelled with 128 even layers (Llama 3 trims the
    # first and last stage to 126) and 2 virtual stages (interleaved schedule).
    shape = ModelShape("405b-128l", 128, 16384, 128, 8, 53248, 128256)
    mfu, _ = _mfu(shape, "h100-80g", 8, 16, 64, 2048, 8192, "selective", vpp=2)
    assert mfu == pytest.approx(0.43, abs=0.05)
