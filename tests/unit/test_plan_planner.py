"""Whole plans: infeasibility reasons, memory accounting, overlap, search."""

from __future__ import annotations

from typing import Any

import pytest

from hpcalign.errors import ConfigError
from hpcalign.plan.planner import make_plan
from hpcalign.plan.search import _rank_key, candidates, refine, search
from hpcalign.plan.spec import parse_plan


def cfg(**kw: Any):
    data: dict[str, Any] = {
        "models": {"policy": {"preset": "llama2-7b"}},
        "gpus": 16,
        "generator_gpus": 8,
        "batch": {
            "prompts": 64,
            "samples_per_prompt": 4,
            "prompt_tokens": 256,
            "response_tokens": 256,
        },
    }
    for key, value in kw.items():
        node = data
        *head, last = key.split("__")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return parse_plan(data, "test")


def test_feasible_plan_adds_up() -> None:
    plan = make_plan(cfg(layouts={"policy": {"tp": 2}, "generator": {"tp": 1}}))
    assert plan.feasible, plan.reasons
    pol = plan.role("policy")
    assert (pol.gpus, pol.tp, pol.pp, pol.dp) == (8, 2, 1, 4)
    # sequential step (staleness 0): generation + train side + sync
    p = plan.phases_s
    assert plan.step_time_s == pytest.approx(
        p["generate"] + p["reference_logprobs"] + p["train_policy"] + p["weight_sync"]
    )
    tokens = 64 * 4 * 512
    assert plan.tokens_per_s_per_gpu == pytest.approx(tokens / plan.step_time_s / 16)
    # distributed optimizer: 12 bytes/param over DP 4, fp32 grads 4 bytes/param
    assert pol.memory_gb["optimizer"] == pytest.approx(pol.memory_gb["weights"] / 2 * 12 / 4)
    assert pol.memory_gb["grads"] == pytest.approx(pol.memory_gb["weights"] * 2)


def test_staleness_overlaps_generation_with_training() -> None:
    on = make_plan(cfg(staleness=0))
    off = make_plan(cfg(staleness=1))
    gen, sync = off.phases_s["generate"], off.phases_s["weight_sync"]
    assert off.step_time_s == pytest.approx(max(gen, off.train_side_s) + sync)
    assert off.step_time_s < on.step_time_s
    assert off.bound_by in ("generation", "training") and on.bound_by == "sequential"


@pytest.mark.parametrize(
    "layouts,needle",
    [
        ({"policy": {"tp": 64}}, "TP 64 is larger than the 32 attention heads"),
        ({"policy": {"tp": 3}}, "TP 3 does not divide the 32 attention heads"),
        ({"policy": {"pp": 5}}, "PP 5 does not divide the 32 layers"),
        ({"policy": {"tp": 4, "pp": 4}}, "TP·PP = 16 does not divide its 8 GPUs"),
        ({"generator": {"pp": 3}}, "generator: PP 3 does not divide the 32 layers"),
    ],
)
def test_infeasible_layouts_say_why(layouts: dict, needle: str) -> None:
    plan = make_plan(cfg(layouts=layouts))
    assert not plan.feasible
    assert any(needle in r for r in plan.reasons), plan.reasons


def test_gqa_tp_beyond_kv_heads() -> None:
    plan = make_plan(
        cfg(
            models={"policy": {"preset": "llama2-70b"}},
            gpus=96,
            generator_gpus=32,
            layouts={"policy": {"tp": 4, "pp": 4}, "generator": {"tp": 4}},
        )
    )
    assert plan.feasible, plan.reasons
    bad = make_plan(
        cfg(
            models={"policy": {"preset": "llama3-8b"}},
            layouts={"policy": {"tp": 2}, "generator": {"tp": 4}},
        )
    )
    assert bad.feasible  # 8 KV heads: TP 2 and 4 divide them


def test_oom_reports_by_how_much() -> None:
    # 70B on 8 training GPUs without TP: 18 bytes/param of 69 B params can never fit
    plan = make_plan(cfg(models={"policy": {"preset": "llama2-70b"}}))
    assert not plan.feasible
    text = " ".join(plan.reasons)
    assert "OOM" in text and "GB" in text
    gen = [r for r in plan.reasons if r.startswith("generator")]
    assert gen and "138.0 GB of weights at TP 1" in gen[0]


def test_colocated_uses_all_gpus_and_offloads() -> None:
    plan = make_plan(cfg(mode="colocated", layouts={"policy": {"tp": 2}, "generator": {"tp": 2}}))
    assert plan.feasible, plan.reasons
    assert plan.pools == {"train": 16, "gen": 16}
    assert plan.role("generator").dp == 8
    assert plan.offload in ("none", "optimizer", "all")


def test_dpo_and_ppo_roles() -> None:
    dpo = make_plan(cfg(algorithm="dpo"))
    assert [r.role for r in dpo.roles] == ["reference", "policy"]
    assert dpo.pools == {"train": 16}
    with pytest.raises(ConfigError, match="models.reward"):
        cfg(algorithm="ppo")
    ppo = make_plan(
        cfg(
            algorithm="ppo",
            models={"policy": {"preset": "llama2-7b"}, "reward": {"preset": "llama2-7b"}},
            layouts={"policy": {"tp": 2}},
        )
    )
    assert [r.role for r in ppo.roles] == ["generator", "reference", "reward", "critic", "policy"]
    assert ppo.role("critic").memory_gb["optimizer"] > 0


def test_config_errors_name_key_and_value() -> None:
    with pytest.raises(ConfigError, match=r"hardware.*'tpu'"):
        cfg(hardware="tpu")
    with pytest.raises(ConfigError, match=r"batch.prompt: unknown key"):
        cfg(batch={"prompt": 3})
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_plan({"models": {"policy": {}}}, "x")


def test_search_finds_the_fastest_feasible_layout() -> None:
    base = cfg(models={"policy": {"preset": "llama2-70b"}}, gpus=64)
    result = search(base, top=3)
    assert result.best and all(p.feasible for p in result.best)
    times = [p.step_time_s for p in result.best]
    assert times == sorted(times)
    # no feasible candidate is faster than the winner
    every = [make_plan(c) for c in candidates(base)]
    assert times[0] <= min(p.step_time_s for p in every if p.feasible) + 1e-9
    assert "faster than" in result.why[0] and "behind #1" in result.why[1]
    assert sum(result.infeasible.values()) == result.candidates - sum(p.feasible for p in every)


def test_refine_gives_other_roles_their_own_layout() -> None:
    # PPO with a 70B policy and a 7B reward model/critic: the small models need no PP 8
    base = cfg(
        algorithm="ppo",
        gpus=64,
        generator_gpus=16,
        models={"policy": {"preset": "llama2-70b"}, "reward": {"preset": "llama2-7b"}},
        layouts={"policy": {"tp": 8, "pp": 2}, "generator": {"tp": 4}},
    )
    shared = make_plan(base)
    assert shared.feasible, shared.reasons
    refined_cfg, refined = refine(base, shared)
    assert refined.feasible
    assert _rank_key(refined) < _rank_key(shared)
    changed = [
        r for r in ("reference", "reward", "critic") if getattr(refined_cfg.layouts, r) is not None
    ]
    assert changed
    # what refine chose is what make_plan reports for that role
    for role in changed:
        lay = getattr(refined_cfg.layouts, role)
        assert (refined.role(role).tp, refined.role(role).pp) == (lay.tp, lay.pp)
