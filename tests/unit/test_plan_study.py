"""Study files, grid expansion, pruning, measurability, run overrides, report merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hpcalign.errors import ConfigError
from hpcalign.plan.report import plan_points, write_report
from hpcalign.plan.study import load_study, points, run_overrides
from hpcalign.plan.sweep import run_point, specs, summarise

ROOT = Path(__file__).resolve().parents[2]


def write_study(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "configs/study-tiny.yaml").read_text())
    data["measure"]["run_config"] = str(ROOT / "configs/quickstart.yaml")
    data.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_grid_is_the_cartesian_product(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    pts = points(study)
    assert len(pts) == 2 * 2 * 2
    assert pts[5].values == {"gpus": 3, "staleness": 0, "layouts.policy.tp": 2}
    assert pts[5].config.gpus == 3 and pts[5].config.layouts.policy.tp == 2
    assert pts[5].label == "gpus=3 staleness=0 tp=2"


def test_pruning_and_measurability(tmp_path: Path) -> None:
    rows = plan_points(load_study(write_study(tmp_path)))
    by_values = {(r["values"]["gpus"], r["values"]["layouts.policy.tp"]): r for r in rows}
    # 1 trainer rank cannot hold TP 2: pruned with the reason
    pruned = by_values[(2, 2)]
    assert not pruned["feasible"] and "does not divide its 1 GPUs" in pruned["reasons"][0]
    assert pruned["planned_only"] == "infeasible plan"
    # TP 2 on 2 trainer ranks is feasible but not runnable by hpcalign run
    assert "data parallel only" in by_values[(3, 2)]["planned_only"]
    assert by_values[(3, 1)]["planned_only"] is None and by_values[(3, 1)]["step_time_s"] > 0


def test_300b_points_are_planned_only() -> None:
    study = load_study(ROOT / "configs/study-300b.yaml")
    rows = plan_points(study)
    assert {r["gpus"] for r in rows} == {512, 1024}
    assert all(r["planned_only"] for r in rows)
    feasible = [r for r in rows if r["feasible"]]
    assert feasible and len(feasible) < len(rows)
    # 601 GB of bf16 weights over TP 8 alone leaves no room for KV; TP 8 × PP 2 fits
    tp8 = [r for r in rows if r["values"]["layouts.generator.tp"] == 8]
    assert all(
        "generator: OOM" in r["reasons"][0] for r in tp8 if r["values"]["layouts.generator.pp"] == 1
    )
    assert any(r["feasible"] for r in tp8 if r["values"]["layouts.generator.pp"] == 2)


def test_study_errors_name_the_point_and_key(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"grid point 1 \(gpus=0\).*gpus: Input should be greater"
    ):
        load_study(write_study(tmp_path, grid={"gpus": [2, 0]}))
    with pytest.raises(ConfigError, match=r"layouts.policy.tpp: unknown key"):
        load_study(write_study(tmp_path, grid={"layouts.policy.tpp": [1]}))
    with pytest.raises(ConfigError, match="measure.stepz: unknown key"):
        load_study(write_study(tmp_path, measure={"run_config": "x", "stepz": 3}))
    with pytest.raises(ConfigError, match="grid.gpus is empty"):
        load_study(write_study(tmp_path, grid={"gpus": []}))


def test_run_overrides_map_the_point(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    point = points(study)[6]  # gpus=3, staleness=1, tp=1
    got = run_overrides(study, point, "/r")
    for item in (
        "run_dir=/r",
        "trainer.ranks=2",
        "generator.ranks=1",
        "sync.max_staleness=1",
        "generator.prompts_per_step=16",
        "generator.samples_per_prompt=8",
        "generator.max_new_tokens=8",
        f"trainer.steps={study.measure.steps}",
        "model.init.hidden=128",
        "trainer.sft_warmup_steps=0",
    ):
        assert item in got
    # the overrides are valid for the run config
    from hpcalign.config.load import load_config

    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), got)
    assert (cfg.trainer.ranks, cfg.generator.ranks, cfg.sync.max_staleness) == (2, 1, 1)


def test_summarise_skips_the_warmup_step() -> None:
    lines = [
        {"step": i, "time_step_s": t, "samples_per_s": 128 / t, "reward_mean": 0.1 * i}
        for i, t in enumerate([5.0, 1.0, 2.0, 3.0])
    ]
    got = summarise(lines, tokens_per_sample=22, ranks=2)
    assert got["ok"] and got["steps_timed"] == 3
    assert got["time_step_s"] == 2.0
    assert got["tokens_per_s_per_gpu"] == pytest.approx(64.0 * 22 / 2)
    assert got["reward_first_last"] == [0.0, pytest.approx(0.3)]
    assert not summarise(lines[:1], 22, 2)["ok"]


def test_run_point_always_leaves_a_result(tmp_path: Path) -> None:
    out = tmp_path / "measured.json"
    spec = {
        "index": 3,
        "run_config": str(tmp_path / "missing.yaml"),
        "overrides": [],
        "run_dir": str(tmp_path / "run"),
        "out": str(out),
        "tokens_per_sample": 22,
        "ranks": 2,
    }
    result = run_point(spec)
    assert not result["ok"] and "does not exist" in result["error"]
    assert json.loads(out.read_text())["index"] == 3


def test_report_merges_measured_points(tmp_path: Path) -> None:
    study_path = write_study(tmp_path)
    study = load_study(study_path)
    rows = plan_points(study)
    study_dir = tmp_path / "out"
    study_dir.mkdir()
    (study_dir / "plan.json").write_text(json.dumps({"study": study.name, "points": rows}))
    task_specs = specs(study, study_dir, rows, ROOT / "configs/quickstart.yaml")
    assert [s["index"] for s in task_specs] == [r["index"] for r in rows if not r["planned_only"]]
    # one task's result file, as run_point writes it (the measured values here are inputs)
    first = task_specs[0]
    Path(first["out"]).parent.mkdir(parents=True)
    measured = {"ok": True, "time_step_s": 1.5, "tokens_per_s_per_gpu": 900.0, "max_rss_gb": 0.6}
    Path(first["out"]).write_text(json.dumps(measured))
    report = write_report(study_dir)
    text = report.read_text()
    assert "1 measured" in text and "| 1.5 |" in text
    ratio = 1.5 / rows[first["index"]]["step_time_s"]
    assert f"{ratio:.1f}×" in text
    assert (study_dir / "step_time.png").stat().st_size > 1000
    assert (study_dir / "scaling.png").exists() and (study_dir / "memory.png").exists()
