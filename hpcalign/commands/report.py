"""`hpcalign report STUDY_DIR`: merge a sweep's planned and measured points into a report.

Reads STUDY_DIR/plan.json (written by `hpcalign sweep`) and every
points/NNNN/measured.json its array tasks wrote; writes report.md, results.json and the
PNG plots (measured vs planned step time and memory, scaling curve).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hpcalign.errors import UserError
from hpcalign.plan.report import study_table, write_report

HELP = "collect a sweep's measured and planned points into markdown and PNG plots"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hpcalign report", description=HELP)
    p.add_argument("study_dir", help="directory written by hpcalign sweep")
    args = p.parse_args(argv)
    study_dir = Path(args.study_dir)
    if not (study_dir / "plan.json").is_file():
        raise UserError(
            f"{study_dir}: no plan.json here (run hpcalign sweep STUDY.yaml --out {study_dir})"
        )
    report = write_report(study_dir)
    rows = json.loads((study_dir / "results.json").read_text())
    print(study_table(rows))
    print(f"\nwrote {report}")
    return 0
