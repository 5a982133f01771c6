"""The measured half of a study: one Slurm array task per measurable point, via submitit.

Each task calls `run_point(spec)`: a short real `hpcalign run` of the point (the local
launcher, `hpcalign.launch.local.run_local`, inside the task's allocation), then a summary
of its `RUN_DIR/metrics.jsonl` written atomically to `points/NNNN/measured.json`. The task
writes its own file, so `hpcalign report` works from the study directory alone, whether
or not the submitting process is still waiting.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from hpcalign.durable import atomic_write_text
from hpcalign.plan.report import Row
from hpcalign.plan.study import Point, Study, points, run_overrides

MEASURED_KEYS = ("time_step_s", "samples_per_s", "time_generate_s", "time_train_s", "time_sync_s")


def point_dir(study_dir: Path, index: int) -> Path:
    return study_dir / "points" / f"{index:04d}"


def specs(study: Study, study_dir: Path, rows: list[Row], run_config: Path) -> list[dict[str, Any]]:
    """One picklable spec per measurable row: what its array task runs and where it writes."""
    by_index: dict[int, Point] = {p.index: p for p in points(study)}
    out = []
    for row in rows:
        if row["planned_only"]:
            continue
        point = by_index[row["index"]]
        run_dir = point_dir(study_dir, row["index"]).resolve() / "run"
        b = point.config.batch
        out.append(
            {
                "index": row["index"],
                "run_config": str(run_config),
                "overrides": run_overrides(study, point, str(run_dir)),
                "run_dir": str(run_dir),
                "out": str(point_dir(study_dir, row["index"]).resolve() / "measured.json"),
                "tokens_per_sample": b.prompt_tokens + b.response_tokens,
                "ranks": point.config.gpus,
            }
        )
    return out


def summarise(lines: list[dict[str, Any]], tokens_per_sample: int, ranks: int) -> dict[str, Any]:
    """Medians over the steps after the first (which pays for start-up and warm-up)."""
    steps = [m for m in lines if "step" in m and "time_step_s" in m]
    timed = steps[1:]
    if not timed:
        return {"ok": False, "error": f"the run logged {len(steps)} step(s); need at least 2"}
    out: dict[str, Any] = {"ok": True, "steps_timed": len(timed)}
    for key in MEASURED_KEYS:
        values = [float(m[key]) for m in timed if m.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    if out["samples_per_s"]:
        out["tokens_per_s_per_gpu"] = out["samples_per_s"] * tokens_per_sample / ranks
    rewards = [m["reward_mean"] for m in steps if m.get("reward_mean") is not None]
    out["reward_first_last"] = [rewards[0], rewards[-1]] if rewards else None
    return out


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(path), json.dumps(data, indent=2) + "\n")


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Array-task entry: run the point for real, summarise its metrics, write measured.json."""
    start = time.monotonic()
    result: dict[str, Any] = {
        "index": spec["index"],
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "partition": os.environ.get("SLURM_JOB_PARTITION"),
        "overrides": spec["overrides"],
    }
    # NOTE: the point runs on this task's node as a *local* run. Open MPI's mpiexec would
    # otherwise read the Slurm allocation and try to start its daemons through Slurm, which
    # hangs where NodeName differs from the host name (the test cluster's vm1/vm2 on host
    # `vm`): "UNSUPPORTED DAEMON ERROR STATE: NO PATH TO TARGET", until the time limit.
    os.environ.setdefault("PRTE_MCA_ras", "^slurm")
    os.environ.setdefault("PRTE_MCA_plm", "^slurm")
    try:
        from hpcalign.config.load import load_config
        from hpcalign.launch.local import run_local

        rc = run_local(load_config(spec["run_config"], spec["overrides"]))
        result["rc"] = rc
        metrics = Path(spec["run_dir"]) / "metrics.jsonl"
        lines = (
            [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            if metrics.exists()
            else []
        )
        result.update(summarise(lines, spec["tokens_per_sample"], spec["ranks"]))
        if rc != 0:
            result.update(ok=False, error=f"hpcalign run exited {rc}")
    except Exception as err:  # noqa: BLE001 - the task must always leave a result behind
        result.update(ok=False, error=f"{type(err).__name__}: {err}")
    # ru_maxrss is in KiB on Linux: the largest single process among the finished children
    result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    result["wall_s"] = time.monotonic() - start
    _write_atomic(Path(spec["out"]), result)
    return result


def submit(
    study: Study, study_dir: Path, task_specs: list[dict[str, Any]], executor: str | None = None
) -> list[Any]:
    """Submit `task_specs` as one job array (submitit `map_array`) on the study's partition."""
    import submitit

    assert study.measure is not None
    kind = executor or study.measure.executor
    ex = submitit.AutoExecutor(
        folder=study_dir / "submitit", cluster=None if kind == "auto" else kind
    )
    ex.update_parameters(
        name=f"sweep-{study.name}",
        timeout_min=study.measure.timeout_min,
        cpus_per_task=study.measure.cpus_per_task,
        slurm_partition=study.measure.partition,
        slurm_array_parallelism=study.measure.parallelism,
    )
    return list(ex.map_array(run_point, task_specs))


def wait(
    jobs: list[Any], task_specs: list[dict[str, Any]], timeout_s: float, poll_s: float = 1.0
) -> int:
    """Wait for the array; a task that died without writing its file gets one with the error.
    Returns how many tasks finished with a measurement."""
    deadline = time.monotonic() + timeout_s
    pending = list(zip(jobs, task_specs))
    ok = 0
    while pending and time.monotonic() < deadline:
        still = []
        for job, spec in pending:
            if not job.done():
                still.append((job, spec))
                continue
            try:
                result = job.result()
                ok += bool(result.get("ok"))
            except Exception as err:  # noqa: BLE001 - report every failure, keep waiting for the rest
                if not Path(spec["out"]).exists():
                    _write_atomic(
                        Path(spec["out"]),
                        {
                            "index": spec["index"],
                            "ok": False,
                            "error": f"{type(err).__name__}: {str(err)[-300:]}",
                        },
                    )
        pending = still
        if pending:
            time.sleep(poll_s)
    for job, spec in pending:
        _write_atomic(
            Path(spec["out"]),
            {
                "index": spec["index"],
                "ok": False,
                "error": f"no result after {timeout_s:.0f} s (job {job.job_id})",
            },
        )
    return ok
