"""Fault injection: the environment fails under a real local run (`hpcalign run`, real
mpiexec); prints ONE JSON line with a row per fault. Needs root (it mounts tmpfs).

    python tools/faults/env_faults.py                  # every fault (8 min on 2 busy cores)
    python tools/faults/env_faults.py disk_full_shard missing_mpiexec   # some of them

Each fault runs in a RUN_DIR on its own small tmpfs (`mount -t tmpfs -o size=16m`):

- `disk_full_shard` / `disk_full_checkpoint`: just before the generator writes the shard
  of step 2 (the trainer writes checkpoint 2), the disk is filled (a filler file beside
  RUN_DIR, `posix_fallocate`) so that only a few KiB are left: the write fails part-way.
  `disk_full_shard_zero`: the same with no byte left (no rank can write its error record).
- `read_only_start`: RUN_DIR's filesystem is read-only before the run starts.
- `read_only_mid_run`: just before the shard of step 2, `rollouts/` and `checkpoints/` turn
  read-only (a read-only bind mount over each: see `bind_read_only`).
- `missing_mpiexec`: `launcher.mpiexec=/nonexistent/bin/mpiexec`; `missing_mpiexec_path`:
  a bare name that is neither on PATH nor beside the venv's Python.
- `late_rename_within` / `late_rename_beyond`: the shard of step 2 is announced over MPI
  but its file appears only 2 s (within the trainer's 5 s `read_shard` retry) / 9 s
  (beyond it) later: the NFS attribute-cache case. The first must run on, nothing lost.

The faults are set off from inside the ranks, at an exact moment, by a `sitecustomize`
this tool puts on PYTHONPATH (`HPCALIGN_ENV_FAULT`, see `install_hook`): it wraps
`write_shard` / `save_checkpoint` as their modules load; nothing in hpcalign changes.

Each row says what the user sees (`error`: the last line of stderr; `one_line`: it starts
with "hpcalign" and no traceback was printed), the exit code, `verdict_s` (from the fault
to the launcher's exit, or from its start for a fault present at start; null for a run
meant to go on; `bound_s` is what the row is held to), `partial_visible` (a shard
`hpcalign inspect` refuses, or a complete-looking checkpoint that does not load: must be
0), `leftovers` (temp files a later write removes), then the resume: the fault removed,
the same `hpcalign run` again on the same RUN_DIR, `resumed_ok` when it exits 0 with the
final checkpoint bitwise equal to an uninterrupted run's and every shard the same, `lost`
/ `duplicated` the steps missing / repeated in metrics.jsonl. `verdict` is `named` (all of
that holds), `ran_on` (the run was meant to go on, and did, exactly) or `bad` (details in
`problems`).
"""

from __future__ import annotations

import argparse
import glob
import importlib.abc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HOOK_ENV = "HPCALIGN_ENV_FAULT"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")
# tests/integration/local_runs.py's TINY, shorter: 6 steps, checkpoints at 2, 4 and 6
TINY = [
    "model.init.hidden=64", "model.init.intermediate=128", "model.init.heads=4",
    "model.init.kv_heads=2", "generator.prompts_per_step=4", "generator.samples_per_prompt=4",
    "trainer.sft_warmup_steps=2", "trainer.sft_batch=16", "trainer.steps=6",
    "checkpoint.every_steps=2", "log.progress=false", "log.eval_every_steps=0",
    "log.tensorboard=false", "comm.timeout_s=60",
]
STEPS = 6
FAULT_STEP = 2
TMPFS_SIZE = "16m"  # the run needs ~5 MB (two checkpoints of ~0.9 MB, models, shards)
LEAVE_BYTES = 8192  # free bytes left by the filler: less than a shard (~12 KB) or checkpoint
READ_ONLY_SUBDIRS = ("rollouts", "checkpoints")  # made read-only mid-run
BOUND_S = 10.0  # from the fault to the launcher's exit: the failing rank aborts the world
RETRY_S = 5.0  # the trainer's read_shard retry of a missing announced shard

FAULTS = ("disk_full_shard", "disk_full_shard_zero", "disk_full_checkpoint", "read_only_start", "read_only_mid_run",
          "missing_mpiexec", "missing_mpiexec_path", "late_rename_within", "late_rename_beyond")


# --------------------------------------------------------------- the hook (inside the ranks)


def _fire(spec: dict) -> None:
    """Do `spec`'s action now (once: `spec["marker"]` records when, outside RUN_DIR)."""
    try:
        os.close(os.open(spec["marker"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return
    with open(spec["marker"], "w") as handle:
        handle.write(f"{time.time()}\n")
    if spec["action"] == "fill":
        fill(spec["mount"], spec["leave_bytes"])
    elif spec["action"] == "read_only":
        for sub in READ_ONLY_SUBDIRS:
            bind_read_only(os.path.join(spec["run_dir"], sub))
    elif spec["action"] == "delay_rename":
        _DelayedOs.pending = float(spec["delay_s"])


class _DelayedOs:
    """`os` for `hpcalign.data.shards`, except that the armed `replace` of a shard makes the
    file visible only `pending` seconds later (the rename is done, under a hidden name)."""

    pending: float | None = None

    def __getattr__(self, name: str):
        return getattr(os, name)

    def replace(self, src: str, dst: str) -> None:
        delay, _DelayedOs.pending = _DelayedOs.pending, None
        if delay is None or not dst.endswith(".h5"):
            os.replace(src, dst)
            return
        hidden = os.path.join(os.path.dirname(dst), f".late-{os.path.basename(dst)}")
        os.replace(src, hidden)  # not a temp name: `_remove_stale_temps` leaves it alone
        threading.Timer(delay, os.replace, (hidden, dst)).start()


def _patch_shards(module) -> None:
    spec = json.loads(os.environ[HOOK_ENV])
    original = module.write_shard

    def write_shard(path, batch, **kwargs):
        if spec["at"] == "shard" and batch.step == spec["step"]:
            _fire(spec)
        return original(path, batch, **kwargs)

    module.write_shard = write_shard
    if spec["action"] == "delay_rename":
        module.os = _DelayedOs()


def _patch_checkpoint(module) -> None:
    spec = json.loads(os.environ[HOOK_ENV])
    original = module.save_checkpoint

    def save_checkpoint(run_dir, step, *args, **kwargs):
        if spec["at"] == "checkpoint" and step == spec["step"]:
            _fire(spec)
        return original(run_dir, step, *args, **kwargs)

    module.save_checkpoint = save_checkpoint


_PATCHES = {"hpcalign.data.shards": _patch_shards,
            "hpcalign.roles.checkpoint": _patch_checkpoint}


class _Finder(importlib.abc.MetaPathFinder):
    """Patches a module of `_PATCHES` right after it executes (before anyone imports from it)."""

    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _PATCHES[name](module)

        spec.loader.exec_module = patched
        return spec


def install_hook() -> None:
    """Called by the generated sitecustomize in every Python process of the run."""
    if os.environ.get(HOOK_ENV):
        sys.meta_path.insert(0, _Finder())


SITECUSTOMIZE = f"""import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import env_faults
env_faults.install_hook()
"""


# --------------------------------------------------------------- the environment


def mount_tmpfs(path: str, size: str = TMPFS_SIZE) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
                   check=True, capture_output=True, text=True)


def remount(path: str, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", path], check=True, capture_output=True,
                   text=True)


def bind_read_only(path: str) -> None:
    """Make `path` read-only in place (a read-only bind mount over itself).

    NOTE: a read-only remount of the whole tmpfs is refused (EBUSY) while the ranks hold
    their logs and metrics.jsonl open for writing; a bind over the directories that get new
    files (rollouts/, checkpoints/) is not, and fails every write there with EROFS, as a
    filesystem the kernel turned read-only does."""
    subprocess.run(["mount", "--bind", path, path], check=True, capture_output=True, text=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True, capture_output=True,
                   text=True)


def unbind(path: str) -> None:
    mounted = {line.split()[1] for line in open("/proc/mounts")}
    if os.path.abspath(path) in mounted:
        subprocess.run(["umount", path], check=True, capture_output=True, text=True)


def umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


def can_mount() -> str | None:
    """None if this process may mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "mounting tmpfs needs root"
    probe = tempfile.mkdtemp(prefix="hpcalign-mount-probe-")
    try:
        mount_tmpfs(probe, "1m")
    except (OSError, subprocess.CalledProcessError) as err:
        return f"mount -t tmpfs is not permitted here: {getattr(err, 'stderr', '') or err}"
    umount(probe)
    os.rmdir(probe)
    return None


def fill(mount: str, leave_bytes: int) -> None:
    """Fill the filesystem at `mount` (a filler file beside RUN_DIR) to `leave_bytes` free."""
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    fd = os.open(os.path.join(mount, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(free - leave_bytes, 1))
    finally:
        os.close(fd)


# --------------------------------------------------------------- running and judging


def run_hpcalign(run_dir: str, *overrides: str, env: dict | None = None,
                 timeout: float = 300) -> tuple[int, str, float]:
    """`hpcalign run` (TINY) to its end: (exit code, stderr, seconds)."""
    argv = [sys.executable, "-m", "hpcalign.cli", "run", QUICKSTART, f"run_dir={run_dir}",
            *TINY, *overrides]
    start = time.time()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=env, stdin=subprocess.DEVNULL)
        return proc.returncode, proc.stderr, time.time() - start
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else ""
        return 124, stderr + "\n(hang: killed by env_faults)", time.time() - start


def hook_env(work: str, spec: dict) -> dict:
    """The environment of a run with `spec` armed (its sitecustomize under `work`)."""
    site = os.path.join(work, "site")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, "sitecustomize.py"), "w") as handle:
        handle.write(SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **{HOOK_ENV: json.dumps(spec)})


def error_line(stderr: str) -> str:
    lines = [line.strip("\x00 \t") for line in stderr.splitlines() if line.strip("\x00 \t")]
    return lines[-1] if lines else ""


def visible_state(run_dir: str) -> dict:
    """What a reader sees in RUN_DIR after a fault: partial files readable as complete
    (must be none) and temp leftovers (invisible to every reader)."""
    from hpcalign.launch.rundir import list_checkpoints

    bad, leftovers = [], []
    shards = sorted(glob.glob(os.path.join(run_dir, "rollouts", "step-*", "shard-*.h5")))
    if shards:
        proc = subprocess.run([sys.executable, "-m", "hpcalign.cli", "inspect", *shards],
                              capture_output=True, text=True, cwd=ROOT)
        bad += [line for line in proc.stderr.splitlines() if line.startswith("BAD ")]
        if proc.returncode not in (0, 1) or "Traceback" in proc.stderr:
            bad.append(f"inspect exited {proc.returncode}: {proc.stderr[-300:]}")
    for step in list_checkpoints(run_dir) if os.path.isdir(run_dir) else []:
        try:
            checkpoint_tensors(run_dir, step)
        except Exception as err:  # noqa: BLE001 -- a complete-looking checkpoint must load
            bad.append(f"checkpoint {step}: {type(err).__name__}: {err}")
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            if ".tmp-" in name:  # (not `.late-`: the hook's own rename in flight)
                leftovers.append(os.path.relpath(os.path.join(root, name), run_dir))
    return {"partial_visible": bad, "leftovers": sorted(leftovers)}


def checkpoint_tensors(run_dir: str, step: int) -> dict:
    from safetensors.torch import load_file

    base = os.path.join(run_dir, "checkpoints", f"step-{step:06d}")
    tensors = {f"model/{k}": v for k, v in
               load_file(os.path.join(base, "model", "model.safetensors")).items()}
    tensors.update({f"optim/{k}": v for k, v in
                    load_file(os.path.join(base, "optimizer.safetensors")).items()})
    with open(os.path.join(base, "state.json")) as handle:
        json.load(handle)
    return tensors


def shard_checksums(run_dir: str) -> dict[str, str]:
    import h5py

    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "rollouts", "step-*", "shard-*.h5"))):
        with h5py.File(path, "r", locking=False) as f:
            found[os.path.relpath(path, run_dir)] = str(f.attrs["checksum"])
    return found


def metric_steps(run_dir: str) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    steps = []
    for line in open(path).read().splitlines() if os.path.exists(path) else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            steps.append(-1)  # a torn line: counted as a duplicate
    return steps


def same_training(run_dir: str, reference: str) -> list[str]:
    """What differs from the uninterrupted `reference` (empty: the same training)."""
    import torch

    problems = []
    want, have = checkpoint_tensors(reference, STEPS), checkpoint_tensors(run_dir, STEPS)
    if want.keys() != have.keys() or any(not torch.equal(want[k], have[k]) for k in want):
        problems.append("final checkpoint differs from the uninterrupted run's")
    if shard_checksums(run_dir) != shard_checksums(reference):
        problems.append("shards differ from the uninterrupted run's")
    return problems


# --------------------------------------------------------------- the faults


def _spec(fault: str, work: str, mount: str) -> tuple[dict | None, list[str]]:
    """(hook spec or None, extra overrides) of `fault`."""
    marker = os.path.join(work, f"{fault}.fired")
    base = {"marker": marker, "mount": mount, "run_dir": os.path.join(mount, "run"),
            "step": FAULT_STEP}
    if fault == "disk_full_shard":
        return {**base, "action": "fill", "at": "shard", "leave_bytes": LEAVE_BYTES}, []
    if fault == "disk_full_shard_zero":  # not even the error records fit
        return {**base, "action": "fill", "at": "shard", "leave_bytes": 0}, []
    if fault == "disk_full_checkpoint":
        return {**base, "action": "fill", "at": "checkpoint", "leave_bytes": LEAVE_BYTES}, []
    if fault == "read_only_mid_run":
        return {**base, "action": "read_only", "at": "shard"}, []
    if fault == "late_rename_within":
        return {**base, "action": "delay_rename", "at": "shard", "delay_s": 2.0}, []
    if fault == "late_rename_beyond":
        return {**base, "action": "delay_rename", "at": "shard", "delay_s": 9.0}, []
    if fault == "missing_mpiexec":
        return None, ["launcher.mpiexec=/nonexistent/bin/mpiexec"]
    if fault == "missing_mpiexec_path":
        return None, ["launcher.mpiexec=mpiexec-not-installed"]
    if fault == "read_only_start":
        return None, []
    raise ValueError(f"unknown fault {fault!r}")


def run_fault(fault: str, work: str, reference: str | None) -> dict:
    """Inject `fault` into a real run, judge what is left, remove it, resume; the row."""
    mount = os.path.join(work, fault)
    mount_tmpfs(mount)
    run_dir = os.path.join(mount, "run")
    problems: list[str] = []
    try:
        spec, overrides = _spec(fault, work, mount)
        env = hook_env(work, spec) if spec else dict(os.environ)
        if fault == "read_only_start":
            remount(mount, "ro")
        started = time.time()
        code, stderr, seconds = run_hpcalign(run_dir, *overrides, env=env)
        fired_at = started
        if spec is not None:
            try:
                fired_at = float(open(spec["marker"]).read())
            except (OSError, ValueError):
                problems.append("the fault never fired")
        verdict_s = started + seconds - fired_at
        line = error_line(stderr)
        one_line = line.startswith("hpcalign") and "Traceback" not in stderr
        meant_to_run_on = fault == "late_rename_within"
        bound_s = RETRY_S + BOUND_S if fault == "late_rename_beyond" else BOUND_S
        # remove the fault, then judge what a reader sees
        if fault == "read_only_start":
            remount(mount, "rw")
        for sub in READ_ONLY_SUBDIRS:
            unbind(os.path.join(run_dir, sub))
        if os.path.exists(os.path.join(mount, "filler")):
            os.remove(os.path.join(mount, "filler"))
        state = visible_state(run_dir)
        if meant_to_run_on:
            if code != 0:
                problems.append(f"exit {code}: meant to run on")
        else:
            if code == 0:
                problems.append("exit 0 after a fault")
            if not one_line:
                problems.append("not one named line")
            if verdict_s > bound_s:
                problems.append(f"verdict after {verdict_s:.1f} s > {bound_s:g} s")
        if state["partial_visible"]:
            problems.append("partial file visible")
        # resume: the same command on the same RUN_DIR, the fault removed
        resume_code, resume_stderr, resume_s = (
            (code, stderr, 0.0) if meant_to_run_on else
            run_hpcalign(run_dir, *(o for o in overrides if "mpiexec" not in o)))
        steps = metric_steps(run_dir)
        lost = sorted(set(range(STEPS)) - set(steps))
        duplicated = sorted({s for s in steps if steps.count(s) > 1 or s not in range(STEPS)})
        resumed_ok = resume_code == 0 and not lost and not duplicated
        if resume_code != 0:
            problems.append(f"resume exit {resume_code}: {error_line(resume_stderr)}")
        elif reference is not None:
            difference = same_training(run_dir, reference)
            problems += difference
            resumed_ok = resumed_ok and not difference
        if lost or duplicated:
            problems.append(f"metrics: lost {lost}, duplicated {duplicated}")
        return {
            "fault": fault,
            "verdict": "bad" if problems else ("ran_on" if meant_to_run_on else "named"),
            "exit_code": code, "error": line[:400], "one_line": one_line,
            "verdict_s": None if meant_to_run_on else round(verdict_s, 2), "bound_s": bound_s,
            **({"delay_s": spec["delay_s"]} if spec and "delay_s" in spec else {}),
            "partial_visible": len(state["partial_visible"]), "leftovers": len(state["leftovers"]),
            "resumed_ok": resumed_ok, "resume_s": round(resume_s, 1),
            "lost": len(lost), "duplicated": len(duplicated),
            **({"problems": problems, "details": state} if problems else {}),
        }
    finally:
        umount(mount)
        shutil.rmtree(mount, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("faults", nargs="*", choices=[[], *FAULTS], default=[],
                        help="the faults to inject (default: all)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the uninterrupted run (no bitwise comparison)")
    args = parser.parse_args()
    why_not = can_mount()
    if why_not:
        print(json.dumps({"skipped": why_not}))
        sys.exit(1)
    began = time.perf_counter()
    work = tempfile.mkdtemp(prefix="hpcalign-envfaults-", dir=args.dir)
    try:
        reference = None
        if not args.no_reference:
            reference = os.path.join(work, "reference")
            code, stderr, _ = run_hpcalign(reference)
            if code != 0:
                raise SystemExit(f"the uninterrupted run failed: {error_line(stderr)}")
        rows = [run_fault(fault, work, reference) for fault in args.faults or FAULTS]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        if row["verdict"] == "bad":
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps({
        "faults": rows,
        "bad": sum(row["verdict"] == "bad" for row in rows),
        "steps": STEPS, "fault_step": FAULT_STEP, "tmpfs": TMPFS_SIZE,
        "leave_bytes": LEAVE_BYTES,
        "wall_s": round(time.perf_counter() - began, 1),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "load1": round(os.getloadavg()[0], 2)},
    }))


if __name__ == "__main__":
    main()
