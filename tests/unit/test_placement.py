"""Placement: trainers first, then generators; rank names; thread split; plan.json."""

import json
import os
import stat

from hpcalign.config.load import load_config
from hpcalign.launch.rundir import write_run_dir
from hpcalign.plan.placement import compute_placement

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quickstart.yaml")


def test_roles_by_rank_and_names():
    cfg = load_config(QUICKSTART, ["trainer.ranks=2", "generator.ranks=4"])
    plan = compute_placement(cfg)
    assert plan.world_size == 6
    assert [plan.role_of(r) for r in range(6)] == ["trainer"] * 2 + ["generator"] * 4
    assert plan.generator.world_ranks() == [2, 3, 4, 5]
    assert plan.describe_rank(3) == "generator 1 (world rank 3)"
    assert plan.describe_rank(1) == "trainer 1 (world rank 1)"


def test_threads_follow_overlap():
    on_policy = compute_placement(load_config(QUICKSTART, ["trainer.threads=0"]))
    overlap = compute_placement(load_config(QUICKSTART, ["sync.max_staleness=1"]))
    cores = len(os.sched_getaffinity(0))
    assert on_policy.trainer.threads == max(1, cores)  # roles alternate: all cores each
    assert overlap.trainer.threads == max(1, cores // 2)  # roles overlap: they share
    explicit = compute_placement(load_config(QUICKSTART, ["generator.threads=3"]))
    assert explicit.generator.threads == 3


def test_run_dir_is_private_and_holds_config_and_plan(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(QUICKSTART, [f"run_dir={run_dir}"])
    write_run_dir(cfg)
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 2 and plan["generator"]["first_rank"] == 1
    assert load_config(str(run_dir / "config.yaml")) == cfg


def test_reward_model_placements_are_refused_by_name_where_no_flow_judges_with_it():
    import pytest

    from hpcalign.errors import ConfigError

    for algorithm in ("ppo", "online_dpo"):  # the flows that judge with models.reward
        for placement in ("colocated", "exclusive"):
            cfg = load_config(QUICKSTART, [f"algorithm={algorithm}", "models.reward.path=/rm",
                                           f"models.reward.placement={placement}"])
            plan = compute_placement(cfg)
            assert plan.world_size == (3 if placement == "exclusive" else 2)
    with pytest.raises(ConfigError, match="algorithm=grpo learns from the reward functions"):
        load_config(QUICKSTART, ["models.reward.path=/rm"])
    with pytest.raises(ConfigError, match="only algorithm=ppo or online_dpo judges"):
        load_config(QUICKSTART, ["algorithm=examples_flow:Flow", "models.reward.path=/rm",
                                 "models.reward.placement=exclusive"])


PPO_TINY = os.path.join(os.path.dirname(QUICKSTART), "ppo-tiny.yaml")


def test_model_map_shows_every_model_of_ppo_where_it_runs(tmp_path):
    """plan.json's model_map: the four PPO models, their engines, ranks, degrees and (for
    the policy's two sides) het component, partition and nodes."""
    cfg = load_config(PPO_TINY, [f"run_dir={tmp_path / 'run'}", "model.path=/sft",
                                 "models.reward.path=/rm", "models.reward.placement=exclusive",
                                 "trainer.ranks=2", "generator.ranks=2",
                                 "slurm.gen.nodes=2"])  # slurm.gen given in part
    write_run_dir(cfg)
    models = json.loads((tmp_path / "run" / "plan.json").read_text())["model_map"]
    assert list(models) == ["policy", "reference", "reward", "value"]
    train, gen = models["policy"]["runs_on"]
    assert (train["world_ranks"], train["dp"], train["slurm"]) == (
        [0, 1], 2, {"component": "train", "partition": "train", "nodes": 1})
    assert (gen["world_ranks"], gen["slurm"]) == (
        [2, 3], {"component": "gen", "partition": "gen", "nodes": 2})
    assert models["policy"]["engines"] == {"training": "torch", "generation": "torch"}
    assert models["reference"]["colocated_with"] == "policy"
    assert models["reference"]["runs_on"][0]["world_ranks"] == [0, 1]
    assert models["reward"]["placement"] == "exclusive" and not models["reward"]["trainable"]
    assert models["reward"]["runs_on"][0]["world_ranks"] == [4]
    assert models["value"]["trainable"] and models["value"]["path"] == "/rm"  # from the RM
    assert (models["value"]["runs_on"][0]["world_ranks"],
            models["value"]["runs_on"][0]["dp"]) == ([0, 1], 2)
    grpo = load_config(QUICKSTART, [f"run_dir={tmp_path / 'grpo'}"])
    write_run_dir(grpo)
    assert list(json.loads((tmp_path / "grpo" / "plan.json").read_text())["model_map"]) == \
        ["policy", "reference"]


def test_submit_dry_run_lists_the_models_on_stderr_and_the_script_on_stdout(capsys):
    from hpcalign.cli import main as cli_main

    rc = cli_main(["submit", PPO_TINY, "--dry-run", "run_dir=/tmp/x", "model.path=/sft",
                   "models.reward.path=/rm"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.startswith("#!/bin/bash")
    lines = err.splitlines()
    assert lines[0] == "models:"
    assert lines[1].split()[:2] == ["policy", "trainable"]
    assert "partition 'train'" in lines[1] and "partition 'gen'" in lines[1]
    assert [line.split()[0] for line in lines[1:]] == ["policy", "reference", "reward", "value"]
    assert "colocated with policy" in lines[3]
