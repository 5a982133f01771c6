"""The online flows beyond GRPO through the real roles (mpiexec, shards, weight sync):
PPO learns and resumes bitwise with its reward model and critic; OnlineDPO learns; a
user's flow by import path (examples/raft_flow.py) learns; a rank-dependent schedule is
refused at start-up."""

import os
import subprocess

import torch
from local_runs import (
    QUICKSTART,
    ROOT,
    TINY,
    assert_same_training,
    hpcalign_argv,
    kill_job,
    metrics,
    run_to_end,
    start_run,
    wait_for_step,
)
from safetensors.torch import load_file

SHAPE = ["model.init.hidden=128", "model.init.intermediate=512", "model.init.kv_heads=4",
         "generator.prompts_per_step=16", "generator.samples_per_prompt=4",
         "trainer.sft_warmup_steps=50", "trainer.sft_batch=64", "checkpoint.every_steps=0"]


def _rise(rows, window: int) -> tuple[float, float]:
    first = sum(r["reward_mean"] for r in rows[:window]) / window
    last = sum(r["reward_mean"] for r in rows[-window:]) / window
    return first, last


def test_ppo_learns_reverse_with_the_task_reward(tmp_path):
    """algorithm=ppo without a reward model: the task's reward scores, the critic starts
    from the policy (a new head); 100 steps (0.20 -> 0.30 at seed 1234 when written)."""
    run_dir = tmp_path / "ppo"
    run_to_end(run_dir, *SHAPE, "algorithm=ppo", "trainer.steps=100", "ppo.kl_coef=0.02",
               "ppo.value_lr=3e-4", timeout=600)
    rows = metrics(run_dir)
    assert {"vf_loss", "score_mean", "kl_k1", "pg_loss"} <= rows[-1].keys()
    first, last = _rise(rows, 20)
    assert last > first + 0.05, (first, last)


def test_online_dpo_learns_reverse(tmp_path):
    """algorithm=online_dpo: (best, worst) pairs of each group of 4, a DPO step a batch
    (0.20 -> 0.30 over 130 steps at seed 1234 when written)."""
    run_dir = tmp_path / "odpo"
    run_to_end(run_dir, *SHAPE, "algorithm=online_dpo", "trainer.steps=120", "dpo.beta=0.1",
               timeout=600)
    rows = metrics(run_dir)
    assert all(r["pairs"] + r["groups_without_preference"] == 16 for r in rows)
    assert {"rewards_chosen", "rewards_rejected", "preference_accuracy"} <= rows[-1].keys()
    first, last = _rise(rows, 30)
    assert last > first + 0.03, (first, last)


def _reward_checkpoint(base, out) -> None:
    """A user's scalar-head reward model, saved by transformers itself (the head seeded)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(out)


def _independent_judgement(run_dir, rm_dir, step: int) -> tuple[int, float]:
    """(groups with a preference, mean score) of a step's samples, each scored alone by
    transformers' model: the head on the last token's hidden state."""
    from transformers import AutoModelForSequenceClassification

    from hpcalign.data.shards import read_shard, shard_path

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    shard = read_shard(shard_path(str(run_dir), step, 0))
    scores, groups = [], {}
    with torch.no_grad():
        for i in range(len(shard)):
            ids = torch.tensor([[*shard.prompt_tokens[i], *shard.completion_tokens[i]]])
            hidden = model.model(input_ids=ids).last_hidden_state
            scores.append(float(model.score(hidden)[0, -1, 0]))
            groups.setdefault(int(shard.prompt_ids[i]), []).append(scores[-1])
    preferring = sum(max(g) != min(g) for g in groups.values())
    return preferring, sum(scores) / len(scores)


def test_online_dpo_judged_by_a_reward_model_on_the_trainer_or_its_own_rank(tmp_path):
    """models.reward with algorithm=online_dpo: the reward model, not the task's reward,
    judges each group (TRL's OnlineDPOTrainer with a reward_model), colocated on the
    trainer rank or exclusive on a rank of its own. Each step's pairs and mean score equal
    an independent scoring of the step's shard by transformers."""
    base, rm_dir = tmp_path / "base", tmp_path / "rm"
    subprocess.run(hpcalign_argv("init-model", str(base), "--hidden", "64", "--intermediate",
                                 "128", "--heads", "4", "--kv-heads", "2"),
                   check=True, capture_output=True, timeout=120, cwd=ROOT)
    _reward_checkpoint(base, rm_dir)
    for placement in ("colocated", "exclusive"):
        run_dir = tmp_path / placement
        run_to_end(run_dir, "algorithm=online_dpo", "trainer.steps=3",
                   f"model.path={base}", "model.init=null", f"models.reward.path={rm_dir}",
                   f"models.reward.placement={placement}")
        rows = metrics(run_dir)
        assert [r["step"] for r in rows] == [0, 1, 2], placement
        for row in rows:
            preferring, mean = _independent_judgement(run_dir, rm_dir, row["step"])
            assert row["pairs"] == preferring, (placement, row)
            assert abs(row["score_mean"] - mean) < 1e-4, (placement, row["score_mean"], mean)
        # continuous scores: every group of 4 prefers one sample (the task's reward ties)
        assert sum(r["pairs"] for r in rows) == 3 * 4, (placement, rows)


PPO_RM = ["algorithm=ppo", "trainer.steps=6", "checkpoint.every_steps=3",
          "trainer.sft_warmup_steps=5",
          # the adaptive KL coefficient moves every step (target far below the KL, short
          # horizon): a resume that lost it would shape step 4's rewards differently
          "ppo.kl_ctrl.type=adaptive", "ppo.kl_ctrl.target_kl=1e-4", "ppo.kl_ctrl.horizon=64"]


def test_ppo_with_a_reward_model_resumes_bitwise_critic_included(tmp_path):
    """A reward model (the base model with a seeded scalar head stands in for one from
    train-rm) scores the samples; the critic starts from it; the KL coefficient is
    adaptive. Killed after its step-3 checkpoint and resumed: policy, critic, KL
    coefficient and rollouts equal the uninterrupted run's."""
    whole = tmp_path / "whole"
    base = whole / "base-model"
    rm = [f"models.reward.path={base}", "models.reward.init=null"]
    run_to_end(whole, *PPO_RM, *rm)  # builds base-model first (model.init)
    resumed = tmp_path / "resumed"
    rm2 = [f"models.reward.path={base}", "models.reward.init=null"]
    proc = start_run(resumed, *PPO_RM, *rm2)
    wait_for_step(resumed, 4, proc)
    kill_job(proc)
    run_to_end(resumed, *PPO_RM, *rm2)
    assert_same_training(resumed, whole, 6)
    critic = "checkpoints/step-000006/models/value"
    for name in ("model/model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(os.path.join(d, critic, name)) for d in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(r["score_mean"] != 0 for r in metrics(whole))
    coefs = [r["kl_coef"] for r in metrics(whole)]
    assert coefs == [r["kl_coef"] for r in metrics(resumed)]
    assert len(set(coefs)) == len(coefs), coefs  # it moved at every step


def test_dynamic_sampling_refills_the_batch_with_informative_groups(tmp_path):
    """DAPO's dynamic sampling with generator.refill_rounds: the generator replaces groups
    whose rewards are all equal, so every shard is full of informative groups and the
    trainer drops none (unless the rounds ran out, which the shard records)."""
    import numpy as np

    from hpcalign.data.shards import read_shard, shard_path

    run_dir = tmp_path / "dapo"
    run_to_end(run_dir, "trainer.steps=4", "trainer.dynamic_sampling=true",
               "generator.refill_rounds=6", "trainer.sft_warmup_steps=0")
    refilled = 0
    for row in metrics(run_dir):
        shard = read_shard(shard_path(str(run_dir), row["step"], 0))
        ids = shard.prompt_ids
        groups = list(dict.fromkeys(ids.tolist()))
        for group in groups:
            rewards = shard.rewards[ids == group]
            assert len(rewards) == 4 and rewards.max() != rewards.min()
        refilled += int(shard.attrs["refill_rounds"])
        if int(shard.attrs["refill_rounds"]) < 6:
            assert len(groups) == 4 and row["groups_dropped"] == 0, row
        assert len(np.unique(ids)) == len(groups)
    assert refilled > 0  # an untrained model gives all-equal groups: the refill ran


EXAMPLES = os.path.join(ROOT, "examples")
HERE = os.path.dirname(os.path.abspath(__file__))


def _user_flow_run(run_dir, *overrides: str, check: bool = True):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [EXAMPLES, HERE, env.get("PYTHONPATH")]))
    argv = hpcalign_argv("run", QUICKSTART, f"run_dir={run_dir}", *overrides)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_user_flow_by_import_path_learns_reverse(tmp_path):
    """examples/raft_flow.py as its docstring runs it (quickstart, `algorithm:
    raft_flow:RaftFlow`, `flow.min_reward`): supervised steps on each group's best sample
    raise the sampled reward (0.20 -> 0.25 over 100 steps at seed 1234 when written), and
    the flow's own metrics reach metrics.jsonl. The flow names only the policy: no
    reference is built (no KL metric)."""
    run_dir = tmp_path / "raft"
    _user_flow_run(run_dir, "algorithm=raft_flow:RaftFlow", "flow.min_reward=0.5",
                   "trainer.steps=100", "checkpoint.every_steps=0", "log.progress=false",
                   "log.eval_every_steps=0", "log.tensorboard=false")
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(100))
    assert all(0 < r["raft_samples"] <= 16 and r["raft_best_reward_mean"] >= 0.5 for r in rows)
    assert all("kl" not in r for r in rows)
    first, last = _rise(rows, 20)
    assert last > first + 0.03, (first, last)


def test_a_schedule_that_differs_between_ranks_is_refused_at_start_up(tmp_path):
    """A flow whose schedule depends on the rank it runs on: the generator rank finds its
    digest differs from world rank 0's and the run fails naming it, before any collective
    (no hang: bounded by the test's timeout far below comm.startup_timeout_s's default)."""
    result = _user_flow_run(tmp_path / "bad", "algorithm=flow_fixtures:RankDependentFlow",
                            *TINY, check=False)
    assert result.returncode != 0
    assert "generator 0 (world rank 1) derived another schedule" in result.stderr, \
        result.stderr[-2000:]


def test_exclusive_reference_trains_bitwise_like_the_colocated_one(tmp_path):
    """models.reference.placement=exclusive puts the reference on a rank of its own (world
    rank 2, after the generator), serving the trainer's log-prob requests: the run's
    weights, optimizer and KL equal the colocated run's bitwise (same thread counts), and
    plan.json shows the model's ranks."""
    import json

    from local_runs import checkpoint_tensors

    run_to_end(tmp_path / "colocated", "trainer.steps=4", "checkpoint.every_steps=2")
    run_to_end(tmp_path / "exclusive", "trainer.steps=4", "checkpoint.every_steps=2",
               "models.reference.placement=exclusive")
    plan = json.loads((tmp_path / "exclusive" / "plan.json").read_text())
    assert plan["world_size"] == 3 and plan["models"]["reference"]["first_rank"] == 2
    one, two = (checkpoint_tensors(tmp_path / d, 4) for d in ("colocated", "exclusive"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert [r["kl"] for r in metrics(tmp_path / "exclusive")] == \
        [r["kl"] for r in metrics(tmp_path / "colocated")]


def test_ppo_with_exclusive_reference_and_reward_model_trains_bitwise_like_colocated(tmp_path):
    """PPO's four models, placed two ways: reference, reward model and critic on the
    trainer rank, or the reference and the reward model on ranks of their own (world ranks
    2 and 3) serving the trainer. Policy, critic (weights and optimizers) and the logged
    scores equal bit for bit after 3 steps."""
    import json

    from local_runs import checkpoint_tensors

    base = tmp_path / "colocated" / "base-model"  # built by the first run's model.init
    ppo = ["algorithm=ppo", "trainer.steps=3", "checkpoint.every_steps=3",
           f"models.reward.path={base}", "models.reward.init=null"]
    run_to_end(tmp_path / "colocated", *ppo)
    run_to_end(tmp_path / "exclusive", *ppo, "models.reference.placement=exclusive",
               "models.reward.placement=exclusive")
    plan = json.loads((tmp_path / "exclusive" / "plan.json").read_text())
    assert plan["world_size"] == 4
    assert (plan["models"]["reference"]["first_rank"], plan["models"]["reward"]["first_rank"]) \
        == (2, 3)
    one, two = (checkpoint_tensors(tmp_path / d, 3) for d in ("colocated", "exclusive"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    critic = "checkpoints/step-000003/models/value"
    for name in ("model/model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(os.path.join(tmp_path / d, critic, name))
                for d in ("colocated", "exclusive"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [metrics(tmp_path / d) for d in ("colocated", "exclusive")]
    assert [r["score_mean"] for r in rows[0]] == [r["score_mean"] for r in rows[1]]
    assert any(r["score_mean"] != 0 for r in rows[0])


def test_ppo_data_parallel_trainers_take_one_trainers_steps(tmp_path):
    """trainer.ranks=2: each rank scores (reward model) and updates its half of the batch;
    whitening, token counts and metrics span both halves and the policy's and critic's
    gradients are summed. With one minibatch per epoch that is exactly one trainer's
    update: weights equal to float tolerance, the same rollouts and scores."""
    base = tmp_path / "dp1" / "base-model"
    common = ["algorithm=ppo", "generator.ranks=2", "trainer.steps=3",
              "checkpoint.every_steps=3", "ppo.minibatches=1",
              f"models.reward.path={base}", "models.reward.init=null"]
    run_to_end(tmp_path / "dp1", "trainer.ranks=1", *common)
    run_to_end(tmp_path / "dp2", "trainer.ranks=2", *common)
    from local_runs import checkpoint_tensors

    one, two = checkpoint_tensors(tmp_path / "dp1", 3), checkpoint_tensors(tmp_path / "dp2", 3)
    critic = "checkpoints/step-000003/models/value/model/model.safetensors"
    one.update({f"critic/{k}": v for k, v in load_file(str(tmp_path / "dp1" / critic)).items()})
    two.update({f"critic/{k}": v for k, v in load_file(str(tmp_path / "dp2" / critic)).items()})
    import json

    assert json.loads((tmp_path / "dp2" / "plan.json").read_text())["trainer"]["ranks"] == 2
    for key in one:
        if key.startswith(("model/", "critic/")):
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    rows = [metrics(tmp_path / d) for d in ("dp1", "dp2")]
    assert [r["reward_mean"] for r in rows[0]] == [r["reward_mean"] for r in rows[1]]
    for a, b in zip(*rows):
        assert abs(a["score_mean"] - b["score_mean"]) < 1e-6, (a["score_mean"], b["score_mean"])
        assert abs(a["vf_loss"] - b["vf_loss"]) < 1e-5 * max(1.0, abs(a["vf_loss"]))
