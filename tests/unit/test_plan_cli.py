"""`hpcalign plan`, `sweep --plan-only` and `report` through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcalign.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_plan_config_writes_json_and_markdown(tmp_path: Path, capsys) -> None:
    assert main(["plan", str(ROOT / "configs/plan-70b.yaml"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "policy" in out and "tokens/s/GPU" in out
    plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
    assert plan["feasible"] and plan["pools"] == {"train": 48, "gen": 16}
    assert {r["role"] for r in plan["roles"]} == {"generator", "reference", "policy"}
    assert "# Plan: plan-70b" in (tmp_path / "plan.md").read_text()


def test_plan_overrides_and_gpu_flag(tmp_path: Path) -> None:
    args = [
        "plan",
        str(ROOT / "configs/plan-70b.yaml"),
        "layouts.generator.tp=8",
        "--gpu",
        "h200-141g",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
    assert plan["hardware"] == "h200-141g"
    assert next(r for r in plan["roles"] if r["role"] == "generator")["tp"] == 8


def test_preset_search(tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "plan",
                "--preset",
                "llama2-7b",
                "--gpus",
                "16",
                "--search",
                "--top",
                "3",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "searched" in out and "1. " in out and "3. " in out
    data = json.loads((tmp_path / "plan.json").read_text())
    assert len(data["search"]["best"]) == 3 and data["plan"]["feasible"]


def test_run_config_is_planned_as_its_run(tmp_path: Path) -> None:
    assert (
        main(
            [
                "plan",
                str(ROOT / "configs/quickstart.yaml"),
                "trainer.ranks=2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
    assert plan["hardware"] == "cpu" and plan["pools"] == {"train": 2, "gen": 1}
    assert plan["roles"][0]["params"] < 1e6  # the 0.5 M-parameter quickstart model


def test_study_is_planned_point_by_point(tmp_path: Path) -> None:
    assert main(["plan", str(ROOT / "configs/study-300b.yaml"), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["study"] == "study-300b" and len(data["points"]) == 256
    assert "best planned on 1024 GPUs" in (tmp_path / "plan.md").read_text()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["plan"], "give a CONFIG or --preset"),
        (["plan", "--preset", "llama9"], "preset='llama9'; expected one of"),
        (["plan", "nope.yaml"], "nope.yaml: no such file"),
        (
            ["plan", str(ROOT / "configs/plan-70b.yaml"), "batch.promts=3"],
            "batch.promts: unknown key",
        ),
        (["plan", str(ROOT / "configs/plan-70b.yaml"), "--gpu", "tpu-v5"], "hardware"),
        (["report", "/nonexistent-study"], "no plan.json"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], needle: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_sweep_plan_only_then_report(tmp_path: Path, capsys) -> None:
    assert (
        main(
            ["sweep", str(ROOT / "configs/study-tiny.yaml"), "--plan-only", "--out", str(tmp_path)]
        )
        == 0
    )
    assert "4 to measure" in capsys.readouterr().out
    assert (tmp_path / "report.md").exists() and (tmp_path / "study.yaml").exists()
    assert main(["report", str(tmp_path)]) == 0
    assert "0 measured" in (tmp_path / "report.md").read_text()


def test_plan_reads_hf_config_relative_to_the_plan_file(tmp_path: Path, monkeypatch) -> None:
    model = tmp_path / "cfg" / "my-70b"
    model.mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 8192,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "intermediate_size": 28672,
                "vocab_size": 32000,
            }
        )
    )
    plan_file = tmp_path / "cfg" / "plan.yaml"
    plan_file.write_text(
        "gpus: 64\ngenerator_gpus: 16\nmodels: {policy: {hf_config: my-70b}}\n"
        "layouts: {policy: {tp: 8, pp: 2}, generator: {tp: 4}}\n"
    )
    monkeypatch.chdir(tmp_path)  # the path is relative to the plan file, not to here
    assert main(["plan", str(plan_file), "--out", str(tmp_path / "out")]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())["plan"]
    assert plan["feasible"] and plan["roles"][0]["params"] == 68_976_648_192
