"""Fuzzed configs (tools/faults/fuzz_configs.py): no traceback, no invalid config accepted,
no shell injection; plus one test per bug the fuzzer found.

The fuzzer runs in this process through `hpcalign.cli.main` (`submit --dry-run` and `run`
up to mpiexec) and runs every accepted sbatch script in bash with stub Slurm commands.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest

from hpcalign.cli import main as cli_main
from hpcalign.config.load import dump_config, load_config
from hpcalign.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "faults", "fuzz_configs.py")
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def load_tool():
    spec = importlib.util.spec_from_file_location("fuzz_configs", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_configs"] = module
    spec.loader.exec_module(module)
    return module


fuzz = load_tool()


def test_fuzzed_configs_are_refused_by_name_or_accepted_and_quoted(tmp_path) -> None:
    summary = fuzz.fuzz(240, seed=1, work=str(tmp_path))
    failures = summary.pop("failures")
    assert failures == [], failures[:3]
    for bad in ("traceback", "invalid_accepted", "valid_rejected", "unnamed_error", "injection",
                "roundtrip"):
        assert summary[bad] == 0, (bad, summary)
    kinds = summary["kinds"]
    assert set(kinds) == set(fuzz.KINDS) and all(k["configs"] >= 30 for k in kinds.values())
    for kind in ("wrong_type", "unknown_key", "out_of_range", "yaml_syntax"):
        assert kinds[kind]["rejected_named"] >= kinds[kind]["configs"], kind  # run and submit
    assert kinds["valid"]["accepted"] == 2 * kinds["valid"]["configs"]
    assert kinds["hostile_string"]["accepted"] > kinds["hostile_string"]["configs"]
    assert kinds["hostile_string"]["rejected_named"] > 0  # newlines, NUL, bad names
    bases = fuzz.bases(f"{fuzz.SANDBOX}/bin/python")
    assert set(fuzz._hostile_fields(bases["quickstart"])) <= set(summary["hostile_fields"])
    assert summary["injection_checked"] >= 60


def test_the_injection_oracle_sees_an_unquoted_value(tmp_path, monkeypatch) -> None:
    """The oracle can fail: with shlex.quote gone from the job body, `$(touch MARKER)` runs."""
    import hpcalign.launch.sbatch_text as sbatch_text

    case = fuzz.hostile_case(0, "run_dir", "a $(touch MARKER) b")
    assert fuzz.run_case(case, str(tmp_path))["ok"]
    monkeypatch.setattr(sbatch_text, "shlex", types.SimpleNamespace(quote=lambda s: s))
    result = fuzz.run_case(fuzz.hostile_case(1, "run_dir", "a $(touch MARKER) b"), str(tmp_path))
    assert not result["ok"] and result["injection"]


def test_sbatch_line_in_a_setup_line_keeps_the_het_header(tmp_path) -> None:
    """Bug: a setup line `#SBATCH ...` made insert_het_components put component 1's header
    inside the quoted setup string (no het job, and the setup code changed)."""
    for field in ("slurm.gen.setup", "slurm.setup"):
        case = fuzz.hostile_case(0, field, "x\n#SBATCH --partition=evil\n$(touch MARKER)")
        result = fuzz.run_case(case, str(tmp_path))
        assert result["ok"], result


# ---------------------------------------------------------------- the bugs it found


def error_of(overrides: list[str], path: str = QUICKSTART) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


@pytest.mark.parametrize("override, key", [
    ("comm.timeout_s=inf", "comm.timeout_s"),
    ("trainer.lr=.nan", "trainer.lr"),
    ("slurm.train.mem_gb=inf", "slurm.train.mem_gb"),  # was an OverflowError in submit
])
def test_non_finite_numbers_are_refused(override: str, key: str) -> None:
    assert f"{key}=" in error_of([override]) and "finite" in error_of([override])


def test_mem_gb_inf_is_a_config_error_in_submit(capsys) -> None:
    assert cli_main(["submit", QUICKSTART, "slurm.train.mem_gb=inf", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "slurm.train.mem_gb" in err and "Traceback" not in err


@pytest.mark.parametrize("override", ["trainer.steps=true", "slurm.gen.time_min=false",
                                      "trainer.lr=true"])
def test_a_boolean_is_not_a_number(override: str) -> None:
    key = override.split("=")[0]
    assert f"{key}=" in error_of([override]) and "a boolean is not a number" in error_of([override])


def test_booleans_still_read_as_booleans() -> None:
    assert load_config(QUICKSTART, ["slurm.train.exclusive=true"]).slurm.train.exclusive is True


def test_nul_bytes_are_refused_by_key(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('run_dir: /r\nmodel:\n  path: "/m\\0"\n'
                    'launcher:\n  mpiexec_args: ["ok", "a\\0b"]\n')
    text = error_of([], str(path))
    assert "launcher.mpiexec_args[1]: NUL bytes" in text and "model.path: NUL bytes" in text


def test_not_utf8_and_not_a_mapping_are_config_errors(tmp_path) -> None:
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"run_dir: x\nname: \xff\xfe\n")
    assert "not UTF-8" in error_of([], str(binary))  # was a UnicodeDecodeError
    listed = tmp_path / "l.yaml"
    listed.write_text("- a\n- b\n")
    assert "expected a mapping" in error_of([], str(listed))  # was a TypeError from merge


def test_literal_interpolation_survives_the_run_dir_dump(tmp_path) -> None:
    """Bug: `model.path: '\\${x}'` means the text `${x}`; RUN_DIR/config.yaml held `${x}`,
    which the ranks' load_config then tried to resolve."""
    cfg = load_config(QUICKSTART, [r"model.path=/m/\${x}", r"slurm.python=/a\\\${b}/py"])
    assert cfg.model.path == "/m/${x}" and cfg.slurm.python == "/a\\${b}/py"
    dumped = tmp_path / "config.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(str(dumped)) == cfg


def test_model_init_shapes_are_checked_at_load() -> None:
    assert "model.init.kv_heads=3 must divide model.init.heads=4" in error_of(
        ["model.init.kv_heads=3"])
    assert "model.init.hidden=130 must be a multiple of heads" in error_of(
        ["model.init.hidden=130"])


def test_unknown_task_name_is_refused_at_load() -> None:
    assert "task.name='reverze' is not one of: reverse, add, jsonl" in error_of(
        ["task.name=reverze"])
