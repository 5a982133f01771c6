"""Config loading: YAML + overrides → checked Config; every error names key, value, expectation."""

import os

import pytest
import yaml

from hpcalign.cli import main as cli_main
from hpcalign.config.load import dump_config, load_config
from hpcalign.errors import ConfigError

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_quickstart_loads_and_overrides_apply():
    cfg = load_config(QUICKSTART, ["trainer.lr=1e-5", "run_dir=/tmp/x", "generator.top_k=5"])
    assert cfg.trainer.lr == 1e-5
    assert cfg.run_dir == "/tmp/x"
    assert cfg.model.path == "/tmp/x/base-model"  # ${run_dir} interpolation follows overrides
    assert cfg.generator.top_k == 5


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["trainer.lrr=1"])
    assert "trainer.lrr: unknown key (did you mean 'trainer.lr'?)" in str(err.value)


def test_unknown_nested_slurm_key(tmp_path):
    with pytest.raises(ConfigError, match=r"slurm.train.partiton: unknown key \(did you mean "
                                          r"'slurm.train.partition'\?\)"):
        load_config(QUICKSTART, ["slurm.train.partiton=x"])


def test_wrong_type_names_key_value_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["trainer.steps=many"])
    text = str(err.value)
    assert "trainer.steps='many'" in text and "valid integer" in text
    assert "GRPO steps" in text  # the field's description says what is expected


def test_out_of_range_values_are_all_reported():
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["trainer.lr=-1", "generator.top_p=1.5"])
    text = str(err.value)
    assert "2 invalid value(s)" in text
    assert "trainer.lr=-1" in text and "greater than 0" in text
    assert "generator.top_p=1.5" in text and "less than or equal to 1" in text


def test_cross_field_rule_is_explained():
    with pytest.raises(ConfigError, match="prompts_per_step=16 must be a multiple of generator.ranks=3"):
        load_config(QUICKSTART, ["generator.ranks=3"])


def test_ppo_kl_control_keys_are_checked():
    cfg = load_config(QUICKSTART, ["algorithm=ppo", "ppo.kl_ctrl.type=adaptive",
                                   "ppo.kl_ctrl.target_kl=0.2", "ppo.kl_ctrl.horizon=500"])
    assert (cfg.ppo.kl_ctrl.type, cfg.ppo.kl_ctrl.target_kl, cfg.ppo.kl_ctrl.horizon) == \
        ("adaptive", 0.2, 500)
    with pytest.raises(ConfigError, match="ppo.kl_ctrl.type=adaptive with ppo.kl_coef=0 never"):
        load_config(QUICKSTART, ["algorithm=ppo", "ppo.kl_ctrl.type=adaptive", "ppo.kl_coef=0"])
    with pytest.raises(ConfigError, match="ppo.kl_ctrl.type='pid'"):
        load_config(QUICKSTART, ["ppo.kl_ctrl.type=pid"])


def test_ppo_data_parallel_needs_a_sample_per_minibatch():
    cfg = load_config(QUICKSTART, ["algorithm=ppo", "trainer.ranks=2", "generator.ranks=2"])
    assert cfg.trainer.ranks == 2
    with pytest.raises(ConfigError, match=r"share of a step \(4 samples.*into "
                                          r"ppo.minibatches=8"):
        load_config(QUICKSTART, ["algorithm=ppo", "trainer.ranks=4", "generator.ranks=2",
                                 "generator.prompts_per_step=2", "ppo.minibatches=8"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="model.path: required key is missing"):
        load_config(write(tmp_path, "run_dir: x\nmodel: {}\n"))


def test_bad_yaml_and_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run_dir: [unclosed\n"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(QUICKSTART, ["trainer.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_prints_one_line_error_without_traceback(capsys):
    assert cli_main(["run", QUICKSTART, "trainer.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'trainer.lr'" in err
    assert "Traceback" not in err


def test_dump_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["run_dir=/tmp/y"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(str(path))
    assert again == cfg
    assert yaml.safe_load(path.read_text())["model"]["path"] == "/tmp/y/base-model"
