"""`hpcalign plan [CONFIG | --preset NAME] [key=value ...]`: memory, FLOPs, time per role.

CONFIG is a plan config (`configs/plan-70b.yaml`), a study (`configs/study-300b.yaml`:
every grid point is planned) or an hpcalign run config (the GRPO run it describes).
Prints a table, and writes `plan.json` and `plan.md` to --out (default runs/plans/NAME).

  hpcalign plan configs/plan-70b.yaml
  hpcalign plan --preset llama3-405b --gpus 1024 --search
  hpcalign plan configs/study-300b.yaml --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpcalign.errors import UserError
from hpcalign.plan.planner import make_plan
from hpcalign.plan.render import plan_markdown, plan_text, search_text
from hpcalign.plan.search import search
from hpcalign.plan.sources import load_input
from hpcalign.plan.spec import PlanConfig, parse_plan
from hpcalign.plan.study import Study

HELP = "plan memory, FLOPs and time per role for a model size and GPU count (no GPUs needed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcalign plan", description=HELP)
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="CONFIG [key=value ...]",
        help="plan config, study or run config, then key=value overrides",
    )
    p.add_argument("--preset", help="plan this model preset instead of a CONFIG (e.g. llama2-70b)")
    p.add_argument(
        "--algorithm",
        default="grpo",
        choices=["grpo", "ppo", "dpo"],
        help="with --preset: the algorithm (ppo uses the preset as reward model too)",
    )
    p.add_argument("--gpus", type=int, help="total GPU budget (overrides the config)")
    p.add_argument("--gpu", help="accelerator kind: a100-80g, h100-80g, h200-141g, mi300x, cpu")
    p.add_argument("--search", action="store_true", help="enumerate layouts, print the best few")
    p.add_argument("--top", type=int, default=5, help="with --search: how many to print")
    p.add_argument("--out", help="directory for plan.json and plan.md (default runs/plans/NAME)")
    return p


def _preset_config(args: argparse.Namespace) -> PlanConfig:
    models: dict[str, Any] = {"policy": {"preset": args.preset}}
    if args.algorithm == "ppo":
        models["reward"] = {"preset": args.preset}
    data = {
        "algorithm": args.algorithm,
        "gpus": args.gpus or 8,
        "models": models,
        "hardware": args.gpu or "h100-80g",
    }
    return parse_plan(data, f"--preset {args.preset}")


def _write(out: Path, payload: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "plan.md").write_text(markdown)
    print(f"\nwrote {out / 'plan.json'} and {out / 'plan.md'}")


def _plan_study(study: Study, out: Path, gpu: str | None, gpus: int | None) -> int:
    from hpcalign.plan.report import plan_points, study_markdown, study_table

    rows = plan_points(study, gpu=gpu, gpus=gpus)
    print(study_table(rows))
    _write(out, {"study": study.name, "points": rows}, study_markdown(study.name, rows, out))
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    paths = [x for x in args.inputs if "=" not in x]
    overrides = [x for x in args.inputs if "=" in x]
    if len(paths) > 1:
        raise UserError(f"give one CONFIG, got {len(paths)}: {' '.join(paths)}")
    if bool(paths) == bool(args.preset):
        raise UserError("give a CONFIG or --preset NAME (one of them)")
    if args.preset:
        cfg, name = _preset_config(args), args.preset
    else:
        kind, parsed = load_input(paths[0], overrides, args.gpu)
        name = Path(paths[0]).stem
        if isinstance(parsed, Study):
            return _plan_study(parsed, Path(args.out or f"runs/plans/{name}"), args.gpu, args.gpus)
        cfg = parsed
    if args.gpus:
        cfg = parse_plan({**cfg.model_dump(), "gpus": args.gpus}, "--gpus")
    out = Path(args.out or f"runs/plans/{name}")
    result = search(cfg, top=args.top) if args.search else None
    plan = result.best[0] if result and result.best else make_plan(cfg)
    print(plan_text(plan))
    if result is not None:
        print("\n" + search_text(result))
    elif not plan.feasible:
        print("\nhint: --search enumerates layouts that fit")
    payload = {"plan": plan.as_dict()}
    if result is not None:
        payload["search"] = {
            "candidates": result.candidates,
            "best": [{"why": w, **p.as_dict()} for p, w in zip(result.best, result.why)],
            "infeasible": dict(result.infeasible),
        }
    _write(out, payload, plan_markdown(plan, result, title=f"Plan: {name}"))
    return 0
