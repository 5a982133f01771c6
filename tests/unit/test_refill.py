"""DAPO's refill: groups without reward variance replaced by other prompts' groups, the
refill rows disjoint from the step's and between generators, and a real run's shards full
of informative groups."""

from __future__ import annotations

import numpy as np

from hpcalign.config.load import load_config
from hpcalign.data.datasets import indices_for_step
from hpcalign.data.shards import Ragged, RolloutBatch
from hpcalign.engines.rollouts import ScoredRollouts, concat_rollouts, keep_informative
from hpcalign.roles.generator import refill_rows

QUICKSTART = "configs/quickstart.yaml"


def _scored(prompt_ids: list[int], rewards: list[float]) -> ScoredRollouts:
    n = len(prompt_ids)
    batch = RolloutBatch(
        step=3, policy_version=2, generator_rank=0, prompt_ids=np.array(prompt_ids, np.int64),
        prompt_tokens=Ragged.from_list([[1, 2]] * n, np.int32),
        completion_tokens=Ragged.from_list([[i + 5] for i in range(n)], np.int32),
        logprobs=Ragged.from_list([[-float(i)] for i in range(n)], np.float32),
        rewards=np.array(rewards, np.float32), seeds=np.arange(n, dtype=np.int64),
        finished=np.ones(n, bool), reward_names=("r",),
        reward_values=np.array(rewards, np.float32)[:, None])
    return ScoredRollouts(batch, [str(i) for i in range(n)], 0.1, 0)


def test_keep_informative_and_concat_cut_at_the_group_count():
    first = keep_informative(_scored([7, 7, 8, 8, 9, 9], [1, 0, 0.5, 0.5, np.nan, 1]))
    assert first.batch.prompt_ids.tolist() == [7, 7]  # 8: all equal, 9: one scored
    second = keep_informative(_scored([3, 3, 4, 4], [0, 1, 1, 0]))
    both = concat_rollouts([first, second], max_groups=2, attrs={"refill_rounds": 1})
    assert both.batch.prompt_ids.tolist() == [7, 7, 3, 3]
    assert both.batch.completion_tokens.to_list()[2].tolist() == [5]  # second's sample 0
    assert both.batch.reward_values[:, 0].tolist() == [1, 0, 0, 1]
    assert both.batch.attrs["refill_rounds"] == 1 and both.texts == ["0", "1", "0", "1"]


def test_refill_rows_are_disjoint_from_the_step_and_between_generators():
    cfg = load_config(QUICKSTART, ["run_dir=/tmp/unused", "generator.ranks=2",
                                   "generator.prompts_per_step=8"])
    step_rows = set(indices_for_step(1000, cfg.seed, 5, 8).tolist())
    seen: set[int] = set()
    for generator in (0, 1):
        for refill in (1, 2):
            rows = refill_rows(cfg, 1000, 5, generator, refill, 4)
            assert len(rows) == 4 and not step_rows & set(rows.tolist())
            assert not seen & set(rows.tolist())
            seen |= set(rows.tolist())
    again = refill_rows(cfg, 1000, 5, 1, 2, 4)  # a pure function of its arguments
    assert again.tolist() == refill_rows(cfg, 1000, 5, 1, 2, 4).tolist()
