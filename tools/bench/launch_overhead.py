"""Benchmark the launch overhead of `hpcalign submit` against a bare hand-written het job.

Both sides run on the same Slurm cluster (e.g. `tools/slurm-test-cluster up`), as one
heterogeneous job whose components start as ONE MPMD step `srun --mpi=pmix A : B`, with
the same Python interpreter and the same number of ranks per component:

  hpcalign: from starting `hpcalign submit CONFIG` (CLI start, config validation, RUN_DIR,
            submitit, sbatch) until every rank logged "ready": MPI world and
            torch.distributed up, before any model is loaded (RUN_DIR/logs/rank-N.log).
  bare:     from starting `sbatch` on a hand-written het-job script until every rank has
            imported torch and mpi4py and passed one MPI barrier.

The job is cancelled as soon as all ranks are ready; runs alternate and the medians are
compared. Prints ONE JSON line. Target: hpcalign <= 1.5 x bare.

    python tools/bench/launch_overhead.py --repeat 3
    python tools/bench/launch_overhead.py --config configs/quickstart.yaml generator.ranks=2 \
        slurm.gen.tasks_per_node=2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TIMEOUT_S = 600.0
BARE_RANK = """\
import json, os, sys, time
import torch  # noqa: F401  (what every rank pays)
from mpi4py import MPI
comm = MPI.COMM_WORLD
comm.Barrier()
with open(os.path.join(sys.argv[1], f"ready-{comm.Get_rank()}.json"), "w") as handle:
    json.dump({"rank": comm.Get_rank(), "time": time.time()}, handle)
"""
_READY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) rank(\d+) \S+ INFO .* ready on ")


def sh(argv: list[str], timeout: float = 60.0, **kwargs: object) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def wait_gone(job_id: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if not sh(["squeue", "-h", "-j", job_id]).strip():
            return
        time.sleep(0.2)
    raise SystemExit(f"job {job_id} did not end")


def ready_times_hpcalign(run_dir: str, world: int) -> list[float] | None:
    """Wall-clock times of the ranks' "ready" log lines, once all `world` ranks have one."""
    times: dict[int, float] = {}
    logs = os.path.join(run_dir, "logs")
    for name in os.listdir(logs) if os.path.isdir(logs) else []:
        if not name.startswith("rank-"):
            continue
        with open(os.path.join(logs, name)) as handle:
            for line in handle:
                match = _READY.match(line)
                if match:
                    stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp()
                    times[int(match[3])] = stamp + int(match[2]) / 1000
    return list(times.values()) if len(times) == world else None


def ready_times_bare(out_dir: str, world: int) -> list[float] | None:
    names = [n for n in os.listdir(out_dir) if n.startswith("ready-")]
    if len(names) < world:
        return None
    times = []
    for name in names:
        with open(os.path.join(out_dir, name)) as handle:
            times.append(json.load(handle)["time"])
    return times


def poll(fn, *args: object) -> list[float]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = fn(*args)
        if found:
            return found
        time.sleep(0.05)
    raise SystemExit(f"ranks not ready within {TIMEOUT_S:.0f} s ({fn.__name__} {args})")


def seconds_to_ready(t0: float, job_id: str, ready_times, where: str, world: int) -> float:
    """Seconds from `t0` until the last of `world` ranks was ready; the job is then ended."""
    try:
        ready = poll(ready_times, where, world)
    finally:
        sh(["scancel", job_id])
    wait_gone(job_id)
    return max(ready) - t0


def run_hpcalign(config: str, overrides: list[str], run_dir: str, world: int) -> float:
    t0 = time.time()
    out = sh([sys.executable, "-m", "hpcalign.cli", "submit", config, f"run_dir={run_dir}",
              *overrides], timeout=TIMEOUT_S, cwd=ROOT)
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    return seconds_to_ready(t0, job_id, ready_times_hpcalign, run_dir, world)


def bare_script(out_dir: str, cfg: object) -> str:
    py = shlex.quote(sys.executable)
    rank = shlex.quote(os.path.join(out_dir, "bare_rank.py"))
    out = shlex.quote(out_dir)
    train, gen = cfg.slurm.train, cfg.slurm.gen
    return f"""#!/bin/bash
#SBATCH --job-name=bare --time=10 --output={out}/bare-%j.out
#SBATCH --partition={train.partition} --nodes={train.nodes} --ntasks-per-node={train.tasks_per_node}
#SBATCH hetjob
#SBATCH --partition={gen.partition} --nodes={gen.nodes} --ntasks-per-node={gen.tasks_per_node}
srun --mpi=pmix {py} -u {rank} {out} : {py} -u {rank} {out}
"""


def run_bare(cfg: object, out_dir: str, world: int) -> float:
    os.makedirs(out_dir)
    with open(os.path.join(out_dir, "bare_rank.py"), "w") as handle:
        handle.write(BARE_RANK)
    script = os.path.join(out_dir, "bare.sbatch")
    with open(script, "w") as handle:
        handle.write(bare_script(out_dir, cfg))
    t0 = time.time()
    job_id = sh(["sbatch", "--parsable", script]).strip()
    return seconds_to_ready(t0, job_id, ready_times_bare, out_dir, world)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.yaml"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from hpcalign.config.load import load_config
    from hpcalign.models.prepare import ensure_model

    sh(["sinfo", "-h"], timeout=10)  # a controller must answer
    base = tempfile.mkdtemp(prefix="hpcalign-launch-bench-")
    # the model is built once, outside the runs: submit must not pay for init-model
    overrides = [f"model.path={base}/model", "log.progress=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    ensure_model(cfg)
    world = cfg.trainer.ranks + cfg.generator.ranks
    hpcalign_s, bare_s = [], []
    for i in range(args.repeat):
        for kind in (("bare", "hpcalign") if i % 2 else ("hpcalign", "bare")):
            if kind == "hpcalign":
                hpcalign_s.append(run_hpcalign(args.config, overrides, f"{base}/run-{i}", world))
            else:
                bare_s.append(run_bare(cfg, f"{base}/bare-{i}", world))
    h, b = statistics.median(hpcalign_s), statistics.median(bare_s)
    print(json.dumps({
        "bench": "launch_overhead", "hpcalign_submit_to_ready_s": round(h, 3),
        "bare_sbatch_to_ready_s": round(b, 3), "ratio": round(h / b, 3), "target_ratio": 1.5,
        "meets_target": h / b <= 1.5, "repeats": args.repeat,
        "hpcalign_runs_s": [round(x, 3) for x in hpcalign_s],
        "bare_runs_s": [round(x, 3) for x in bare_s],
        "trainers": cfg.trainer.ranks, "generators": cfg.generator.ranks,
        "load_avg_1min": round(os.getloadavg()[0], 2), "host": os.uname().nodename,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
