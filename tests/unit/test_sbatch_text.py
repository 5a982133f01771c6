"""The het-job sbatch text: golden files, weird values through a real bash, submitit's view.

Golden files live in tests/unit/golden/. After an intended change of the generated text:
    HPCALIGN_UPDATE_GOLDEN=1 pytest tests/unit/test_sbatch_text.py
and review the diff of the golden files like code.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hpcalign.config.load import config_from_dict, load_config
from hpcalign.config.schema import Config
from hpcalign.errors import ConfigError
from hpcalign.launch.sbatch_text import JOB_STEP, check_slurm_config, hetjob_sbatch_text, job_body

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
PYTHON = "/opt/hpcalign/venv/bin/python"
WEIRD_RUN_DIR = "/shared/we ird/quo'te\"d $(touch PWNED) `touch PWNED`/semi;colon&amp"
WEIRD_VALUE = "$(touch PWNED) `touch PWNED` 'single' \"double\" ; & | \\ * ?"


def assert_golden(name: str, text: str) -> None:
    """Compare with tests/unit/golden/NAME; HPCALIGN_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("HPCALIGN_UPDATE_GOLDEN") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if os.environ.get("HPCALIGN_UPDATE_GOLDEN") != "1":
            pytest.fail(f"{path} did not exist and was written: review it and commit it")
        return
    expected = path.read_text()
    if text != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), text.splitlines(),
                                              f"golden/{name}", "generated", lineterm=""))
        pytest.fail(f"generated text differs from golden/{name} (if intended, rerun with "
                    f"HPCALIGN_UPDATE_GOLDEN=1 and review):\n{diff}")


def quickstart(**changes: object) -> Config:
    data = load_config(str(REPO / "configs" / "quickstart.yaml")).model_dump(mode="json")
    data["run_dir"] = "/shared/runs/quickstart"
    data["model"]["path"] = "/shared/runs/quickstart/base-model"
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return config_from_dict(data)


def weird_config(run_dir: str) -> Config:
    return quickstart(
        run_dir=run_dir,
        slurm__job_name="my job's \"name\"",
        slurm__env={"NCCL_WEIRD": WEIRD_VALUE, "NCCL_DEBUG": "INFO"},
        slurm__train__account="acc'ount $(touch PWNED)",
        slurm__train__sbatch_args={"comment": WEIRD_VALUE},
        slurm__train__srun_args=["--container-image=/img dir/it's $(touch PWNED).sqsh"],
        slurm__gen__constraint="a100&`touch PWNED`",
        slurm__gen__srun_args=["--export=ALL", WEIRD_VALUE],
        slurm__gen__setup=[f"export SETUP_SAW={shlex.quote(WEIRD_VALUE)}", "cd /"],
    )


# ---------------------------------------------------------------- golden files
def test_quickstart_golden() -> None:
    cfg = quickstart()
    assert_golden("hetjob-quickstart.sbatch", hetjob_sbatch_text(cfg, cfg.run_dir, PYTHON))


def test_grpo_7b_golden() -> None:
    cfg = load_config(str(REPO / "configs" / "grpo-7b.yaml"))
    assert_golden("hetjob-grpo-7b.sbatch", hetjob_sbatch_text(cfg, cfg.run_dir, cfg.slurm.python))


def test_four_model_ppo_golden() -> None:
    """PPO with the reference and the reward model on ranks of their own: two further
    components (the reward model's on a partition of its choosing) and two more parts of
    the one MPMD step, after the generators, in world order."""
    cfg = load_config(str(REPO / "configs" / "ppo-tiny.yaml"), [
        "run_dir=/runs/ppo", "model.path=/models/sft", "models.reward.path=/models/rm",
        "models.reference.placement=exclusive", "models.reward.placement=exclusive",
        "slurm.models.reward.partition=gen", "slurm.models.reward.time_min=30",
        "slurm.models.reward.setup=[module load rm-stack]"])
    text = hetjob_sbatch_text(cfg, cfg.run_dir, PYTHON)
    assert_golden("hetjob-ppo-four-models.sbatch", text)
    assert text.count("#SBATCH hetjob") == 3
    assert "HPCALIGN_MODEL_ROLES=(reference reward)" in text


def test_weird_values_golden() -> None:
    cfg = weird_config(WEIRD_RUN_DIR)
    assert_golden("hetjob-weird.sbatch", hetjob_sbatch_text(cfg, WEIRD_RUN_DIR, PYTHON))


def test_sbatch_headers_round_trip_through_shell_words() -> None:
    """Each #SBATCH line is exactly one shell word whose value is the config value."""
    cfg = weird_config(WEIRD_RUN_DIR)
    text = hetjob_sbatch_text(cfg, WEIRD_RUN_DIR, PYTHON)
    headers = [line[len("#SBATCH "):] for line in text.splitlines() if line.startswith("#SBATCH ")]
    values = {}
    for header in headers:
        words = shlex.split(header)
        assert len(words) == 1, header
        key, _, value = words[0].partition("=")
        values.setdefault(key, []).append(value)
    assert values["--comment"] == [WEIRD_VALUE]
    assert values["--account"] == ["acc'ount $(touch PWNED)"]
    assert values["--constraint"] == ["a100&`touch PWNED`"]
    assert values["--job-name"] == ["my job's \"name\""]
    assert values["--output"] == [f"{WEIRD_RUN_DIR}/submitit/%j_0_log.out"]
    assert values["hetjob"] == [""]


# ---------------------------------------------------------------- a real shell
def test_weird_values_reach_srun_intact_and_run_nothing(weird_tmp_path: Path,
                                                        tmp_path: Path) -> None:
    """Run the generated script in bash (srun and python stubbed): values arrive unchanged."""
    run_dir = str(weird_tmp_path / "run")
    python = weird_tmp_path / "py thon's"
    # each call of the stub python records its argv (and what a setup line exported) under
    # a name from its third argument: after-step, watch-step or hpcalign.roles.main
    python.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$STUB_OUT/python-$3"\n'
                      'printf "%s" "$SETUP_SAW" > "$STUB_OUT/setup-saw-$3"; pwd > "$STUB_OUT/pwd"\n')
    python.chmod(0o755)
    cfg = weird_config(run_dir)
    script = tmp_path / "job.sbatch"
    script.write_text(hetjob_sbatch_text(cfg, run_dir, str(python)))
    stub = ('srun() { printf "%s\\0" "$@" > "$STUB_OUT/srun-argv"; '
            'printf "%s" "$NCCL_WEIRD" > "$STUB_OUT/env"; }; export -f srun; exec bash "$1"')
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "42", "STUB_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", stub, "_", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    srun_argv = (tmp_path / "srun-argv").read_text().split("\0")[:-1]
    logs = f"{run_dir}/logs"
    gen_setup = f"export SETUP_SAW={shlex.quote(WEIRD_VALUE)}\ncd /\nexec \"$@\""
    assert srun_argv == [
        "--mpi=pmix", "--kill-on-bad-exit=1", f"--output={logs}/slurm-42.0-trainer-%t.out",
        "--container-image=/img dir/it's $(touch PWNED).sqsh",
        "bash", "-c", '\nexec "$@"', "trainer-setup",
        str(python), "-u", "-m", "hpcalign.roles.main", "--role", "trainer", run_dir,
        ":", f"--output={logs}/slurm-42.0-generator-%t.out", "--export=ALL", WEIRD_VALUE,
        "bash", "-c", gen_setup, "generator-setup",
        str(python), "-u", "-m", "hpcalign.roles.main", "--role", "generator", run_dir,
    ]
    assert (tmp_path / "env").read_text() == WEIRD_VALUE
    python_argv = (tmp_path / "python-after-step").read_text().split("\0")[:-1]
    assert python_argv == ["-m", "hpcalign.launch.slurm_job", "after-step", "--rc", "0", run_dir]
    # what srun would start for a generator rank: its setup runs, then Python with its argv
    generator = srun_argv[srun_argv.index("generator-setup") - 3:]
    rank = subprocess.run(generator, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert rank.returncode == 0, rank.stderr
    assert (tmp_path / "python-hpcalign.roles.main").read_text().split("\0")[:-1] == [
        "-u", "-m", "hpcalign.roles.main", "--role", "generator", run_dir]
    assert (tmp_path / "setup-saw-hpcalign.roles.main").read_text() == WEIRD_VALUE
    assert (tmp_path / "pwd").read_text().strip() == "/"  # the setup's `cd /` ran first
    assert Path(logs).is_dir()
    for where in (tmp_path, weird_tmp_path, Path.cwd()):
        assert not (where / "PWNED").exists(), f"a config value was executed (in {where})"


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("change, field", [
    ({"slurm__env": {"NCCL_X": "a\nrm -rf /"}}, "slurm.env.NCCL_X"),
    ({"slurm__env": {"BAD-NAME": "1"}}, "slurm.env"),
    ({"slurm__env": {"SLURM_JOB_ID": "1"}}, "slurm.env.SLURM_JOB_ID"),
    ({"slurm__train__sbatch_args": {"comment\n#SBATCH --x": "1"}}, "sbatch_args"),
    ({"slurm__train__sbatch_args": {"comment": "a\nb"}}, "slurm.train.sbatch_args.comment"),
    ({"slurm__gen__sbatch_args": {"partition": "x"}}, "use partition instead"),
    ({"slurm__gen__srun_args": ["ok", "bad\r"]}, "slurm.gen.srun_args[1]"),
    ({"slurm__job_name": "a\nb"}, "slurm.job_name"),
    ({"trainer__ranks": 2}, "trainer.ranks=2"),
    ({"run_dir": "/runs/100%"}, "'%' is not allowed"),
    ({"slurm__models": {"reference": {"partition": "gen"}}},
     "slurm.models.reference: no model 'reference' is placed on ranks of its own"),
    ({"models__reference": {"placement": "exclusive", "ranks": 1},
      "slurm__models": {"reference": {"tasks_per_node": 2}}},
     "slurm.models.reference.nodes=1 x slurm.models.reference.tasks_per_node=2 = 2 tasks, "
     "but models.reference.ranks=1"),
])
def test_refuses_unsafe_or_inconsistent_values(change: dict, field: str) -> None:
    cfg = quickstart(**change)
    with pytest.raises(ConfigError, match=None) as err:
        check_slurm_config(cfg, cfg.run_dir, PYTHON)
    assert field in str(err.value)


def test_hand_written_scripts_refuse_a_model_on_ranks_of_its_own() -> None:
    """sbatch/*.sbatch have two components: `prepare` (check_tasks=False) names the model."""
    cfg = quickstart(models__reference={"placement": "exclusive", "ranks": 1})
    check_slurm_config(cfg, cfg.run_dir, PYTHON)  # hpcalign submit writes its component
    with pytest.raises(ConfigError, match="models.reference.placement=exclusive needs a het "
                                          "component of its own: submit with hpcalign submit"):
        check_slurm_config(cfg, cfg.run_dir, PYTHON, check_tasks=False)


def test_newline_in_run_dir_is_refused() -> None:
    cfg = quickstart()
    with pytest.raises(ConfigError, match="newlines"):
        hetjob_sbatch_text(cfg, "/runs/a\n#SBATCH --x", PYTHON)


# ---------------------------------------------------------------- submitit's view
def test_submitit_executor_writes_the_same_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """HetSlurmExecutor (what `submit` uses) == hetjob_sbatch_text (what --dry-run prints)."""
    from submitit.slurm.slurm import SlurmExecutor

    from hpcalign.launch.slurm import HetSlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun here
    for cfg in (quickstart(), load_config(str(REPO / "configs" / "grpo-7b.yaml")),
                weird_config(WEIRD_RUN_DIR)):
        executor = HetSlurmExecutor(cfg, cfg.run_dir, PYTHON)
        body = job_body(cfg, cfg.run_dir, PYTHON)
        assert executor._make_submission_file_text(body, "uid") == hetjob_sbatch_text(
            cfg, cfg.run_dir, PYTHON)
        assert executor._num_tasks() == cfg.trainer.ranks + cfg.generator.ranks


def test_watcher_folds_het_components() -> None:
    """sacct lists a het job only as <id>+0, <id>+1 rows (recorded on the test cluster)."""
    from hpcalign.launch.slurm import HetSlurmInfoWatcher

    sacct = (GOLDEN / "sacct-het.txt").read_text()
    info = HetSlurmInfoWatcher().read_info(sacct)
    folded = {job: {k: v for k, v in row.items()} for job, row in sorted(info.items())
              if "+" not in job}
    assert_golden("sacct-het-folded.json", json.dumps(folded, indent=2, sort_keys=True) + "\n")
    assert info["1"]["State"] == info["15"]["State"] == "COMPLETED"
    assert info["6"]["State"] == "CANCELLED"  # "CANCELLED by 0" in sacct
    assert info["17"]["State"] == "RUNNING"
    assert info["19"]["State"] == "PENDING"
    assert info["17"]["NodeList"] == "vm1,vm2"
    # a component that fails while the other completed makes the job FAILED (made-up rows)
    mixed = "JobID|State|NodeList\n9+0|COMPLETED|vm1\n9+0.batch|COMPLETED|vm1\n9+1|FAILED|vm2\n"
    assert HetSlurmInfoWatcher().read_info(mixed)["9"]["State"] == "FAILED"


def test_hetjob_sbatch_runs_the_same_job_step() -> None:
    """sbatch/hetjob.sbatch carries JOB_STEP word for word (same srun, same after-step)."""
    script = (REPO / "sbatch" / "hetjob.sbatch").read_text()
    assert JOB_STEP in script


def test_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "never-created"
    proc = subprocess.run(
        [sys.executable, "-m", "hpcalign.cli", "submit", str(REPO / "configs" / "quickstart.yaml"),
         f"run_dir={run_dir}", "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash")
    assert "#SBATCH hetjob" in proc.stdout and f"HPCALIGN_RUN_DIR={run_dir}" in proc.stdout
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- every field, hostile
# Every config field that reaches the sbatch text or a shell line, each with its own hostile
# value (the field's name in it, so a value that lands in the wrong place shows). A new
# string field of slurm.* must be added here: test_every_text_field_has_a_hostile_case.
HOSTILE = "$(touch PWNED) `touch PWNED` 'q' \"dq\" ; & | * ? ~ ! \\ ünï ✓ \t%j"
HEADER_FIELDS = ("partition", "account", "qos", "constraint", "reservation")
HOSTILE_PYTHON_DIR = "py thon's $(touch PWNED)"


def hostile(name: str) -> str:
    return f"{name}: {HOSTILE}"


def every_field_config(run_dir: str, python: str) -> Config:
    changes: dict[str, object] = {
        "run_dir": run_dir, "slurm__python": python, "slurm__job_name": hostile("job_name"),
        "slurm__env": {"HOSTILE_ENV": hostile("env")},
        # shell code by design: each prints a hostile value, quoted, then a `#SBATCH` row
        "slurm__setup": [f'printf %s {shlex.quote(hostile("setup"))} > "$STUB_OUT/setup"',
                         "#SBATCH --qos=from-setup"],
    }
    for comp in ("train", "gen"):
        changes[f"slurm__{comp}"] = hostile_component(comp)
    # a model on ranks of its own: a third component, `slurm.models.reference`
    changes["models__reference"] = {"placement": "exclusive", "ranks": 1}
    changes["slurm__models"] = {"reference": hostile_component("reference")}
    return quickstart(**changes)


def hostile_component(comp: str) -> dict[str, object]:
    """Every text field of one component, each a hostile value naming it."""
    fields: dict[str, object] = {field: hostile(f"{comp}.{field}") for field in HEADER_FIELDS}
    fields["sbatch_args"] = {"comment": hostile(f"{comp}.comment")}
    fields["srun_args"] = [hostile(f"{comp}.srun_args"), "--export=ALL"]
    fields["setup"] = [
        f'printf %s {shlex.quote(hostile(f"{comp}.setup"))} > "$STUB_OUT/{comp}-setup"',
        "#SBATCH --partition=from-setup"]
    return fields


def test_every_text_field_has_a_hostile_case() -> None:
    """Guard: a new str/list/dict field of slurm or a component needs a case above."""
    from hpcalign.config.slurm import Component, SlurmConfig

    covered = set(HEADER_FIELDS) | {"sbatch_args", "srun_args", "setup"}
    for model, done in ((Component, covered), (SlurmConfig, {"job_name", "setup", "env",
                                                             "python", "train", "gen",
                                                             "models"})):
        for name, field in model.model_fields.items():
            if field.annotation not in (int, float, bool):
                assert name in done, f"{model.__name__}.{name} has no hostile-value case"


def test_every_field_golden() -> None:
    python = f"/opt/{HOSTILE_PYTHON_DIR}/python"
    cfg = every_field_config(WEIRD_RUN_DIR, python)
    assert_golden("hetjob-every-field.sbatch", hetjob_sbatch_text(cfg, WEIRD_RUN_DIR, python))


def test_every_field_header_is_one_word_per_line_with_its_value() -> None:
    cfg = every_field_config(WEIRD_RUN_DIR, PYTHON)
    text = hetjob_sbatch_text(cfg, WEIRD_RUN_DIR, PYTHON)
    components: list[dict[str, list[str]]] = [{}]
    for row in text.split("\n"):  # sbatch reads up to the first non-comment line
        if row.strip() and not row.startswith("#"):
            break
        if row.startswith("#SBATCH "):
            words = shlex.split(row[len("#SBATCH "):])
            assert len(words) == 1, row
            if words[0] == "hetjob":
                components.append({})
                continue
            key, _, value = words[0].partition("=")
            components[-1].setdefault(key, []).append(value)
    assert len(components) == 3  # the setup lines' `#SBATCH` rows moved nothing
    for index, comp in enumerate(("train", "gen", "reference")):
        for field in (*HEADER_FIELDS, "comment"):
            assert components[index][f"--{field}"] == [hostile(f"{comp}.{field}")], field
    assert components[0]["--job-name"] == [hostile("job_name")]


def test_every_field_reaches_bash_intact(weird_tmp_path: Path, tmp_path: Path) -> None:
    run_dir = str(weird_tmp_path / "run")
    python_dir = weird_tmp_path / HOSTILE_PYTHON_DIR
    python_dir.mkdir()
    python = python_dir / "python"
    python.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$STUB_OUT/python-$3"\n')
    python.chmod(0o755)
    cfg = every_field_config(run_dir, str(python))
    script = tmp_path / "job.sbatch"
    script.write_text(hetjob_sbatch_text(cfg, run_dir, str(python)))
    stub = ('srun() { printf "%s\\0" "$@" > "$STUB_OUT/srun-argv"; '
            'printf "%s" "$HOSTILE_ENV" > "$STUB_OUT/env"; }; export -f srun; exec bash "$1"')
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7", "STUB_OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", stub, "_", str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun-argv").read_text().split("\0")[:-1]
    logs = f"{run_dir}/logs"

    def component(comp: str, role: str) -> list[str]:
        resources = cfg.slurm.models[comp] if comp == role else getattr(cfg.slurm, comp)
        setup = "\n".join(resources.setup) + '\nexec "$@"'
        return [f"--output={logs}/slurm-7.0-{role}-%t.out", hostile(f"{comp}.srun_args"),
                "--export=ALL", "bash", "-c", setup, f"{role}-setup", str(python), "-u", "-m",
                "hpcalign.roles.main", "--role", role, run_dir]

    trainer, generator = component("train", "trainer"), component("gen", "generator")
    reference = component("reference", "reference")
    assert argv == ["--mpi=pmix", "--kill-on-bad-exit=1", *trainer, ":", *generator,
                    ":", *reference]
    assert (tmp_path / "env").read_text() == hostile("env")
    assert (tmp_path / "setup").read_text() == hostile("setup")  # slurm.setup, in the batch shell
    assert (tmp_path / "python-after-step").read_text().split("\0")[:-1] == [
        "-m", "hpcalign.launch.slurm_job", "after-step", "--rc", "0", run_dir]
    for comp, rank in (("train", trainer), ("gen", generator), ("reference", reference)):
        done = subprocess.run(rank[3:], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"{comp}-setup").read_text() == hostile(f"{comp}.setup")
    for where in (tmp_path, weird_tmp_path, Path.cwd()):
        assert not (where / "PWNED").exists(), f"a config value was executed (in {where})"


@pytest.mark.parametrize("name", sorted(
    p.stem for p in (REPO / "configs").glob("*.yaml")
    if p.stem not in ("dpo-tiny", "rm-tiny") and not p.stem.startswith(("plan-", "study-"))))
def test_every_shipped_run_config_makes_a_valid_het_job(name: str) -> None:
    """`hpcalign submit configs/NAME.yaml --dry-run` works for every run config we ship
    (ranks fit their components' tasks, every value is safe in the text)."""
    user_values = {  # what those configs leave to the user (their docs' commands)
        "grpo-hf": ["model.path=/m", "data.train=/d.jsonl", "reward.functions=[exact_match]"],
        "ppo-tiny": ["models.policy.path=/sft", "models.reward.path=/rm"]}
    cfg = load_config(str(REPO / "configs" / f"{name}.yaml"),
                      ["run_dir=/shared/runs/x", *user_values.get(name, [])])
    text = hetjob_sbatch_text(cfg, cfg.run_dir, PYTHON)
    assert text.count("#SBATCH hetjob") == 1 and "srun" in text
