"""The heterogeneous-job sbatch text: a pure function of the config, no I/O.

`hetjob_sbatch_text(cfg, run_dir, python)` is exactly what `hpcalign submit` hands to
`sbatch` (and what `--dry-run` prints): submitit's own `_make_sbatch_string` writes the
header of component 0 (trainers) and the script body; `#SBATCH hetjob` and the header of
component 1 (generators), then of one component per model placed on ranks of its own
(`job_components`), are inserted after it. The body runs ONE MPMD job step across all
components, `srun --mpi=pmix A : B [: C ...]`, which gives one MPI world of trainers,
generators and those models, the same shape as local mode's `mpiexec -n T A : -n G B ...`.

Safety: every config value that reaches the text is `shlex.quote`d once, where it is
assigned; the job step only uses the variables, double-quoted. Values with a newline,
carriage return or NUL are refused (`ConfigError`), because Slurm reads `#SBATCH` headers
line by line and a newline would start a new shell line. `slurm.setup`
and `slurm.<component>.setup` are the fields that are shell code by design (module loads,
venv activation): `slurm.setup` is written as is, the per-component lines are quoted into
a variable that each rank runs with `bash -c`.

`JOB_STEP` is shared word for word with `sbatch/hetjob.sbatch` (a test holds them equal),
so the hand-written script and `hpcalign submit` run the same thing.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from submitit.slurm.slurm import _as_sbatch_flag, _convert_mem, _make_sbatch_string

from hpcalign.config.schema import Config
from hpcalign.config.slurm import Component
from hpcalign.errors import ConfigError

ROLE_MODULE = "hpcalign.roles.main"
COMPONENTS = (("train", "trainer"), ("gen", "generator"))  # (slurm.<name>, role), in order


def job_components(cfg: Config) -> list[tuple[str, str, Component, int]]:
    """(name, role, resources, ranks) of every het component, in world order: the
    trainers, the generators, then one per model on ranks of its own (its name is the
    model's: `slurm.models.<name>`, or the default of `SlurmConfig.models`)."""
    from hpcalign.plan.placement import exclusive_models

    parts = [("train", "trainer", cfg.slurm.train, cfg.trainer.ranks),
             ("gen", "generator", cfg.slurm.gen, cfg.generator.ranks)]
    for name, model in exclusive_models(cfg):
        parts.append((name, name, cfg.slurm.model_component(name, model.ranks), model.ranks))
    return parts
_FLAG_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# sbatch flags the generator owns; `sbatch_args` may not set them (use the config field).
_MANAGED_FLAGS = {
    "partition": "partition", "nodes": "nodes", "ntasks-per-node": "tasks_per_node",
    "ntasks": "tasks_per_node", "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task", "mem": "mem_gb", "time": "time_min",
    "account": "account", "qos": "qos", "constraint": "constraint",
    "reservation": "reservation", "exclusive": "exclusive", "job-name": "slurm.job_name",
    "signal": "slurm.signal_before_end_s", "requeue": "slurm.max_requeues",
    "no-requeue": "slurm.max_requeues", "output": "(set by hpcalign)", "error": "(set by hpcalign)",
    "open-mode": "(set by hpcalign)",
}

# The job step, shared word for word with sbatch/hetjob.sbatch. It expects HPCALIGN_RUN_DIR,
# HPCALIGN_PYTHON, the arrays HPCALIGN_TRAIN_SRUN_ARGS / HPCALIGN_GEN_SRUN_ARGS and the
# strings HPCALIGN_TRAIN_SETUP / HPCALIGN_GEN_SETUP (shell lines each rank of the component
# runs, through `bash -c`, before it execs Python: the rank keeps its pid and its env).
# NOTE: logs are named with ${SLURM_JOB_ID} (the leader's id in every component), never %j:
# in a het step srun expands %j to the component's own id. srun numbers tasks in its %t in
# its own way across components; the roles' RUN_DIR/logs/rank-N.log carry the world rank.
JOB_STEP = """\
# ---- the job step (identical in sbatch/hetjob.sbatch and `hpcalign submit`) ----
# One MPMD step across the components = one MPI world: trainers, generators, then any
# model on ranks of its own (one component each).
# One run per RUN_DIR: claim it for this job (a requeue is the same owner) before writing
# anything there; refused (another live run owns it): change nothing. Finished already
# (e.g. requeued after its final checkpoint): after-step records "done".
"$HPCALIGN_PYTHON" -m hpcalign.launch.slurm_job claim "$HPCALIGN_RUN_DIR"
claim_rc=$?
if [[ $claim_rc -eq 3 ]]; then
    exec "$HPCALIGN_PYTHON" -m hpcalign.launch.slurm_job after-step --rc 0 "$HPCALIGN_RUN_DIR"
elif [[ $claim_rc -ne 0 ]]; then
    exit "$claim_rc"
fi
export PYTHONUNBUFFERED=1 HDF5_USE_FILE_LOCKING=FALSE
# Open MPI over TCP connects lazily and needs the sender to progress: without this thread a
# control message sent right before a long torch call (e.g. the rendezvous) waits for it.
export OMPI_MCA_btl_tcp_progress_thread="${OMPI_MCA_btl_tcp_progress_thread:-1}"
attempt="${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}"
logs="$HPCALIGN_RUN_DIR/logs"
mkdir -p -- "$logs" "$HPCALIGN_RUN_DIR/errors"
rm -f -- "$HPCALIGN_RUN_DIR"/errors/*.json  # failures of an earlier attempt
# A model on ranks of its own (models.<name>.placement: exclusive, `hpcalign submit` only)
# is one more component and one more part of the step: HPCALIGN_MODEL_ROLES names them.
model_parts=()
for role in ${HPCALIGN_MODEL_ROLES[@]+"${HPCALIGN_MODEL_ROLES[@]}"}; do
    srun_args="HPCALIGN_MODEL_${role^^}_SRUN_ARGS[@]" setup="HPCALIGN_MODEL_${role^^}_SETUP"
    model_parts+=(: --output="$logs/slurm-$attempt-$role-%t.out" "${!srun_args}"
        bash -c "${!setup}"$'\\nexec "$@"' "$role-setup"
        "$HPCALIGN_PYTHON" -u -m hpcalign.roles.main --role "$role" "$HPCALIGN_RUN_DIR")
done
srun --mpi=pmix --kill-on-bad-exit=1 \\
    --output="$logs/slurm-$attempt-trainer-%t.out" "${HPCALIGN_TRAIN_SRUN_ARGS[@]}" \\
    bash -c "$HPCALIGN_TRAIN_SETUP"$'\\nexec "$@"' trainer-setup \\
    "$HPCALIGN_PYTHON" -u -m hpcalign.roles.main --role trainer "$HPCALIGN_RUN_DIR" \\
  : --output="$logs/slurm-$attempt-generator-%t.out" "${HPCALIGN_GEN_SRUN_ARGS[@]}" \\
    bash -c "$HPCALIGN_GEN_SETUP"$'\\nexec "$@"' generator-setup \\
    "$HPCALIGN_PYTHON" -u -m hpcalign.roles.main --role generator "$HPCALIGN_RUN_DIR" \\
    ${model_parts[@]+"${model_parts[@]}"} 2>>"$logs/slurm-$attempt-srun.err" &
srun_pid=$!
# A bounded wait: the watcher stops an srun that outlives its job step (seen with het steps).
"$HPCALIGN_PYTHON" -m hpcalign.launch.slurm_job watch-step --pid "$srun_pid" \\
    "$HPCALIGN_RUN_DIR" 2>>"$logs/slurm-$attempt-srun.err" &
watch_pid=$!
wait "$srun_pid"
rc=$?
kill "$watch_pid" 2>/dev/null
# Done, requeue (preempted and SLURM_RESTART_COUNT < slurm.max_requeues) or report a failure.
"$HPCALIGN_PYTHON" -m hpcalign.launch.slurm_job after-step --rc "$rc" "$HPCALIGN_RUN_DIR"
"""


def _check_text(field: str, value: str) -> None:
    if any(ch in value for ch in "\n\r\0"):
        raise ConfigError(f"{field}={value!r}: newlines, carriage returns and NUL bytes are "
                          f"not allowed (Slurm reads #SBATCH lines and shell lines one by one)")


def check_slurm_config(cfg: Config, run_dir: str, python: str, check_tasks: bool = True) -> None:
    """Refuse what cannot be written safely or cannot run: ranks vs tasks, keys, newlines.

    `check_tasks=False` for hand-written scripts, whose #SBATCH lines set the tasks (the
    allocation is checked against the ranks inside the job instead).
    """
    _check_text("run_dir", run_dir)
    if "%" in run_dir:
        raise ConfigError(f"run_dir={run_dir!r}: '%' is not allowed (Slurm expands it in log "
                          f"file names: %j, %t, ...)")
    _check_text("slurm.python", python)
    _check_text("slurm.job_name", cfg.slurm.job_name)
    parts = job_components(cfg)
    placed = {name for name, *_ in parts[2:]}
    for name in cfg.slurm.models:
        if name not in placed:
            raise ConfigError(f"slurm.models.{name}: no model {name!r} is placed on ranks of "
                              f"its own (models.{name}.placement: exclusive); models placed "
                              f"so: {', '.join(sorted(placed)) or 'none'}")
    if not check_tasks and placed:
        # NOTE: hand-written scripts (sbatch/hetjob.sbatch) have two components
        raise ConfigError(f"models.{sorted(placed)[0]}.placement=exclusive needs a het "
                          f"component of its own: submit with hpcalign submit, which writes "
                          f"it (sbatch/*.sbatch place trainers and generators only)")
    for name, role, comp, ranks in parts:
        key = f"slurm.models.{name}" if role == name else f"slurm.{name}"
        what = f"models.{name}.ranks" if role == name else f"{role}.ranks"
        if check_tasks and comp.nodes * comp.tasks_per_node != ranks:
            raise ConfigError(
                f"{key}.nodes={comp.nodes} x {key}.tasks_per_node="
                f"{comp.tasks_per_node} = {comp.nodes * comp.tasks_per_node} tasks, but "
                f"{what}={ranks}: component {name} must hold exactly one task per {role} "
                f"rank (set tasks_per_node={ranks // comp.nodes if ranks % comp.nodes == 0 else '?'}"
                f" or change nodes)")
        for field in ("partition", "account", "qos", "constraint", "reservation"):
            value = getattr(comp, field)
            if value is not None:
                _check_text(f"{key}.{field}", value)
        for flag_key, value in comp.sbatch_args.items():
            if not _FLAG_KEY.match(flag_key):
                raise ConfigError(f"{key}.sbatch_args: {flag_key!r} is not an sbatch flag name "
                                  f"(letters, digits, '-' and '_', without the leading '--')")
            flag = flag_key.replace("_", "-")
            if flag in _MANAGED_FLAGS:
                raise ConfigError(f"{key}.sbatch_args.{flag_key}: hpcalign sets --{flag} "
                                  f"itself; use {_MANAGED_FLAGS[flag]} instead")
            _check_text(f"{key}.sbatch_args.{flag_key}", str(value))
        for i, arg in enumerate(comp.srun_args):
            _check_text(f"{key}.srun_args[{i}]", arg)
    for key, value in cfg.slurm.env.items():
        if not _ENV_KEY.match(key):
            raise ConfigError(f"slurm.env: {key!r} is not a valid environment variable name")
        if key.startswith(("SLURM_", "HPCALIGN_")):
            raise ConfigError(f"slurm.env.{key}: SLURM_* and HPCALIGN_* are set by Slurm and "
                              f"hpcalign; choose another name")
        _check_text(f"slurm.env.{key}", value)


def _common_flags(comp: Component, cfg: Config) -> dict[str, Any]:
    """The sbatch flags every component carries (name → value; True for a bare flag)."""
    # Without "B:" Slurm signals the job steps (every rank), not the batch shell: the roles
    # checkpoint at the next step boundary and exit; after-step then requeues. (This also
    # replaces submitit's own USR2 default, which only its pickled entry would handle.)
    flags: dict[str, Any] = {"signal": f"USR1@{cfg.slurm.signal_before_end_s}"}
    flags["requeue" if cfg.slurm.max_requeues else "no-requeue"] = True
    if comp.reservation:
        flags["reservation"] = comp.reservation
    flags.update(comp.sbatch_args)
    return flags


def component0_parameters(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of submitit's `_make_sbatch_string` for component 0 (trainers)."""
    comp = cfg.slurm.train
    return {
        "job_name": cfg.slurm.job_name,
        "partition": comp.partition,
        "time": comp.time_min,
        "nodes": comp.nodes,
        "ntasks_per_node": comp.tasks_per_node,
        "cpus_per_task": comp.cpus_per_task,
        "gpus_per_node": comp.gpus_per_node or None,
        "mem": _convert_mem(comp.mem_gb) if comp.mem_gb else None,
        "account": comp.account,
        "qos": comp.qos,
        "constraint": comp.constraint,
        "exclusive": True if comp.exclusive else None,
        "wckey": None,  # submitit's default "submitit" is refused where wckeys are enforced
        "setup": list(cfg.slurm.setup) or None,
        "use_srun": False,  # the body starts its own MPMD srun step
        "additional_parameters": _common_flags(comp, cfg),
    }


def het_component_lines(comp: Component, cfg: Config) -> list[str]:
    """`#SBATCH hetjob` and the header of a further component (generators)."""
    flags: dict[str, Any] = {
        "partition": comp.partition, "time": comp.time_min, "nodes": comp.nodes,
        "ntasks_per_node": comp.tasks_per_node, "cpus_per_task": comp.cpus_per_task,
    }
    optional = {"gpus_per_node": comp.gpus_per_node or None,
                "mem": _convert_mem(comp.mem_gb) if comp.mem_gb else None,
                "account": comp.account, "qos": comp.qos, "constraint": comp.constraint,
                "exclusive": True if comp.exclusive else None}
    flags.update({k: v for k, v in optional.items() if v is not None})
    flags.update(_common_flags(comp, cfg))
    return ["#SBATCH hetjob"] + [_as_sbatch_flag(k, flags[k]) for k in sorted(flags)]


def _array(name: str, args: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(a) for a in args)})"


def job_body(cfg: Config, run_dir: str, python: str) -> str:
    """The script after the headers: quoted assignments from the config, then `JOB_STEP`."""
    lines = [
        "# ---- values from the config (each shell-quoted) ----",
        f"HPCALIGN_RUN_DIR={shlex.quote(run_dir)}",
        f"HPCALIGN_PYTHON={shlex.quote(python)}",
        _array("HPCALIGN_TRAIN_SRUN_ARGS", cfg.slurm.train.srun_args),
        _array("HPCALIGN_GEN_SRUN_ARGS", cfg.slurm.gen.srun_args),
        f"HPCALIGN_TRAIN_SETUP={shlex.quote(chr(10).join(cfg.slurm.train.setup))}",
        f"HPCALIGN_GEN_SETUP={shlex.quote(chr(10).join(cfg.slurm.gen.setup))}",
    ]
    models = job_components(cfg)[2:]  # models on ranks of their own: a part of the step each
    if models:
        lines.append(_array("HPCALIGN_MODEL_ROLES", [name for name, *_ in models]))
        for name, _role, comp, _ranks in models:
            setup = shlex.quote(chr(10).join(comp.setup))
            lines += [_array(f"HPCALIGN_MODEL_{name.upper()}_SRUN_ARGS", comp.srun_args),
                      f"HPCALIGN_MODEL_{name.upper()}_SETUP={setup}"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in sorted(cfg.slurm.env.items())]
    return "\n".join(lines) + "\n" + JOB_STEP


def submitit_folder(run_dir: str) -> str:
    """submitit's folder inside RUN_DIR (submission file, batch log)."""
    return str(Path(run_dir) / "submitit")


def insert_het_components(text: str, lines: list[str]) -> str:
    """Put further het components right after the last `#SBATCH` line of component 0.

    Only the header counts (what sbatch reads: up to the first line that is neither blank
    nor a comment): a setup line, or a quoted value, may hold a row starting `#SBATCH `.
    """
    rows = text.split("\n")
    first = next(i for i, row in enumerate(rows) if row.startswith("#SBATCH "))
    last = first
    while last + 1 < len(rows) and rows[last + 1].startswith("#SBATCH "):
        last += 1
    return "\n".join(rows[: last + 1] + lines + rows[last + 1 :])


def hetjob_sbatch_text(cfg: Config, run_dir: str, python: str) -> str:
    """The whole sbatch script `hpcalign submit` writes for this config (pure)."""
    check_slurm_config(cfg, run_dir, python)
    text = _make_sbatch_string(command=job_body(cfg, run_dir, python),
                               folder=submitit_folder(run_dir),
                               **component0_parameters(cfg))
    return insert_het_components(text, further_component_lines(cfg))


def further_component_lines(cfg: Config) -> list[str]:
    """The `#SBATCH hetjob` headers of every component after the trainers', in order."""
    return [line for _name, _role, comp, _ranks in job_components(cfg)[1:]
            for line in het_component_lines(comp, cfg)]
