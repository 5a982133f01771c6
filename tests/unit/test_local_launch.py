"""The local MPMD mpiexec line and the failure explanation are pure functions."""

import json
import os
import tempfile

from hpcalign.config.load import load_config
from hpcalign.launch.local import explain_failure, mpiexec_command

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")


def test_mpmd_line_has_trainers_then_generators():
    cfg = load_config(QUICKSTART, ["trainer.ranks=2", "generator.ranks=4",
                                   "launcher.mpiexec_args=[--mca,btl,tcp]"])
    argv = mpiexec_command(cfg, "/r u n", "/py", "/bin/mpiexec", as_root=True)
    sep = argv.index(":")
    head, tail = argv[:sep], argv[sep + 1:]
    assert head[:5] == ["/bin/mpiexec", "--oversubscribe", "--bind-to", "none", "--allow-run-as-root"]
    assert head[5:8] == ["--mca", "btl", "tcp"]
    assert head[8:] == ["-n", "2", "/py", "-m", "hpcalign.roles.main", "--role", "trainer", "/r u n"]
    assert tail == ["-n", "4", "/py", "-m", "hpcalign.roles.main", "--role", "generator", "/r u n"]


def test_failure_prefers_the_rank_error_record(tmp_path):
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "rank-1.json").write_text(json.dumps(
        {"rank": 1, "role": "generator 0 (world rank 1)", "host": "n1", "error": "boom", "time": 1}))
    assert explain_failure(str(tmp_path), "", 1) == "generator 0 (world rank 1) on n1 failed: boom"


def test_failure_from_mpiexec_words(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"trainer": {"ranks": 1}}))
    tail = ("prterun noticed that process rank 1 with PID 4242 on node x exited on signal 9 "
            "(Killed).\n")
    assert explain_failure(str(tmp_path), tail, 137) == (
        "generator 0 (world rank 1) died: exited on signal 9 (Killed).")


def test_a_rank_killed_by_a_signal_wins_over_its_peers_secondary_errors(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"trainer": {"ranks": 1}}))
    (tmp_path / "errors").mkdir()
    (tmp_path / "errors" / "rank-0.json").write_text(json.dumps(
        {"rank": 0, "role": "trainer 0 (world rank 0)", "host": "n0",
         "error": "RuntimeError: Connection reset by peer", "time": 1}))
    tail = "prterun noticed that process rank 1 with PID 7 on node x exited on\nsignal 9 (Killed).\n"
    assert explain_failure(str(tmp_path), tail, 137).startswith("generator 0 (world rank 1) died")


def test_the_launchers_import_no_model_code():
    """The launchers (local mpiexec, Slurm, submit and run) touch no torch model: model
    preparation runs in a child (hpcalign.models.prepare) or a role, so `hpcalign submit`
    and the Slurm job's helpers start fast on a login node without torch's import cost."""
    import subprocess
    import sys

    modules = ("hpcalign.launch.local", "hpcalign.launch.slurm", "hpcalign.launch.slurm_job",
               "hpcalign.launch.sbatch_text", "hpcalign.launch.claim",
               "hpcalign.commands.submit", "hpcalign.commands.run")
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "print(sorted({k.split('.')[0] if not k.startswith('hpcalign.') else "
            "'.'.join(k.split('.')[:2]) for k in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120).stdout
    for forbidden in ("'torch'", "'transformers'", "'hpcalign.models'", "'hpcalign.engines'"):
        assert forbidden not in loaded, forbidden


def test_each_mpiexec_gets_a_fresh_private_session_base():
    """A killed mpiexec leaves <base>/ompi.<pid> behind; a later one with the same pid under
    the same base fails at start (seen in CI). Every launch gets a base of its own."""
    import stat

    from hpcalign.launch.local import fresh_session_base, run_mpiexec

    env: dict[str, str] = {}
    first, second = fresh_session_base(env), fresh_session_base(env)
    try:
        assert first != second and env["PRTE_MCA_prte_tmpdir_base"] == second
        assert stat.S_IMODE(os.stat(first).st_mode) == 0o700 and not os.listdir(first)
    finally:
        os.rmdir(first)
        os.rmdir(second)
    seen = run_mpiexec(["sh", "-c", 'echo "$PRTE_MCA_prte_tmpdir_base"'],
                       capture_output=True, text=True, timeout=30).stdout.strip()
    assert seen.startswith(os.path.join(tempfile.gettempdir(), "hpcalign-mpi-"))
    assert not os.path.exists(seen)  # removed once the command ended
