"""The test cluster itself, and sbatch text with weird values on a real Slurm.

Needs `tools/slurm-test-cluster up` (make test does it); skipped when no controller answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from slurm_cluster import SLURM_ONLY, sh, wait_gone

ROOT = Path(__file__).resolve().parents[2]


pytestmark = SLURM_ONLY


def sacct_rows(job_id: str) -> dict[str, dict[str, str]]:
    """sacct rows of a finished het job (slurmdbd records the end a moment after squeue)."""
    deadline = time.monotonic() + 30
    while True:
        out = sh("sacct", "-n", "-P", "-j", job_id, "-o", "JobID,Partition,State,NodeList,ExitCode")
        rows = {r[0]: dict(zip(("partition", "state", "nodes", "exit"), r[1:]))
                for r in (line.split("|") for line in out.splitlines() if line)}
        done = [r for k, r in rows.items() if "." not in k and r["state"] == "COMPLETED"]
        if len(done) == 2 or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_cluster_has_train_and_gen_on_four_nodes() -> None:
    out = sh("sinfo", "-h", "-o", "%P %D %N")
    parts = {line.split()[0].rstrip("*"): line.split() for line in out.splitlines()}
    assert {"train", "gen"} <= set(parts)
    assert parts["gen"][1] == "4" and parts["train"][1] == "4"


def test_status_script_reports_running_daemons() -> None:
    out = sh(str(ROOT / "tools" / "slurm-test-cluster"), "status")
    for daemon in ("munged", "mariadb", "slurmdbd", "slurmctld", "slurmd-vm1", "slurmd-vm2",
                   "slurmd-vm3", "slurmd-vm4"):
        assert daemon in out


def test_plain_het_job_spans_both_partitions_in_one_mpi_world(tmp_path: Path) -> None:
    """A hand-written het job: one MPMD PMIx step = one MPI world; sacct has both components."""
    hello = tmp_path / "hello.py"
    hello.write_text("from mpi4py import MPI\nc = MPI.COMM_WORLD\nc.Barrier()\n"
                     "print(c.Get_rank(), c.Get_size(), flush=True)\n")
    script = tmp_path / "het.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --output={tmp_path}/out-%j.txt\n"
        "#SBATCH --partition=train --ntasks=2 --nodes=1\n"
        "#SBATCH hetjob\n"
        "#SBATCH --partition=gen --ntasks=1 --nodes=1\n"
        f"srun --mpi=pmix {sys.executable} {hello} : {sys.executable} {hello}\n")
    job_id = sh("sbatch", "--parsable", str(script)).strip()
    wait_gone(job_id, timeout=180)
    lines = sorted((tmp_path / f"out-{job_id}.txt").read_text().split("\n"))
    assert [line for line in lines if line] == ["0 3", "1 3", "2 3"]
    rows = sacct_rows(job_id)
    assert rows[f"{job_id}+0"]["partition"] == "train"
    assert rows[f"{job_id}+1"]["partition"] == "gen"
    assert rows[f"{job_id}+0"]["nodes"] != rows[f"{job_id}+1"]["nodes"]
    assert all(r["state"] == "COMPLETED" for k, r in rows.items() if "." not in k)


def test_weird_values_survive_real_sbatch(weird_tmp_path: Path, tmp_path: Path) -> None:
    """The generated script with a weird RUN_DIR, job name and env runs on real Slurm.

    The ranks are `/bin/true` (python is replaced), so only the text, the paths and the
    quoting are exercised: logs must land in the weird RUN_DIR, nothing may execute.
    """
    from hpcalign.config.load import config_from_dict, load_config
    from hpcalign.launch.sbatch_text import hetjob_sbatch_text

    run_dir = str(weird_tmp_path / "run")
    data = load_config(str(ROOT / "configs" / "quickstart.yaml")).model_dump(mode="json")
    data["run_dir"] = run_dir
    data["slurm"]["job_name"] = "job's \"name\" $(touch PWNED)"
    data["slurm"]["env"] = {"NCCL_WEIRD": "$(touch PWNED) `touch PWNED` 'q' \"d\""}
    data["slurm"]["train"]["sbatch_args"] = {"comment": "a b $(touch PWNED)"}
    cfg = config_from_dict(data)
    script = tmp_path / "weird.sbatch"
    script.write_text(hetjob_sbatch_text(cfg, run_dir, "/bin/true"))
    os.makedirs(os.path.join(run_dir, "submitit"), mode=0o700)
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    wait_gone(job_id, timeout=120)
    show = sh("scontrol", "show", "job", job_id)  # sacct stores no comment by default
    assert "Comment=a b $(touch PWNED)" in show and "JobState=COMPLETED" in show, show
    assert "JobName=job's \"name\" $(touch PWNED)" in show, show
    assert os.path.exists(os.path.join(run_dir, "submitit", f"{job_id}_0_log.out"))
    logs = os.listdir(os.path.join(run_dir, "logs"))
    assert f"slurm-{job_id}.0-srun.err" in logs, logs
    for where in (tmp_path, weird_tmp_path, Path(run_dir), ROOT):
        assert not (where / "PWNED").exists(), f"a config value was executed (in {where})"


def test_step_watcher_stops_a_process_that_outlives_its_step(tmp_path: Path) -> None:
    """watch-step on real Slurm: it sees the het step run (both components' step ids from a
    real squeue), sees it end, and after the grace stops the process standing in for an
    srun that hangs on; without it this job would sleep until its time limit."""
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    script = tmp_path / "watch.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --output={tmp_path}/out-%j.txt\n"
        "#SBATCH --partition=train --ntasks=1 --time=5\n"
        "#SBATCH hetjob\n"
        "#SBATCH --partition=gen --ntasks=1 --time=5\n"
        "srun sleep 6 : sleep 6 &\n"
        "sleep 600 &\n"
        "lingering=$!\n"
        f"{sys.executable} -m hpcalign.launch.slurm_job watch-step --pid $lingering "
        f"--poll-s 1 --grace-s 3 {run_dir}\n"
        "wait $lingering\n"
        f"echo \"rc=$?\" > {tmp_path}/rc\n")
    start = time.monotonic()
    job_id = sh("sbatch", "--parsable", str(script)).strip()
    wait_gone(job_id, timeout=120)
    assert time.monotonic() - start < 60
    assert (tmp_path / "rc").read_text().strip() == "rc=143"  # SIGTERM from the watcher
    record = json.loads((run_dir / "logs" / f"slurm-{job_id}.0-srun-stopped.json").read_text())
    assert record["lingered_s"] >= 3
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert "still running" in out and "after its job step ended" in out, out
