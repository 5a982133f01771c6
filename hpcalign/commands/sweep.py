"""`hpcalign sweep STUDY.yaml [key=value ...]`: plan every grid point, measure the small ones.

Plans each point (pruning infeasible ones, with the reason), writes STUDY_DIR/plan.json,
submits the measurable points as one Slurm job array through submitit (each task runs a
short `hpcalign run` and writes points/NNNN/measured.json), waits, and writes the report
(`hpcalign report STUDY_DIR` rebuilds it at any time).

  hpcalign sweep configs/study-tiny.yaml            # on the test Slurm cluster
  hpcalign sweep configs/study-300b.yaml            # 300B: planned only, no jobs
  hpcalign sweep configs/study-tiny.yaml --no-wait  # submit, report later
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from hpcalign.errors import ConfigError, UserError
from hpcalign.plan.report import plan_points, study_table, write_report
from hpcalign.plan.study import load_study
from hpcalign.plan.sweep import specs, submit, wait

HELP = "plan a scaling study's grid, measure its small points as a Slurm job array, report"


def _run_config(value: str, study_file: Path) -> Path:
    """The measure run config, relative to the working directory or to the study file."""
    for candidate in (Path(value), study_file.parent / value, study_file.parent.parent / value):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{study_file}: measure.run_config={value!r}: no such file")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hpcalign sweep", description=HELP)
    p.add_argument("study", help="study YAML (configs/study-*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value on the study, e.g. measure.steps=3")
    p.add_argument("--out", help="study directory (default runs/studies/NAME)")
    p.add_argument("--plan-only", action="store_true", help="plan and report, submit nothing")
    p.add_argument("--no-wait", action="store_true", help="submit and return; report later")
    p.add_argument(
        "--executor", choices=["auto", "slurm", "local", "debug"], help="override measure.executor"
    )
    args = p.parse_args(argv)
    study_file = Path(args.study)
    study = load_study(study_file, args.overrides)
    study_dir = Path(args.out or f"runs/studies/{study.name}")
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "study.yaml").write_text(yaml.safe_dump(study.model_dump(), sort_keys=False))
    rows = plan_points(study)
    (study_dir / "plan.json").write_text(
        json.dumps({"study": study.name, "points": rows}, indent=2) + "\n"
    )
    print(study_table(rows))
    feasible = sum(r["feasible"] for r in rows)
    measurable = [r for r in rows if not r["planned_only"]]
    print(
        f"\n{len(rows)} points: {feasible} feasible, {len(rows) - feasible} pruned, {len(measurable)} to measure"
    )
    if measurable and not args.plan_only:
        assert study.measure is not None
        task_specs = specs(
            study, study_dir, rows, _run_config(study.measure.run_config, study_file)
        )
        try:
            jobs = submit(study, study_dir, task_specs, args.executor)
        except Exception as err:  # submitit raises plain exceptions for sbatch failures
            raise UserError(f"submitting the job array failed: {err}") from None
        ids = [j.job_id for j in jobs]
        (study_dir / "jobs.json").write_text(json.dumps({"job_ids": ids}, indent=2) + "\n")
        print(f"submitted {len(jobs)} array tasks: {', '.join(ids)}")
        if args.no_wait:
            print(f"when they finish: hpcalign report {study_dir}")
            return 0
        ok = wait(jobs, task_specs, study.measure.wait_s)
        print(f"{ok} of {len(jobs)} tasks measured")
    report = write_report(study_dir)
    print(f"wrote {report}")
    return 0
