"""GRPO as a heterogeneous job on the real test cluster: submit, requeue, failure, scripts.

Needs `tools/slurm-test-cluster up` (make test does it); skipped when no controller answers.
Job states are read through submitit with hpcalign's het-aware watcher, as users get them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from local_runs import (
    QUICKSTART,
    TINY,
    assert_same_training,
    metrics,
    shard_checksums,
)
from safetensors.torch import load_file
from slurm_cluster import SLURM_ONLY, poke_scheduler, sh

ROOT = Path(__file__).resolve().parents[2]
STEPS = 48  # enough that a signal sent after a restart lands mid-run
LONG_STEPS = 10**6  # more than any attempt reaches: the time limit ends them


pytestmark = SLURM_ONLY


# ---------------------------------------------------------------- helpers


def hpcalign(*args: str, cwd: Path = ROOT, timeout: float = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hpcalign.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def submit(run_dir: Path, *overrides: str) -> str:
    out = hpcalign("submit", QUICKSTART, f"run_dir={run_dir}", *TINY, *overrides).stdout
    match = re.search(r"submitted job (\d+)", out)
    assert match, out
    _SUBMITTED.append(match.group(1))
    return match.group(1)


def job(run_dir: Path, job_id: str):
    from hpcalign.launch.slurm import HetSlurmJob

    return HetSlurmJob(folder=run_dir / "submitit", job_id=job_id)


def wait_done(run_dir: Path, job_id: str, timeout: float = 600) -> str:
    """Wait through submitit (het-aware watcher) until the job is finished; its state."""
    handle = job(run_dir, job_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.done(force_check=True):
            return handle.state
        poke_scheduler(job_id)
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} not done after {timeout} s: {handle.state}")


def wait_for_step(run_dir: Path, step: int, timeout: float = 400, restart: int = 0) -> None:
    """Until attempt `restart` of the job has logged a step >= `step` (so its ranks are up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(row["step"] >= step and int(row["restart_count"]) == restart
               for row in metrics(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {run_dir} within {timeout} s")


def wait_restart(job_id: str, restarts: int, timeout: float = 180) -> None:
    """Until Slurm runs the job again with SLURM_RESTART_COUNT = restarts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = poke_scheduler(job_id)
        if f"Restarts={restarts}" in out and "JobState=RUNNING" in out:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not restart ({restarts}) within {timeout} s")


def wait_for_file(path: Path, job_id: str, timeout: float, what: str) -> None:
    """Until `path` exists (a marker or outcome record of the job), poking the scheduler."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{what}: no {path.name} within {timeout:.0f} s"
        poke_scheduler(job_id)
        time.sleep(0.5)


def sacct_components(job_id: str) -> dict[str, dict[str, str]]:
    out = sh("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,Partition,State,NodeList")
    return {r[0]: {"partition": r[1], "state": r[2], "nodes": r[3]}
            for r in (line.split("|") for line in out.splitlines() if line)}


def step_line(job_id: str, step_id: str) -> str:
    """What Slurm recorded as the srun command line of a job step."""
    out = sh("sacct", "-n", "-P", "-j", job_id, "-o", "JobID,SubmitLine")
    lines = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    return lines[step_id]


def rank_pids(role: str, run_dir: Path) -> list[int]:
    """The Python processes of one role of a run (not the srun that names them too)."""
    out = subprocess.run(["pgrep", "-f", "--", f"--role {role} {run_dir}"], capture_output=True,
                         text=True, timeout=10)
    pids = []
    for pid in map(int, out.stdout.split()):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("python"):
            pids.append(pid)
    return pids


_SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def _cancel_leftovers():
    """A failing test must not leave its job running on the shared test cluster."""
    before = len(_SUBMITTED)
    yield
    for job_id in _SUBMITTED[before:]:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted TINY run through `hpcalign submit` (shared by several tests)."""
    run_dir = tmp_path_factory.mktemp("slurm") / "reference"
    job_id = submit(run_dir, f"trainer.steps={STEPS}")
    assert wait_done(run_dir, job_id) == "COMPLETED"
    return run_dir, job_id


# ---------------------------------------------------------------- tests
def test_reference_run_is_a_het_job_with_trainer_on_train_and_generator_on_gen(reference):
    run_dir, job_id = reference
    rows = sacct_components(job_id)
    assert rows[f"{job_id}+0"]["partition"] == "train"
    assert rows[f"{job_id}+1"]["partition"] == "gen"
    assert {r["state"] for r in rows.values()} == {"COMPLETED"}
    assert rows[f"{job_id}+0"]["nodes"] != rows[f"{job_id}+1"]["nodes"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "done" and state["step"] == STEPS
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    status = hpcalign("status", str(run_dir), check=False)
    assert f"job {job_id}" in status.stdout and "COMPLETED" in status.stdout, status.stdout


def test_requeue_and_time_limit_signal_resume_bitwise(reference, tmp_path):
    """scontrol requeue at a random step, then the time-limit warning (USR1): same result."""
    ref_dir, _ = reference
    run_dir = tmp_path / "preempted"
    job_id = submit(run_dir, f"trainer.steps={STEPS}")
    # 1) an administrator's / preemption requeue: SIGTERM now, Slurm restarts the job
    wait_for_step(run_dir, random.Random(os.getpid()).randint(2, 4))
    sh("scontrol", "requeue", job_id)
    wait_restart(job_id, 1)
    # 2) the warning `--signal=USR1@N` sends before the time limit (sent now, to the steps):
    #    the roles checkpoint and exit, the job script requeues itself
    # NOTE: a step of the restarted attempt, not just any step >= 7: the first attempt may
    # already have logged step 7, and a USR1 sent before the new ranks install their
    # handlers (or before srun started them) is lost or kills the rank.
    wait_for_step(run_dir, 7, restart=1)
    sh("scancel", "--signal=USR1", job_id)
    wait_restart(job_id, 2)
    assert wait_done(run_dir, job_id) == "COMPLETED"

    outcome = json.loads((run_dir / "logs" / f"slurm-{job_id}.1-outcome.json").read_text())
    assert outcome["action"] == "requeued" and outcome["state"] == "preempted", outcome
    assert json.loads((run_dir / "state.json").read_text())["state"] == "done"
    assert_same_training(run_dir, ref_dir, STEPS)
    assert {int(r["restart_count"]) for r in metrics(run_dir)} == {0, 1, 2}


@pytest.mark.timeout(1200)
def test_real_time_limit_warning_checkpoints_and_requeues(tmp_path):
    """A real --time limit: Slurm's USR1 warning, checkpoint, self-requeue, resume.

    Sized in seconds, not steps (a step count is a different length on every machine): the
    run has far more steps than fit, time 3 min with the warning 60 s before, so Slurm sends
    USR1 60-120 s into the first attempt (it may come up to a minute early). After that one
    warning and one self-requeue, the second attempt is stopped by `hpcalign cancel
    --checkpoint` once it trains: one warning and one requeue by design, ~4 min in all.
    """
    run_dir = tmp_path / "time-limit"
    job_id = submit(run_dir, f"trainer.steps={LONG_STEPS}", "checkpoint.every_steps=500",
                    "slurm.train.time_min=3", "slurm.gen.time_min=3",
                    "slurm.signal_before_end_s=60", "slurm.max_requeues=10")
    first_record = run_dir / "logs" / f"slurm-{job_id}.0-outcome.json"
    wait_for_file(first_record, job_id, 400, "the first attempt never ended")
    first = json.loads(first_record.read_text())
    assert first["action"] == "requeued" and first["state"] == "preempted", first
    reached = first["step"]
    wait_restart(job_id, 1, timeout=300)
    wait_for_step(run_dir, reached + 1, restart=1)
    assert "checkpoint" in hpcalign("cancel", "--checkpoint", str(run_dir)).stdout
    assert wait_done(run_dir, job_id, timeout=300) == "COMPLETED"
    second = json.loads((run_dir / "logs" / f"slurm-{job_id}.1-outcome.json").read_text())
    assert second["action"] == "stopped" and second["state"] == "preempted", second
    rows = metrics(run_dir)
    # each step once: none lost, none redone, across the warning and the requeue
    assert [r["step"] for r in rows] == list(range(len(rows)))
    assert len(rows) == json.loads((run_dir / "state.json").read_text())["step"]
    assert {int(r["restart_count"]) for r in rows} == {0, 1}
    assert "TIMEOUT" not in sh("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State")


def test_max_requeues_bounds_self_requeue(tmp_path):
    """With slurm.max_requeues=0 a time-limit warning checkpoints and ends the job."""
    run_dir = tmp_path / "bounded"
    job_id = submit(run_dir, "trainer.steps=200", "slurm.max_requeues=0")
    wait_for_step(run_dir, 2)
    sh("scancel", "--signal=USR1", job_id)
    assert wait_done(run_dir, job_id, timeout=240) == "COMPLETED"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "preempted"
    outcome = json.loads((run_dir / "logs" / f"slurm-{job_id}.0-outcome.json").read_text())
    assert outcome["action"] == "stopped"
    assert "Restarts=0" in sh("scontrol", "-o", "show", "job", job_id)


def test_killed_generator_fails_the_job_fast_naming_rank_and_component(tmp_path):
    run_dir = tmp_path / "killed"
    job_id = submit(run_dir, "trainer.steps=400")
    wait_for_step(run_dir, 2)
    (generator,) = rank_pids("generator", run_dir)
    os.kill(generator, signal.SIGKILL)
    killed = time.monotonic()
    state = wait_done(run_dir, job_id, timeout=180)
    took = time.monotonic() - killed
    assert state == "FAILED", state
    assert took < 60, f"the job outlived its dead generator by {took:.0f} s"
    assert not rank_pids("trainer", run_dir), "trainer left running"
    expected = "generator 0 (world rank 1) in het component 1 (gen)"
    outcome = json.loads((run_dir / "logs" / f"slurm-{job_id}.0-outcome.json").read_text())
    assert expected in outcome["failure"], outcome
    status = hpcalign("status", str(run_dir), check=False)
    assert expected in status.stdout, status.stdout
    assert "FAILED" in status.stdout, status.stdout


def test_checkpoint_cancel_then_resubmit_resumes(tmp_path):
    """`hpcalign cancel --checkpoint` stops without requeue; submitting again resumes."""
    run_dir = tmp_path / "stopped"
    job_id = submit(run_dir, f"trainer.steps={STEPS}")
    wait_for_step(run_dir, 3)
    out = hpcalign("cancel", "--checkpoint", str(run_dir)).stdout
    assert "checkpoint" in out
    assert wait_done(run_dir, job_id) == "COMPLETED"
    assert json.loads((run_dir / "state.json").read_text())["state"] == "preempted"
    assert not (run_dir / "stop-requested").exists()
    second = submit(run_dir, f"trainer.steps={STEPS}")
    assert second != job_id
    assert wait_done(run_dir, second) == "COMPLETED"
    assert [r["step"] for r in metrics(run_dir)] == list(range(STEPS))


def test_cancel_ends_the_job(tmp_path):
    run_dir = tmp_path / "cancelled"
    job_id = submit(run_dir, "trainer.steps=400")
    wait_for_step(run_dir, 1)
    assert "cancelled" in hpcalign("cancel", str(run_dir)).stdout
    assert wait_done(run_dir, job_id, timeout=120) == "CANCELLED"
    assert "nothing to cancel" in hpcalign("cancel", str(run_dir)).stdout


def test_component_setup_lines_run_in_each_rank_before_python(tmp_path):
    """slurm.train.setup / slurm.gen.setup run on their own component's nodes, per rank.

    (Not $SLURM_JOB_PARTITION: inside a het step every task sees the last component's.)"""
    run_dir = tmp_path / "setup"
    seen = tmp_path / "seen"
    seen.mkdir()
    job_id = submit(run_dir, "trainer.steps=2",
                    f'slurm.train.setup=["echo $SLURM_PROCID $SLURMD_NODENAME '
                    f'>> {seen}/trainer"]',
                    f'slurm.gen.setup=["export FROM_SETUP=gen", '
                    f'"echo $SLURM_PROCID $SLURMD_NODENAME $FROM_SETUP >> {seen}/generator"]')
    assert wait_done(run_dir, job_id) == "COMPLETED"
    rows = sacct_components(job_id)
    trainer_node, generator_node = rows[f"{job_id}+0"]["nodes"], rows[f"{job_id}+1"]["nodes"]
    assert (seen / "trainer").read_text() == f"0 {trainer_node}\n"  # world rank 0
    assert (seen / "generator").read_text() == f"1 {generator_node} gen\n"


def test_hetjob_sbatch_runs_the_same_step_as_submit(reference, tmp_path):
    """sbatch/hetjob.sbatch: same srun line as `hpcalign submit` (as Slurm recorded both)."""
    ref_dir, ref_job = reference
    run_dir = tmp_path / "by-hand"
    env = dict(os.environ, HPCALIGN_PYTHON=sys.executable)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(ROOT / "sbatch" / "hetjob.sbatch"), QUICKSTART,
         f"run_dir={run_dir}", *TINY, f"trainer.steps={STEPS}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert wait_done(run_dir, job_id) == "COMPLETED"
    assert json.loads((run_dir / "state.json").read_text())["state"] == "done"
    rows = sacct_components(job_id)
    assert rows[f"{job_id}+0"]["partition"] == "train"
    assert rows[f"{job_id}+1"]["partition"] == "gen"
    by_hand = step_line(job_id, f"{job_id}+0.0").replace(str(run_dir), "RUN").replace(job_id, "J")
    submitted = step_line(ref_job, f"{ref_job}+0.0").replace(str(ref_dir), "RUN").replace(
        ref_job, "J")
    assert by_hand == submitted
    # same config, same launcher shape: the same training, bit for bit
    assert shard_checksums(run_dir) == shard_checksums(ref_dir)


def test_colocated_sbatch_runs_in_one_component(tmp_path):
    run_dir = tmp_path / "colocated"
    env = dict(os.environ, HPCALIGN_PYTHON=sys.executable)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(ROOT / "sbatch" / "colocated.sbatch"), QUICKSTART,
         f"run_dir={run_dir}", *TINY, "trainer.steps=4"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert wait_done(run_dir, job_id) == "COMPLETED"
    assert json.loads((run_dir / "state.json").read_text())["state"] == "done"
    assert list(sacct_components(job_id)) == [job_id]


@pytest.mark.timeout(2400)
def test_submit_quickstart_unchanged_learns(tmp_path):
    """`hpcalign submit configs/quickstart.yaml` as is (RUN_DIR relative to the cwd)."""
    out = hpcalign("submit", QUICKSTART, cwd=tmp_path).stdout
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    run_dir = tmp_path / "runs" / "quickstart"
    assert f"run dir: {run_dir}" in out
    assert wait_done(run_dir, job_id, timeout=2100) == "COMPLETED"
    rows = sacct_components(job_id)
    assert rows[f"{job_id}+0"]["partition"] == "train"
    assert rows[f"{job_id}+1"]["partition"] == "gen"
    rows = metrics(run_dir)
    steps = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["trainer"]["steps"]
    assert len(rows) == steps
    first = sum(r["reward_mean"] for r in rows[:25]) / 25
    last = sum(r["reward_mean"] for r in rows[-25:]) / 25
    assert last > first + 0.2, (first, last)


def test_rollout_array_sbatch_runs_every_slice(reference, tmp_path):
    """sbatch/rollout-array.sbatch: one array task per prompt slice, all complete."""
    help_text = hpcalign("rollout", "--help", check=False)
    if help_text.returncode != 0 or "--shard-index" not in help_text.stdout:
        pytest.skip("`hpcalign rollout` with --shard-index/--num-shards is not there yet "
                    "(the interface sbatch/rollout-array.sbatch calls)")
    ref_dir, _ = reference
    prompts = tmp_path / "prompts.jsonl"
    words = ["abc", "hello", "slurm", "gpu", "array", "tasks", "mpi", "shard"]
    prompts.write_text("".join(json.dumps({"prompt": f"{w}=", "answer": w[::-1]}) + "\n"
                               for w in words))
    out = tmp_path / "rollouts"
    env = dict(os.environ, HPCALIGN_PYTHON=sys.executable)
    proc = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", str(ROOT / "sbatch" / "rollout-array.sbatch"),
         str(ref_dir / "checkpoints" / f"step-{STEPS:06d}"), str(prompts), str(out)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    array_id = proc.stdout.strip()
    _SUBMITTED.append(array_id)
    deadline = time.monotonic() + 600
    while sh("squeue", "-h", "-j", array_id).strip():
        assert time.monotonic() < deadline, "rollout array still running"
        time.sleep(1)
    # NOTE: slurmdbd records array tasks a moment after squeue forgets them (seen: only
    # "ID|COMPLETED" for task 0 at first, "ID_0"/"ID_1" a little later): poll, bounded.
    deadline = time.monotonic() + 60
    while True:
        rows = sh("sacct", "-X", "-n", "-P", "-j", array_id, "-o", "JobID,State").split()
        done = len(rows) == 2 and all(r.endswith("|COMPLETED") for r in rows)
        if done or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done, rows
    assert sorted(p.name for p in out.glob("rollout-summary-*.json")) == [
        "rollout-summary-0000.json", "rollout-summary-0001.json"]
    # the last task to end assembled the manifest; it verifies, and the two slices hold
    # exactly the samples one local process draws (per-sample seeds)
    assert hpcalign("inspect", str(out), check=False).returncode == 0
    local = tmp_path / "local"
    hpcalign("rollout", "--checkpoint", str(ref_dir / "checkpoints" / f"step-{STEPS:06d}"),
             "--prompts", str(prompts), "--out", str(local))

    def samples(directory):
        from hpcalign.data.manifest import read_manifest
        from hpcalign.data.shards import read_shard

        manifest = read_manifest(str(directory))
        found = {}
        for shard in manifest["shards"]:
            batch = read_shard(str(directory / shard["file"]))
            for i in range(len(batch)):
                found[int(batch.seeds[i])] = (batch.completion_tokens[i].tobytes(),
                                              batch.logprobs[i].tobytes())
        return manifest["parts"], found

    parts, from_array = samples(out)
    assert parts == 2 and from_array == samples(local)[1] and len(from_array) == 8 * 8


def test_online_dpo_and_a_grpo_variant_run_as_het_jobs(tmp_path):
    """The other flows on the test cluster: OnlineDPO, and GRPO with DAPO's options
    (clip-higher, dynamic sampling) and RLOO, each a het job that completes with its own
    metrics (trainer on `train`, generator on `gen`)."""
    runs = {"online_dpo": ["algorithm=online_dpo"],
            "dapo_rloo": ["trainer.advantage_estimator=rloo", "trainer.clip_eps_high=0.28",
                          "trainer.dynamic_sampling=true"]}
    jobs = {name: submit(tmp_path / name, "trainer.steps=6", *extra)
            for name, extra in runs.items()}
    for name, job_id in jobs.items():
        assert wait_done(tmp_path / name, job_id) == "COMPLETED", name
        rows = metrics(tmp_path / name)
        assert [r["step"] for r in rows] == list(range(6)), name
        assert sacct_components(job_id)[f"{job_id}+1"]["partition"] == "gen"
    assert all("pairs" in r and "rewards_chosen" in r for r in metrics(tmp_path / "online_dpo")
               if r["pairs"])
    assert all("groups_dropped" in r for r in metrics(tmp_path / "dapo_rloo"))


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                    reason="megatron-core is not installed (make test installs it)")
def test_megatron_trainer_runs_as_a_het_job(tmp_path):
    """configs/grpo-megatron-tiny.yaml through `hpcalign submit`: a TP=2 megatron-core
    trainer (two tasks of component 0, on `train`) and a torch generator (on `gen`)."""
    run_dir = tmp_path / "megatron"
    out = hpcalign("submit", str(ROOT / "configs" / "grpo-megatron-tiny.yaml"),
                   f"run_dir={run_dir}", *TINY, "trainer.steps=6").stdout
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    _SUBMITTED.append(job_id)
    assert "2 trainer rank(s) on partition 'train'" in out, out
    assert wait_done(run_dir, job_id) == "COMPLETED"
    rows = sacct_components(job_id)
    assert rows[f"{job_id}+0"]["partition"] == "train"
    assert rows[f"{job_id}+1"]["partition"] == "gen"
    assert [r["step"] for r in metrics(run_dir)] == list(range(6))
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "done" and state["step"] == 6


PPO_FOUR = ["algorithm=ppo", "trainer.steps=8", "checkpoint.every_steps=2",
            "models.reference.placement=exclusive", "models.reward.placement=exclusive",
            "models.reward.init=null", "slurm.models.reward.partition=train",
            # 4 components on the 2 test nodes: each asks for 1 GB, not a whole node's memory
            "slurm.train.mem_gb=1", "slurm.gen.mem_gb=1", "slurm.models.reward.mem_gb=1"]


def test_ppo_four_models_in_four_components_resume_bitwise_after_requeue(tmp_path):
    """PPO with the reference and the reward model on ranks of their own: two more het
    components (the reference's on `gen` by default, the reward model's on `train` as the
    config says), one MPMD step of 4 ranks. A run requeued mid-run (`scontrol requeue`)
    ends with the uninterrupted run's policy, critic and rollouts, bit for bit."""
    whole, preempted = tmp_path / "whole", tmp_path / "preempted"
    reward = [f"models.reward.path={whole / 'base-model'}"]  # built by the first submit
    assert wait_done(whole, submit(whole, *PPO_FOUR, *reward)) == "COMPLETED"
    job_id = submit(preempted, *PPO_FOUR, *reward)  # after it: the 4 nodes are one job's
    wait_for_step(preempted, random.Random(os.getpid()).randint(2, 4))
    sh("scontrol", "requeue", job_id)
    wait_restart(job_id, 1)
    assert wait_done(preempted, job_id) == "COMPLETED"

    rows = sacct_components(job_id)
    assert [rows[f"{job_id}+{i}"]["partition"] for i in range(4)] == \
        ["train", "gen", "gen", "train"]
    models = json.loads((preempted / "plan.json").read_text())["model_map"]
    assert models["reward"]["runs_on"][0]["world_ranks"] == [3]
    record = json.loads((preempted / "slurm.json").read_text())
    assert [c["role"] for c in record["components"]] == \
        ["trainer", "generator", "reference", "reward"]
    assert_same_training(preempted, whole, 8)
    critic = "checkpoints/step-000008/models/value/model/model.safetensors"
    a, b = (load_file(str(d / critic)) for d in (whole, preempted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {int(r["restart_count"]) for r in metrics(preempted)} == {0, 1}
    assert any(r["score_mean"] != 0 for r in metrics(whole))


# ------------------------------------------------ boundaries and ownership (last: they
# requeue the reference job, whose first attempt other tests read through sacct)
def test_preempted_after_its_final_checkpoint_completes_on_requeue(reference, tmp_path):
    """A requeue in the run's last seconds (final checkpoint written, state.json not yet
    "done"): the requeued attempt finds the final checkpoint and completes, starting no
    step. Meanwhile a second `hpcalign submit` of the live RUN_DIR is refused."""
    ref_dir, _ = reference
    run_dir = tmp_path / "last-seconds"
    env = dict(os.environ, HPCALIGN_FAULTS="before-done:pause")  # sbatch exports it
    proc = subprocess.run([sys.executable, "-m", "hpcalign.cli", "submit", QUICKSTART,
                           f"run_dir={run_dir}", *TINY, f"trainer.steps={STEPS}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    _SUBMITTED.append(job_id)
    paused = run_dir / "faults" / f"before-done@{STEPS}.paused"
    wait_for_file(paused, job_id, 400, "the run never reached its final checkpoint")
    second = hpcalign("submit", QUICKSTART, f"run_dir={run_dir}", *TINY,
                      f"trainer.steps={STEPS}", check=False)
    assert second.returncode != 0 and f"Slurm job {job_id}" in second.stderr, second.stderr
    assert "submitted job" not in second.stdout
    sh("scontrol", "requeue", job_id)
    assert wait_done(run_dir, job_id) == "COMPLETED"
    outcome = json.loads((run_dir / "logs" / f"slurm-{job_id}.1-outcome.json").read_text())
    assert outcome["action"] == "done" and outcome["state"] == "done", outcome
    assert json.loads((run_dir / "state.json").read_text())["state"] == "done"
    assert_same_training(run_dir, ref_dir, STEPS)
    assert {int(r["restart_count"]) for r in metrics(run_dir)} == {0}  # requeue trained nothing
    assert not (run_dir / "owner.json").exists()  # the job is over: RUN_DIR is free


def test_finished_run_submitted_again_or_requeued_says_done(tmp_path):
    # NOTE: its own short run, requeued right after it ends: slurmctld forgets a finished
    # job after MinJobAge (300 s by default), and then `scontrol requeue` says "Invalid job id".
    run_dir, steps = tmp_path / "finished", 2
    job_id = submit(run_dir, f"trainer.steps={steps}")
    assert wait_done(run_dir, job_id) == "COMPLETED"
    before = (run_dir / "metrics.jsonl").read_text()
    again = hpcalign("submit", QUICKSTART, f"run_dir={run_dir}", *TINY, f"trainer.steps={steps}")
    assert "submitted job" not in again.stdout
    assert f"run already finished at step {steps}" in again.stderr, again.stderr
    assert str(run_dir / "checkpoints" / f"step-{steps:06d}") in again.stderr
    # a requeue of the finished job (an operator's, or preemption racing the end)
    sh("scontrol", "requeue", job_id)
    record = run_dir / "logs" / f"slurm-{job_id}.1-outcome.json"
    # a requeued job waits for its BeginTime first
    wait_for_file(record, job_id, 300, "the requeued finished job never ran")
    assert wait_done(run_dir, job_id) == "COMPLETED"
    outcome = json.loads(record.read_text())
    assert outcome["action"] == "done", outcome
    assert (run_dir / "metrics.jsonl").read_text() == before
    status = hpcalign("status", str(run_dir), check=False)
    assert "state:      done" in status.stdout, status.stdout
