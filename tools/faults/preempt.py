"""Fault injection: `kill -9` of any rank of any role at a random step of a real local run,
resume, and compare with an uninterrupted run; prints ONE JSON line of outcomes.

    python tools/faults/preempt.py 20                    # the figure (~20-30 min on 2 cores)
    python tools/faults/preempt.py 2 --layouts 2x2       # the integration test's sample

Every run is a real `hpcalign run` (MPMD mpiexec) with the TINY overrides of
tests/integration/local_runs.py. Per trial a seeded RNG picks a layout (`TxG`: trainer.ranks
x generator.ranks, with `sync.max_staleness` 0 or 1), the role (balanced over the trials:
trainer / generator), the rank of that role, a step, a delay inside that step, and one or
two kills. For each kill: wait until metrics.jsonl shows the step (of this attempt), wait
the delay, SIGKILL that rank's process from outside (as a node failure or the OOM killer
does), and time the launcher's exit (the verdict). The launcher must exit non-zero within
`--verdict-bound-s`, with a `hpcalign: run failed: ...` line naming the killed rank
("generator 1 (world rank 3)"), leaving no rank process behind. Then `hpcalign run` again on
the same RUN_DIR (the next kill, or to the end).

The reference is ONE uninterrupted run per layout. "Resumed bitwise" means: every model and
optimizer tensor of the final checkpoint is bitwise equal, metrics.jsonl holds every step
exactly once with the reference's rewards, and every rollout shard has the reference's
checksum (none lost, duplicated or sampled differently).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import torch  # noqa: E402
from local_runs import (  # noqa: E402
    QUICKSTART,
    TINY,
    checkpoint_tensors,
    hpcalign_argv,
    metrics,
    role_pids,
    shard_checksums,
)

LAYOUTS = ("1x1", "2x1", "1x2", "2x2")
RUN_TIMEOUT_S = 600.0


def overrides(layout: str, staleness: int, run_dir: str, steps: int) -> list[str]:
    trainers, generators = layout.split("x")
    return [f"run_dir={run_dir}", *TINY, f"trainer.steps={steps}",
            f"trainer.ranks={trainers}", f"generator.ranks={generators}",
            f"sync.max_staleness={staleness}"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(hpcalign_argv("run", QUICKSTART, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT)


def run_to_end(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run(hpcalign_argv("run", QUICKSTART, *args), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, cwd=ROOT)
    return proc.returncode, proc.stderr


def world_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            env = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    value = env.get(b"OMPI_COMM_WORLD_RANK")
    return int(value) if value is not None else None


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, since: float,
                  timeout: float = 300) -> bool:
    """Until metrics.jsonl (rewritten after `since`) shows `step`; False if the run ended."""
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = os.path.exists(path) and os.path.getmtime(path) > since
        if fresh and any(row["step"] >= step for row in metrics(run_dir)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def rank_pid(run_dir: str, role: str, rank: int) -> int | None:
    """PID of world rank `rank` of the run (its rank process, not mpiexec)."""
    for pid in role_pids(run_dir, role):
        if world_rank(pid) == rank:
            return pid
    return None


def kill_once(run_dir: str, args: list[str], role: str, local_rank: int, step: int,
              delay_s: float, bound_s: float) -> dict:
    """One attempt of the run, killed: rank `local_rank` of `role` once step `step` is logged."""
    since = time.time()
    proc = start(args)
    out: dict = {"step": step, "delay_s": round(delay_s, 3), "killed": False}
    try:
        if not wait_for_step(run_dir, step, proc, since):
            out["problem"] = "run ended before the step"
            return out
        time.sleep(delay_s)
        plan = json.load(open(os.path.join(run_dir, "plan.json")))
        rank = plan[role]["first_rank"] + local_rank
        out["world_rank"] = rank
        pid = rank_pid(run_dir, role, rank)
        if pid is None or proc.poll() is not None:
            out["problem"] = "rank process not found (run ended?)"
            return out
        out["logged_step_at_kill"] = max(row["step"] for row in metrics(run_dir))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        out["killed"] = True
        try:
            _, err = proc.communicate(timeout=bound_s + 60)
        except subprocess.TimeoutExpired:
            out["problem"] = "hang: the launcher outlived the bound + 60 s"
            return out
        out["verdict_s"] = round(time.monotonic() - killed, 2)
        out["returncode"] = proc.returncode
        lines = [line for line in err.splitlines() if line.startswith("hpcalign: run failed")]
        out["error"] = lines[-1] if lines else (err.strip().splitlines() or [""])[-1]
        out["traceback"] = "Traceback" in err
        expected = f"{role} {local_rank} (world rank {rank})"
        out["named"] = expected in out["error"]
        out["leftover_ranks"] = len(role_pids(run_dir, "trainer") + role_pids(run_dir, "generator"))
        return out
    finally:
        if proc.poll() is None:  # never leave a run behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def compare(got: str, want: str, steps: int) -> str | None:
    """None when the runs trained the same, bitwise; else what differs."""
    try:
        a, b = checkpoint_tensors(want, steps), checkpoint_tensors(got, steps)
    except OSError as err:
        return f"final checkpoint missing: {err}"
    if a.keys() != b.keys():
        return "different tensor names"
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    if unequal:
        return f"tensors differ: {unequal[:3]}"
    rows = metrics(got)
    if [r["step"] for r in rows] != list(range(steps)):
        return f"metrics steps {[r['step'] for r in rows]}"
    if [r["reward_mean"] for r in rows] != [r["reward_mean"] for r in metrics(want)]:
        return "metrics rewards differ"
    mine, theirs = shard_checksums(got), shard_checksums(want)
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return f"shards differ: {diff[:3]}"
    return None


def plan_trials(trials: int, seed: int, layouts: list[str], steps: int) -> list[dict]:
    rng = random.Random(seed)
    roles = ["trainer", "generator"] * (trials // 2 + 1)
    roles = roles[:trials]
    rng.shuffle(roles)
    plan = []
    for index, role in enumerate(roles):
        layout = rng.choice(layouts)
        ranks = int(layout.split("x")[0 if role == "trainer" else 1])
        kills = rng.choice([1, 1, 2])
        kill_steps = sorted(rng.sample(range(1, steps - 1), kills))
        plan.append({"trial": index, "layout": layout, "staleness": rng.choice([0, 1]),
                     "role": role, "rank": rng.randrange(ranks),
                     "kills": [{"step": s, "delay_s": rng.uniform(0.0, 0.5)} for s in kill_steps]})
    return plan


def run_trial(trial: dict, work: str, reference: str, steps: int, bound_s: float) -> dict:
    run_dir = os.path.join(work, f"trial-{trial['trial']:03d}")
    args = overrides(trial["layout"], trial["staleness"], run_dir, steps)
    began = time.monotonic()
    kills = []
    reached = -1
    for kill in trial["kills"]:
        step = max(kill["step"], reached + 1)  # a step this attempt runs, not one kept from before
        if step >= steps - 1:
            break
        kills.append(kill_once(run_dir, args, trial["role"], trial["rank"], step,
                               kill["delay_s"], bound_s))
        reached = kills[-1].get("logged_step_at_kill", step)
    rc, err = run_to_end(args)
    difference = compare(run_dir, reference, steps) if rc == 0 else f"resume exited {rc}: " + (
        err.strip().splitlines() or [""])[-1]
    good_kills = [k for k in kills if k["killed"]]
    row = {
        "trial": trial["trial"], "layout": trial["layout"], "staleness": trial["staleness"],
        "role": trial["role"], "rank": trial["rank"],
        "world_rank": good_kills[0].get("world_rank") if good_kills else None,
        "steps": [k["step"] for k in kills], "kills": len(good_kills),
        "error": [k.get("error") for k in good_kills],
        "verdict_s": [k.get("verdict_s") for k in good_kills],
        "named": all(k.get("named") for k in good_kills) and bool(good_kills),
        "failed_fast": all(k.get("returncode") not in (0, None) and k.get("verdict_s", 1e9)
                           <= bound_s for k in good_kills) and bool(good_kills),
        "tracebacks": sum(bool(k.get("traceback")) for k in good_kills),
        "leftover_ranks": sum(k.get("leftover_ranks", 0) for k in good_kills),
        "bitwise": difference is None, "difference": difference,
        "problems": [k["problem"] for k in kills if "problem" in k],
        "trial_s": round(time.monotonic() - began, 1),
    }
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trials", type=int, nargs="?", default=20,
                        help="number of trials (default 20, the figure)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10, help="trainer.steps of every run")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help=f"TRAINERSxGENERATORS layouts to draw from (default {','.join(LAYOUTS)})")
    parser.add_argument("--verdict-bound-s", type=float, default=30.0,
                        help="a kill must end the launcher within this (default 30 s)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    began = time.perf_counter()
    plan = plan_trials(args.trials, args.seed, args.layouts.split(","), args.steps)
    work = tempfile.mkdtemp(prefix="hpcalign-preempt-", dir=args.dir)
    results, references = [], {}
    try:
        for trial in plan:
            key = (trial["layout"], trial["staleness"])
            if key not in references:
                ref = os.path.join(work, f"reference-{key[0]}-s{key[1]}")
                rc, err = run_to_end(overrides(key[0], key[1], ref, args.steps))
                if rc != 0:
                    raise SystemExit(f"reference run {key} failed: {err[-2000:]}")
                references[key] = ref
            results.append(run_trial(trial, work, references[key], args.steps,
                                     args.verdict_bound_s))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress, per trial
    finally:
        shutil.rmtree(work, ignore_errors=True)
    verdicts = [v for r in results for v in r["verdict_s"] if v is not None]
    print(json.dumps({
        "trials": len(results),
        "kills": sum(r["kills"] for r in results),
        "bitwise": sum(r["bitwise"] for r in results),
        "named": sum(r["named"] for r in results),
        "failed_fast": sum(r["failed_fast"] for r in results),
        "tracebacks": sum(r["tracebacks"] for r in results),
        "leftover_ranks": sum(r["leftover_ranks"] for r in results),
        "max_verdict_s": max(verdicts, default=None),
        "verdict_bound_s": args.verdict_bound_s,
        "rows": [{k: r[k] for k in ("layout", "staleness", "role", "rank", "world_rank", "steps",
                                    "error", "verdict_s", "bitwise")} for r in results],
        "problems": [(r["trial"], r["problems"], r["difference"]) for r in results
                     if r["problems"] or r["difference"]],
        "seed": args.seed, "steps": args.steps,
        "wall_s": round(time.perf_counter() - began, 1),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load1": round(os.getloadavg()[0], 2)},
    }))


if __name__ == "__main__":
    main()
