"""Fuzzed configs through `hpcalign submit --dry-run` and `hpcalign run`'s validation;
prints ONE JSON line of outcomes.

    python tools/faults/fuzz_configs.py 1000                # the figure (~1-3 min)
    python tools/faults/fuzz_configs.py 300 --seed 1        # what the unit test runs

Every config starts from a real example (configs/quickstart.yaml, configs/grpo-hf.yaml with
its three `???` given), resolved to a plain dict, and gets ONE mutation whose verdict is
known in advance:

- `wrong_type`: a leaf of the schema (found by walking `Config.model_fields`) set to a value
  of another type (a string for a number, a bool for an int, a list for a string, ...);
- `unknown_key`: a typo'd or made-up key, at the top or in a nested section;
- `out_of_range`: past a bound the schema declares (ge/gt/le), NaN/inf, or a cross-field
  rule (prompts_per_step vs ranks, max_len < min_len, weights per function, kv_heads vs
  heads, prompts from two places, slurm tasks vs ranks: `submit` only);
- `yaml_syntax`: the YAML text broken (unclosed brackets, tabs, bad indentation, duplicate
  keys, a `!!python/...` tag that would run `touch MARKER`, bytes that are not UTF-8,
  a list at the top, deep nesting, a bad interpolation);
- `hostile_string`: a string field that is valid by the schema (run_dir, model.path,
  slurm.python, job_name, partition/account/qos/constraint/reservation, sbatch_args values,
  srun_args, the setup lines, slurm.env values, launcher.mpiexec_args) or a dict key set to
  quotes, `$(touch MARKER)`, backticks, `;`, globs, unicode, control characters, newlines,
  NUL; newline/CR where a shell or #SBATCH line would break, `%` in run_dir, NUL anywhere
  and bad env/flag names must be refused, everything else accepted;
- `valid`: a change that stays valid (more ranks with matching slurm tasks, memory, flags),
  and the unmutated bases: must be accepted.
Some mutations arrive as `key=value` overrides instead of YAML edits.

Each config goes through the real CLI entry `hpcalign.cli.main` in this process (stdout and
stderr captured, SystemExit caught) twice: `submit CONFIG --dry-run` and `run CONFIG`, where
`run` stops right before it would claim RUN_DIR and start mpiexec (`run_local` is replaced
by `mpiexec_command`, the pure argv builder, so placement is checked too). Verdicts:
`accepted`, `rejected_named` (exit 2, `hpcalign CMD: error: ...`, the message names the
key, or for broken YAML the file and line), `traceback` (an uncaught exception or a
"Traceback" in the output), `invalid_accepted`, `valid_rejected`, `unnamed_error`.

Injection oracle, for every config `submit --dry-run` accepts: the printed sbatch script
is checked with `bash -n`, then run with bash (10 s bound) in a sandbox whose PATH starts
with stub `srun`/`sbatch`/`scontrol`/`squeue`/`scancel`/`mpiexec`/`python` that record
their argv and environment and exit 0 (`slurm.python` always points at a stub); both rank
command lines srun was given are then run the same way (that is where the per-component
setup lines run). `injection` counts configs where a MARKER file appeared anywhere in the
sandbox or the cwd, or a value did not arrive byte for byte: each #SBATCH line one shell
word equal to its config value, srun's argv exactly as expected (srun_args as single
arguments, run_dir, python), the env exported, the setup lines' printf output equal to the
hostile value. `roundtrip` counts accepted configs whose resolved dump
(`dump_config`, RUN_DIR/config.yaml) does not load back equal (what the ranks read).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from hpcalign.cli import main as cli_main
from hpcalign.config.load import dump_config, load_config
from hpcalign.config.schema import Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("wrong_type", "unknown_key", "out_of_range", "yaml_syntax", "hostile_string", "valid")
VERDICTS = ("accepted", "rejected_named", "traceback", "invalid_accepted", "valid_rejected",
            "unnamed_error")
BASH_TIMEOUT_S = 10.0
MARKER = "MARKER"

# (what the YAML holds, the literal value it means): OmegaConf reads `\${` as a literal `${`
HOSTILE = [
    "$(touch MARKER)", "`touch MARKER`", "a; touch MARKER", "x' ; touch MARKER ; '",
    'x" ; touch MARKER ; "', "it's \"quoted\"", "a && touch MARKER || touch MARKER",
    "| touch MARKER", "> MARKER", "$'\\x41' \\ back\\slash\\", "*", "?[a-z]*", "~root",
    "!! !$ !-1", "${IFS}touch${IFS}MARKER", "$HOME $$ $0 $@", "-rf", "--partition=evil",
    "  leading and trailing spaces  ", "tab\there", "ünïcødé ✓ 训练 🚀", "rtl\u202eoverride",
    "zero\u200bwidth", "vt\x0bff\x0c", "nel\x85ls\u2028ps\u2029", "esc\x1b[31mred",
    "#SBATCH --partition=evil", "%j %t %A", "a=b=c", "",
    "x" * 2000, "line\n#SBATCH --partition=evil\n$(touch MARKER)", "cr\rcr",
    "nul\0byte", "lit ${run_dir} \\${x}",
]
_ALPHABET = "ab/-_.:=,@+ '\"$()`;&|<>*?[]{}~!#\\\t%^\u00e9\u4e2d\U0001f600\x7f\x0b"


def random_hostile(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(HOSTILE)
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 40)))


def omegaconf_escape(literal: str) -> str:
    """The YAML string OmegaConf resolves to `literal` (`${` is its interpolation)."""
    return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", literal)


# ---------------------------------------------------------------------------- the schema


def leaves(model: type[BaseModel], data: dict, prefix: tuple = ()) -> list[tuple]:
    """(path, annotation, field) for every field under `model` that `data` holds."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        args = typing.get_args(ann)
        nested = [a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        value = data.get(name)
        if nested and isinstance(value, dict):
            out += leaves(nested[0], value, prefix + (name,))
        elif not nested:
            out.append((prefix + (name,), ann, field))
    return out


def kind_of(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        return kind_of([a for a in args if a is not type(None)][0])
    if origin is typing.Literal:
        return "literal"
    if origin in (list, tuple, dict):
        return origin.__name__
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(ann, "other")


WRONG = {
    "int": ["many", 2.5, [1], {"n": 1}, True, "12abc"],
    "float": ["fast", [1.0], {"x": 1}, True, "1e-3x"],
    "bool": ["maybe", 2, [True], {"b": 1}, 0.5],
    "str": [123, 1.5, True, ["a", "b"], {"s": "t"}],
    "literal": ["bogus-choice", 7, ["torch"]],
    "list": ["not a list", [1, 2], {"k": "v"}, [["nested"]]],
    "tuple": ["x", [1.0], [1.0, 2.0, 3.0], ["a", "b"]],
    "dict": ["not a dict", ["a"], {"K": 1}, {"K": ["v"]}],
}


def bounds(field: Any) -> dict[str, float]:
    found = {}
    for meta in field.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(meta, name, None) is not None:
                found[name] = getattr(meta, name)
    return found


def get(data: dict, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def put(data: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    data[path[-1]] = value


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


# ---------------------------------------------------------------------------- the cases


def bases(stub_python: str) -> dict[str, dict]:
    """The example configs, resolved, with slurm.python at the sandbox stub."""
    grpo_hf = ["model.path=/data/my-model", "data.train=/data/train.jsonl",
               "reward.functions=[math_verify]"]
    out = {}
    for name, overrides in (("quickstart", []), ("grpo-hf", grpo_hf)):
        cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), overrides)
        data = cfg.model_dump(mode="json")
        data["slurm"]["python"] = stub_python
        out[name] = data
    return out


SANDBOX = "@SANDBOX@"  # replaced by the case's own sandbox directory


def make_case(i: int, rng: random.Random, base_dicts: dict[str, dict]) -> dict:
    """One mutated config with its expected verdicts (`run`, `submit`: accept | reject)."""
    base_name = ("quickstart", "grpo-hf")[(i // len(KINDS)) % 2]  # each kind sees both
    data = copy.deepcopy(base_dicts[base_name])
    data["run_dir"] = f"{SANDBOX}/run"
    kind = KINDS[i % len(KINDS)]
    case = {"i": i, "base": base_name, "kind": kind, "overrides": [],
            "expect": {"run": "accept", "submit": "accept"}, "keys": [], "what": "",
            "hostile": None}
    MUTATIONS[kind](case, data, rng)
    case["data"] = data
    return case


def hostile_case(i: int, field: str, value: str, base: str = "quickstart",
                 stub_python: str = f"{SANDBOX}/bin/python") -> dict:
    """The `hostile_string` case of `field` := `value` (tests use it for chosen values)."""
    data = copy.deepcopy(bases(stub_python)[base])
    data["run_dir"] = f"{SANDBOX}/run"
    case = {"i": i, "base": base, "kind": "hostile_string", "overrides": [],
            "expect": {"run": "accept", "submit": "accept"}, "keys": [], "what": "",
            "hostile": None}
    _mutate_hostile_string(case, data, random.Random(i), field, value)
    case["data"] = data
    return case


def _reject(case: dict, *keys: str, submit_only: bool = False) -> None:
    case["expect"] = {"run": "accept" if submit_only else "reject", "submit": "reject"}
    case["keys"] = list(keys)


def _override_ok(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, str)
                                               and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", value))


def _mutate_wrong_type(case: dict, data: dict, rng: random.Random) -> None:
    path, ann, _ = rng.choice(leaves(Config, data))
    value = rng.choice(WRONG.get(kind_of(ann), WRONG["str"]))
    case["what"] = f"{dotted(path)}: {json.dumps(value)[:80]}"
    _reject(case, dotted(path))
    if _override_ok(value) and not isinstance(value, bool) and rng.random() < 0.4:
        case["overrides"].append(f"{dotted(path)}={value}")
    else:
        put(data, path, value)


def _mutate_unknown_key(case: dict, data: dict, rng: random.Random) -> None:
    sections = [()] + sorted({p[:-1] for p, _, _ in leaves(Config, data) if len(p) > 1})
    section = rng.choice(sections)
    names = list(get(data, section)) if section else list(data)
    if rng.random() < 0.5 and names:  # a typo of a key that exists
        name = rng.choice(names)
        key = name[:-1] + name[-1] * 2 if len(name) > 1 else name + "x"
    else:
        key = rng.choice(["bogus", "extra_option", "lrr", "partiton", "GPUs", "ranks_", "Steps"])
    if key in names:
        key += "_unknown"
    path = section + (key,)
    case["what"] = f"unknown key {dotted(path)}"
    _reject(case, dotted(path))
    if rng.random() < 0.3:
        case["overrides"].append(f"{dotted(path)}=1")
    else:
        put(data, path, rng.choice([1, "x", True, None, [1], {"a": 1}]))


def _cross_field(data: dict, base: str) -> list[tuple[str, dict, list[str], bool]]:
    """(what, changes, keys one of which the error must name, submit only)."""
    rules = [
        ("generator.ranks=3 vs prompts_per_step=16", {("generator", "ranks"): 3},
         ["generator.prompts_per_step", "generator.ranks"], False),
        ("trainer.ranks=2 but slurm.train has 1 task", {("trainer", "ranks"): 2},
         ["slurm.train", "trainer.ranks"], True),
        ("slurm.gen.nodes=2 for 1 generator rank", {("slurm", "gen", "nodes"): 2},
         ["slurm.gen", "generator.ranks"], True),
        ("sbatch_args sets a managed flag", {("slurm", "train", "sbatch_args"): {"time": "5"}},
         ["slurm.train.sbatch_args"], True),
        ("env name reserved", {("slurm", "env"): {"SLURM_JOB_ID": "1"}}, ["slurm.env"], True),
        ("env name not an identifier", {("slurm", "env"): {"1BAD-NAME": "1"}},
         ["slurm.env"], True),
        ("sbatch flag name invalid", {("slurm", "gen", "sbatch_args"): {"x; touch MARKER": "1"}},
         ["slurm.gen.sbatch_args"], True),
        ("'%' in run_dir", {("run_dir",): f"{SANDBOX}/run-%j"}, ["run_dir"], True),
    ]
    if base == "quickstart":
        rules += [
            ("task.max_len < task.min_len", {("task", "min_len"): 7}, ["task.max_len", "task.min_len"],
             False),
            ("data.eval without data.train", {("data", "eval"): "/data/eval.jsonl"}, ["data.eval"],
             False),
            ("data.train and a task", {("data", "train"): "/d.jsonl",
                                       ("reward", "functions"): ["math_verify"]}, ["data.train"],
             False),
            ("model.init.kv_heads=3 does not divide heads=4", {("model", "init", "kv_heads"): 3},
             ["model.init.kv_heads"], False),
            ("model.init.hidden=130 not a multiple of heads=4", {("model", "init", "hidden"): 130},
             ["model.init.hidden"], False),
            ("unknown task name", {("task", "name"): "reverze"}, ["task.name"], False),
        ]
    else:
        rules += [
            ("two weights for one function", {("reward", "weights"): [1.0, 2.0]},
             ["reward.weights"], False),
            ("data.train without reward.functions", {("reward", "functions"): []},
             ["data.train", "reward.functions"], False),
        ]
    return rules


def _mutate_out_of_range(case: dict, data: dict, rng: random.Random) -> None:
    if rng.random() < 0.3:
        what, changes, keys, submit_only = rng.choice(_cross_field(data, case["base"]))
        for path, value in changes.items():
            put(data, path, value)
        case["what"] = what
        _reject(case, *keys, submit_only=submit_only)
        return
    numeric = [(p, a, f) for p, a, f in leaves(Config, data)
               if kind_of(a) in ("int", "float") and (bounds(f) or kind_of(a) == "float")]
    path, ann, field = rng.choice(numeric)
    bound = bounds(field)
    is_float = kind_of(ann) == "float"
    choices = []
    if "ge" in bound:
        choices.append(bound["ge"] - (rng.choice([0.5, 1.0, 1e9]) if is_float
                                      else rng.choice([1, 2, 10**6])))
    if "gt" in bound:
        choices.append(bound["gt"] - (rng.choice([0, 1]) if not is_float
                                      else rng.choice([0.0, 1e-3, 1.0])))
    if "le" in bound:
        choices.append(bound["le"] + (0.5 if is_float else 1))
    if is_float:
        choices += [float("nan"), float("inf"), float("-inf")]
    value = rng.choice(choices)
    case["what"] = f"{dotted(path)}={value!r} (bounds {bound})"
    _reject(case, dotted(path))
    if rng.random() < 0.3 and value == value and abs(value) != float("inf"):
        case["overrides"].append(f"{dotted(path)}={value}")
    else:
        put(data, path, value)


YAML_BREAKS = [
    ("unclosed flow sequence", lambda t: t + "trainer_extra: [1, 2\n", ["line"]),
    ("unclosed flow mapping", lambda t: t.replace("\ntrainer:\n", "\ntrainer: {steps: 3\n", 1),
     ["line"]),
    ("tab indentation", lambda t: t.replace("\n  ", "\n\t", 1), ["line"]),
    ("bad indentation", lambda t: t.replace("\n  ", "\n   ", 3).replace("\n   ", "\n  ", 1),
     ["line"]),
    ("unterminated quote", lambda t: t + 'job: "abc\n', ["line"]),
    ("duplicate key", lambda t: t + "seed: 5\n", ["seed", "line"]),
    ("python tag", lambda t: t + "evil: !!python/object/apply:os.system ['touch MARKER']\n",
     ["line", "evil"]),
    ("not utf-8", lambda t: t.encode() + b"\nname: \xff\xfe\xfa\n", ["utf-8", "UTF-8", "line",
                                                                     "byte"]),
    ("a list at the top", lambda t: "- a\n- b\n", ["mapping", "top"]),
    ("a scalar at the top", lambda t: "just a string\n", ["mapping", "top", "run_dir"]),
    ("deep nesting", lambda t: t + "deep: " + "[" * 3000 + "]" * 3000 + "\n",
     ["deep", "line", "nest"]),
    ("bad interpolation", lambda t: t.replace("seed: ", "seed: ${nope", 1), ["seed"]),
    ("missing colon", lambda t: t.replace("\nseed: ", "\nseed ", 1), ["line"]),
    ("empty file", lambda t: "", ["run_dir"]),
    ("non-string key", lambda t: t + "? [a, b]\n: c\n", ["line", "key", "[a, b]", "['a', 'b']"]),
    ("stray document", lambda t: t + "---\nother: doc\n", ["line", "document"]),
    ("alias to nothing", lambda t: t + "ref: *nothing\n", ["line", "nothing"]),
]


def _mutate_yaml_syntax(case: dict, data: dict, rng: random.Random) -> None:
    what, breaker, keys = YAML_BREAKS[(case["i"] // len(KINDS)) % len(YAML_BREAKS)]
    case["what"], case["text_breaker"] = what, what
    _reject(case, *keys)


def _hostile_fields(data: dict) -> list[str]:
    fields = ["run_dir", "model.path", "slurm.python", "slurm.job_name", "slurm.setup",
              "slurm.env.value", "slurm.env.key", "launcher.mpiexec_args"]
    for comp in ("train", "gen"):
        fields += [f"slurm.{comp}.{f}" for f in ("partition", "account", "qos", "constraint",
                                                  "reservation", "srun_args", "setup")]
        fields += [f"slurm.{comp}.sbatch_args.value", f"slurm.{comp}.sbatch_args.key"]
    if data.get("data", {}).get("train"):
        fields.append("data.train")
    return fields


# fields whose values go into an #SBATCH line or a shell word: newline/CR/NUL refused there
_LINE_CHECKED = {"run_dir", "slurm.python", "slurm.job_name", "slurm.env.value"} | {
    f"slurm.{c}.{f}" for c in ("train", "gen") for f in (
        "partition", "account", "qos", "constraint", "reservation", "srun_args",
        "sbatch_args.value")}


def _mutate_hostile_string(case: dict, data: dict, rng: random.Random, field: str | None = None,
                           value: str | None = None) -> None:
    if field is None:  # every field in turn, so that a few hundred configs cover them all
        fields = _hostile_fields(data)
        field = fields[(case["i"] // len(KINDS)) % len(fields)]
    value = random_hostile(rng) if value is None else value
    case["hostile"] = {"field": field, "value": value}
    case["what"] = f"{field} := {value!r}"[:200]
    key = field.removesuffix(".value").removesuffix(".key")
    if "\0" in value:  # no path, argv word or file holds a NUL: refused everywhere
        _reject(case, key)
    elif field in _LINE_CHECKED and ("\n" in value or "\r" in value):
        _reject(case, key, submit_only=True)
    elif field == "run_dir" and "%" in value:
        _reject(case, "run_dir", submit_only=True)
    elif field == "slurm.env.key" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        _reject(case, "slurm.env", submit_only=True)
    elif field.endswith("sbatch_args.key") and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", value):
        _reject(case, key, submit_only=True)
    if field == "run_dir":
        value = value.replace("..", "._.")  # stays inside the sandbox
        case["hostile"]["value"] = value
        put(data, ("run_dir",), f"{SANDBOX}/run/{value}")
    elif field == "slurm.python":
        case["hostile"]["value"] = value = value.replace("/", "_")[:100]
        put(data, ("slurm", "python"), f"{SANDBOX}/py/{value}/python")
    elif field in ("slurm.setup", "slurm.train.setup", "slurm.gen.setup"):
        out = field.replace(".", "-")
        line = f'printf %s {shlex.quote(value)} > "$STUB_OUT/{out}"'
        put(data, tuple(field.split(".")), ["true # a setup line before", line])
    elif field in ("slurm.train.srun_args", "slurm.gen.srun_args", "launcher.mpiexec_args"):
        put(data, tuple(field.split(".")), ["--first", value])
    elif field == "slurm.env.value":
        data["slurm"]["env"] = {"NCCL_DEBUG": "INFO", "FUZZ_VALUE": value}
    elif field == "slurm.env.key":
        data["slurm"]["env"] = {value: "1"}
    elif field.endswith("sbatch_args.value"):
        put(data, tuple(field.split(".")[:3]), {"comment": value})
    elif field.endswith("sbatch_args.key"):
        put(data, tuple(field.split(".")[:3]), {value: "1"})
    else:
        put(data, tuple(field.split(".")), value)


def _mutate_valid(case: dict, data: dict, rng: random.Random) -> None:
    choice = case["i"] // len(KINDS) % 9
    if choice == 0:
        case["what"] = "the example itself"
    elif choice == 1:
        data["generator"]["ranks"], data["slurm"]["gen"]["tasks_per_node"] = 2, 2
        data["trainer"]["ranks"], data["slurm"]["train"]["nodes"] = 2, 2
        case["what"] = "2 + 2 ranks with matching slurm tasks"
    elif choice == 2:
        data["slurm"]["train"].update(mem_gb=1.5, exclusive=True, gpus_per_node=4,
                                      reservation="resv", qos="high", account="proj-1")
        data["slurm"]["gen"].update(mem_gb=64, constraint="a100|h100", time_min=1)
        case["what"] = "memory, exclusive, gpus, reservation, qos, account, constraint"
    elif choice == 3:
        data["slurm"]["train"]["sbatch_args"] = {"comment": "run 1", "mail_type": "END"}
        data["slurm"]["gen"]["srun_args"] = ["--container-image=/img/x.sqsh", "--export=ALL"]
        data["slurm"]["env"] = {"NCCL_DEBUG": "INFO", "_UNDER": "x"}
        case["what"] = "sbatch_args, srun_args, env"
    elif choice == 4:
        data["sync"]["max_staleness"] = 3
        data["generator"].update(top_k=5, top_p=0.9, temperature=0.7)
        data["slurm"].update(signal_before_end_s=0, max_requeues=0)
        case["what"] = "staleness, sampling, no requeue"
    elif choice == 5:
        case["overrides"] += ["trainer.lr=1e-5", "generator.top_k=4", "slurm.gen.nodes=1"]
        case["what"] = "overrides"
    elif choice == 6:
        data["run_dir"] = f"{SANDBOX}/run/spaces and 'quotes'"
        data["slurm"]["job_name"] = "my job's \"name\""
        case["what"] = "quotes in run_dir and job_name"
    elif choice == 7:
        data["checkpoint"].update(every_steps=0, keep=1)
        data["log"].update(eval_every_steps=0, progress=False, tensorboard=False)
        data["comm"].update(timeout_s=0.5, dist_backend="gloo")
        case["what"] = "edges of the ranges"
    else:
        data["slurm"]["setup"] = ["module load x 2>/dev/null || true", "export A='b c'"]
        data["slurm"]["train"]["setup"] = ["cd /", "true"]
        case["what"] = "setup lines"


MUTATIONS = {"wrong_type": _mutate_wrong_type, "unknown_key": _mutate_unknown_key,
             "out_of_range": _mutate_out_of_range, "yaml_syntax": _mutate_yaml_syntax,
             "hostile_string": _mutate_hostile_string, "valid": _mutate_valid}

# ---------------------------------------------------------------------------- the sandbox

STUB = """#!/bin/sh
out="$STUB_OUT/{name}.$$"
printf '%s\\0' "$@" > "$out.argv"
env -0 > "$out.env"
exit 0
"""
STUB_NAMES = ("srun", "sbatch", "scontrol", "squeue", "sacct", "scancel", "mpiexec", "python",
              "python3")


def write_stub(path: str, name: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(STUB.format(name=name))
    os.chmod(path, 0o755)


def read_calls(out: str, name: str) -> list[tuple[list[str], dict[str, str]]]:
    calls = []
    for entry in sorted(os.listdir(out)):
        if entry.startswith(name + ".") and entry.endswith(".argv"):
            argv = open(os.path.join(out, entry), "rb").read().decode().split("\0")[:-1]
            env_path = os.path.join(out, entry[:-5] + ".env")  # watch-step: killed early
            env_raw = open(env_path, "rb").read().decode() if os.path.exists(env_path) else ""
            env = dict(item.split("=", 1) for item in env_raw.split("\0") if "=" in item)
            calls.append((argv, env))
    return calls


def sbatch_headers(text: str) -> list[dict[str, list[str]]]:
    """The #SBATCH flags of each het component ({flag: [values]}) as sbatch reads them: up
    to the first line that is neither blank nor a comment; each line must be one word."""
    comps: list[dict[str, list[str]]] = [{}]
    for row in text.split("\n"):  # NOT splitlines(): \x0b, \x85, \u2028 are no line ends
        if row.strip() and not row.startswith("#"):
            break
        if not row.startswith("#SBATCH "):
            continue
        words = shlex.split(row[len("#SBATCH "):])
        if len(words) != 1:
            raise AssertionError(f"#SBATCH line of {len(words)} words: {row[:200]!r}")
        if words[0] == "hetjob":
            comps.append({})
            continue
        key, _, value = words[0].partition("=")
        comps[-1].setdefault(key, []).append(value)
    return comps


def check_injection(case: dict, cfg: Config, script: str, sandbox: str) -> list[str]:
    """Run the script in the sandbox; what did not arrive intact (empty: nothing)."""
    problems = []
    run_dir, python = os.path.abspath(cfg.run_dir), cfg.slurm.python
    bin_dir, out, cwd = (os.path.join(sandbox, d) for d in ("bin", "out", "cwd"))
    for d in (out, cwd):
        os.makedirs(d, exist_ok=True)
    for name in STUB_NAMES:
        write_stub(os.path.join(bin_dir, name), name)
    write_stub(python, "python")
    # headers
    try:
        comps = sbatch_headers(script)
    except (AssertionError, ValueError) as err:
        return [f"header: {err}"]
    if len(comps) != 2:
        problems.append(f"{len(comps)} het components in the header")
    expected = [{"--partition": [cfg.slurm.train.partition], "--job-name": [cfg.slurm.job_name],
                 "--output": [f"{run_dir}/submitit/%j_0_log.out"],
                 "--error": [f"{run_dir}/submitit/%j_0_log.err"]},
                {"--partition": [cfg.slurm.gen.partition]}]
    for i, comp in enumerate((cfg.slurm.train, cfg.slurm.gen)):
        for flag in ("account", "qos", "constraint", "reservation"):
            if getattr(comp, flag) is not None:
                expected[i][f"--{flag}"] = [getattr(comp, flag)]
        for key, value in comp.sbatch_args.items():
            expected[i][f"--{key.replace('_', '-')}"] = [value]
    for i, flags in enumerate(expected[: len(comps)]):
        for flag, values in flags.items():
            if comps[i].get(flag) != values:
                problems.append(f"component {i} {flag}: {comps[i].get(flag)!r} != {values!r}")
    # the script itself
    path = os.path.join(sandbox, "job.sbatch")
    with open(path, "w") as handle:
        handle.write(script)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "STUB_OUT": out,
           "HOME": sandbox, "LC_ALL": "C.UTF-8"}
    for argv in (["bash", "-n", path], ["bash", path]):
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True,
                              timeout=BASH_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if proc.returncode:
            problems.append(f"{' '.join(argv[:-1])} exited {proc.returncode}: "
                            f"{proc.stderr.decode(errors='replace')[-300:]}")
            return problems
    sruns = read_calls(out, "srun")
    if len(sruns) != 1:
        return problems + [f"srun ran {len(sruns)} times"]
    srun_argv, srun_env = sruns[0]
    logs = f"{run_dir}/logs"

    def role(name: str, comp: Any) -> list[str]:
        return [f"--output={logs}/slurm-42.0-{name}-%t.out", *comp.srun_args, "bash", "-c",
                "\n".join(comp.setup) + '\nexec "$@"', f"{name}-setup", python, "-u", "-m",
                "hpcalign.roles.main", "--role", name, run_dir]

    want = ["--mpi=pmix", "--kill-on-bad-exit=1", *role("trainer", cfg.slurm.train), ":",
            *role("generator", cfg.slurm.gen)]
    if srun_argv != want:
        diff = next((j for j, (a, b) in enumerate(zip(srun_argv, want)) if a != b),
                    min(len(srun_argv), len(want)))
        problems.append(f"srun argv differs at {diff}: {srun_argv[diff:diff + 2]!r} != "
                        f"{want[diff:diff + 2]!r}")
        return problems
    for key, value in cfg.slurm.env.items():
        if srun_env.get(key) != value:
            problems.append(f"slurm.env.{key} arrived as {srun_env.get(key)!r}")
    pythons = [argv for argv, _ in read_calls(out, "python")]
    for step in (["claim", run_dir], ["after-step", "--rc", "0", run_dir]):
        if ["-m", "hpcalign.launch.slurm_job", *step] not in pythons:
            problems.append(f"python never got {step[0]} {run_dir!r}: {pythons!r}"[:300])
    # what srun would start: each component's setup, then its python
    for name, comp in (("trainer", cfg.slurm.train), ("generator", cfg.slurm.gen)):
        rank = role(name, comp)[1 + len(comp.srun_args):]
        proc = subprocess.run(rank, cwd=cwd, env=env, capture_output=True,
                              timeout=BASH_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if proc.returncode:
            problems.append(f"{name} rank exited {proc.returncode}: {proc.stderr[-300:]!r}")
    ranks = [argv for argv, _ in read_calls(out, "python") if "hpcalign.roles.main" in argv]
    for name in ("trainer", "generator"):
        if ["-u", "-m", "hpcalign.roles.main", "--role", name, run_dir] not in ranks:
            problems.append(f"the {name} rank's python got other arguments")
    hostile = case.get("hostile") or {}
    if hostile.get("field") in ("slurm.setup", "slurm.train.setup", "slurm.gen.setup"):
        got_path = os.path.join(out, hostile["field"].replace(".", "-"))
        got = open(got_path, "rb").read().decode() if os.path.exists(got_path) else None
        if got != hostile["value"]:
            problems.append(f"{hostile['field']} printed {got!r}"[:300])
    return problems


def markers(sandbox: str) -> list[str]:
    """MARKER files anywhere in the sandbox, or in the cwd (where a tag in the YAML would
    run `touch MARKER`)."""
    found = [os.path.join(os.getcwd(), f) for f in os.listdir(os.getcwd()) if MARKER in f]
    for dirpath, _, files in os.walk(sandbox):
        found += [os.path.join(dirpath, f) for f in files if MARKER in f]
    return found


# ---------------------------------------------------------------------------- verdicts


def call_cli(argv: list[str]) -> tuple[int | None, str, str, float, str | None]:
    """(exit code, stdout, stderr, seconds, exception) of `hpcalign ARGV` in this process."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    exc = None
    code: int | None = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException as error:  # noqa: BLE001 -- exactly what this tool counts
        exc = f"{type(error).__name__}: {error}"[:500]
    return code, out.getvalue(), err.getvalue(), time.perf_counter() - start, exc


def verdict(case: dict, command: str, code: int | None, out: str, err: str,
            exc: str | None) -> tuple[str, str]:
    if exc is not None or "Traceback" in out + err:
        return "traceback", exc or err[-500:]
    expect = case["expect"][command]
    if code == 0:
        return ("invalid_accepted" if expect == "reject" else "accepted"), ""
    prefix = f"hpcalign {command}: error: "
    if code != 2 or not err.startswith(prefix):
        return "unnamed_error", f"exit {code}: {err[-300:]}"
    if expect == "accept":
        return "valid_rejected", err[:300]
    if not any(key in err for key in case["keys"]):
        return "unnamed_error", err[:300]
    return "rejected_named", err[:200]


_RUN_ARGV: dict[str, list[str]] = {}


def _validate_only(cfg: Config) -> int:
    """`hpcalign run` up to the claim: the mpiexec argv (pure), never started."""
    from hpcalign.launch.local import mpiexec_command

    _RUN_ARGV["argv"] = mpiexec_command(cfg, os.path.abspath(cfg.run_dir), sys.executable,
                                        "mpiexec")
    return 0


def run_case(case: dict, work: str) -> dict:
    sandbox = os.path.join(work, f"sb-{case['i']:05d}")
    os.makedirs(sandbox)
    text_data = json.loads(json.dumps(case["data"]).replace(SANDBOX, sandbox))
    hostile = case.get("hostile")
    path = os.path.join(work, f"config-{case['i']:05d}.yaml")

    def escape(node: Any) -> Any:
        if isinstance(node, dict):
            return {escape(k): escape(v) for k, v in node.items()}
        if isinstance(node, list):
            return [escape(v) for v in node]
        return omegaconf_escape(node) if isinstance(node, str) else node

    # NOTE: PyYAML writes NEL / LINE SEPARATOR / PARAGRAPH SEPARATOR raw into a quoted
    # scalar with allow_unicode, and YAML folds them into a space when read back: the file
    # would then say another value than the case's. Such values go escaped ("\N", "\L").
    breaks = any(c in json.dumps(text_data, ensure_ascii=False, default=str) for c in "\x85\u2028\u2029")
    text = yaml.safe_dump(escape(text_data), sort_keys=False, allow_unicode=not breaks,
                          width=10**6)
    breaker = case.get("text_breaker")
    if breaker:
        text = dict((w, b) for w, b, _ in YAML_BREAKS)[breaker](text)
    with open(path, "wb") as handle:
        handle.write(text if isinstance(text, bytes) else text.encode())
    overrides = [o.replace(SANDBOX, sandbox) for o in case["overrides"]]
    result = {"i": case["i"], "kind": case["kind"], "base": case["base"], "what": case["what"],
              "hostile_field": (hostile or {}).get("field"),
              "verdicts": {}, "seconds": {}, "details": {}, "injection": [], "roundtrip": ""}
    import hpcalign.commands.run as run_command

    real_run_local = run_command.run_local
    run_command.run_local = _validate_only
    try:
        for command, argv in (("submit", ["submit", path, *overrides, "--dry-run"]),
                              ("run", ["run", path, *overrides])):
            _RUN_ARGV.clear()
            code, out, err, seconds, exc = call_cli(argv)
            name, detail = verdict(case, command, code, out, err, exc)
            result["verdicts"][command], result["seconds"][command] = name, round(seconds, 4)
            if detail:
                result["details"][command] = detail
            if command == "run" and name == "accepted" and hostile and \
                    hostile["field"] == "launcher.mpiexec_args":
                if _RUN_ARGV["argv"].count(hostile["value"]) != 1:
                    result["injection"].append("launcher.mpiexec_args not one mpiexec argument")
            if command == "submit" and name == "accepted":
                cfg = load_config(path, overrides)
                start = time.perf_counter()
                try:
                    result["injection"] += check_injection(case, cfg, out, sandbox)
                except subprocess.TimeoutExpired as err_:
                    result["injection"].append(f"timed out: {err_.cmd[:2]}")
                result["seconds"]["injection_check"] = round(time.perf_counter() - start, 4)
            if name == "accepted" and not result["roundtrip"]:
                result["roundtrip"] = roundtrip_problem(path, overrides, sandbox)
    finally:
        run_command.run_local = real_run_local
    found = markers(sandbox)
    if found:
        result["injection"].append(f"MARKER created: {found[:3]}")
    result["ok"] = not (result["injection"] or result["roundtrip"]) and all(
        v in ("accepted", "rejected_named") for v in result["verdicts"].values())
    if not result["ok"]:
        result["config_diff"] = case_diff(case)
    shutil.rmtree(sandbox, ignore_errors=True)
    return result


def roundtrip_problem(path: str, overrides: list[str], sandbox: str) -> str:
    """'' when RUN_DIR/config.yaml (dump_config) loads back equal, else what differs."""
    cfg = load_config(path, overrides)
    dumped = os.path.join(sandbox, "config.yaml")
    with open(dumped, "w") as handle:
        handle.write(dump_config(cfg))
    try:
        again = load_config(dumped)
    except Exception as err:  # noqa: BLE001
        return f"dump does not load: {type(err).__name__}: {err}"[:300]
    if again != cfg:
        a, b = cfg.model_dump(), again.model_dump()
        return f"dump loads as another config: {[k for k in a if a[k] != b[k]]}"
    return ""


def case_diff(case: dict) -> dict:
    out = {"what": case["what"], "base": case["base"]}
    if case["overrides"]:
        out["overrides"] = case["overrides"]
    if case.get("hostile"):
        out["hostile"] = case["hostile"]
    out["expect"] = case["expect"]
    return out


def fuzz(n: int, seed: int, work: str | None = None) -> dict:
    """Run n cases; the summary (what the tool prints) with `failures` (all of them)."""
    began = time.perf_counter()
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="hpcalign-fuzz-", dir=work)
    base_dicts = bases(f"{SANDBOX}/bin/python")
    results = []
    try:
        for i in range(n):
            results.append(run_case(make_case(i, rng, base_dicts), tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {v: 0 for v in VERDICTS}
    per_kind = {k: {"configs": 0, **{v: 0 for v in VERDICTS}} for k in KINDS}
    max_s: dict[str, float] = {}
    for r in results:
        per_kind[r["kind"]]["configs"] += 1
        for command, v in r["verdicts"].items():
            counts[v] += 1
            per_kind[r["kind"]][v] += 1
            max_s[v] = max(max_s.get(v, 0.0), r["seconds"][command])
    per_kind = {k: {name: c for name, c in row.items() if c or name == "configs"}
                for k, row in per_kind.items()}
    failures = [r for r in results if not r["ok"]]
    return {
        "configs": len(results), "cli_calls": sum(len(r["verdicts"]) for r in results),
        **counts,
        "injection": sum(bool(r["injection"]) for r in results),
        "injection_checked": sum("injection_check" in r["seconds"] for r in results),
        "roundtrip": sum(bool(r["roundtrip"]) for r in results),
        "hostile_fields": dict(sorted(collections.Counter(
            r["hostile_field"] for r in results if r.get("hostile_field")).items())),
        "kinds": per_kind,
        "max_verdict_s": {k: round(v, 3) for k, v in sorted(max_s.items())},
        "max_injection_check_s": round(max((r["seconds"].get("injection_check", 0.0)
                                            for r in results), default=0.0), 3),
        "seed": seed, "wall_s": round(time.perf_counter() - began, 1),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "load1": round(os.getloadavg()[0], 2)},
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", type=int, nargs="?", default=1000,
                        help="number of fuzzed configs (default 1000, the figure)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--show", type=int, default=5, help="failures shown in the JSON line")
    args = parser.parse_args()
    summary = fuzz(args.configs, args.seed, args.dir)
    failures = summary.pop("failures")
    for failure in failures:  # every failure, for a human, on stderr
        print(json.dumps(failure, ensure_ascii=False), file=sys.stderr)
    summary["failures"] = len(failures)
    summary["first_failures"] = [
        {k: f[k] for k in ("i", "kind", "verdicts", "details", "injection", "roundtrip",
                           "config_diff") if f.get(k)} for f in failures[: args.show]]
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
