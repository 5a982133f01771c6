"""`hpcalign rescore DIR 'reward.functions=[pkg.mod:fn]'`: score existing rollouts again.

A new reward idea should not cost a new rollout: the completions are in the shards. Each
shard of DIR (an `hpcalign rollout` OUT directory or a run directory) is read, its
completions decoded as they were when sampled, and the reward functions called with TRL's
signature and the dataset's columns, exactly as at sampling time. Every function's values
become a new named column of the shard (`reward_names` / `reward_values`); the rewards it
has are kept under their names, and `rewards` (what was sampled for, and trained on) is
left as it was. Each shard is rewritten atomically (a new file renamed over the old, its
sidecar and checksum updated) and the manifest of an OUT directory records the new
checksums, so `hpcalign inspect OUT` stays green.

    hpcalign rescore runs/r1/offline 'reward.functions=[math_verify,my_pkg.rewards:length]'
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from hpcalign.errors import UserError

HELP = "add reward functions' scores to existing rollout shards (no regeneration)"


def _reward_specs(overrides: list[str]) -> list[str]:
    """The `reward.functions` of the key=value overrides (the only key rescore takes)."""
    from omegaconf import OmegaConf

    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key.strip() != "reward.functions":
            raise UserError(f"{item!r}: rescore takes reward.functions=[module:function, ...]")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist(overrides)).get("reward", {})
    except Exception as err:  # OmegaConf's grammar errors
        raise UserError(f"{' '.join(overrides)}: not a key=value override ({err})") from err
    functions = value.get("functions")
    if isinstance(functions, str):
        functions = [functions]
    if not isinstance(functions, list) or not functions or not all(
            isinstance(f, str) and f for f in functions):
        raise UserError(f"reward.functions={functions!r}: expected a non-empty list of "
                        "'module:function' or built-in names")
    return functions


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign rescore", description=HELP)
    parser.add_argument("dir", metavar="DIR", help="an `hpcalign rollout` OUT or a run directory")
    parser.add_argument("overrides", nargs="+", metavar="reward.functions=[...]")
    args = parser.parse_args(argv)
    specs = _reward_specs(args.overrides)

    from hpcalign.data.manifest import update_shard
    from hpcalign.data.rollout_dir import open_rollout_dir
    from hpcalign.data.shards import read_shard, write_shard
    from hpcalign.errors import ShardError
    from hpcalign.launch.claim import take_claim
    from hpcalign.launch.rundir import read_json
    from hpcalign.rewards import load_reward_functions

    rewards = load_reward_functions(specs)
    if os.path.isfile(os.path.join(args.dir, "config.yaml")):
        state = read_json(os.path.join(args.dir, "state.json")) or {}
        if state.get("state") != "done":
            raise UserError(f"{args.dir}: the run is not finished (state "
                            f"{state.get('state', 'unknown')!r}); a resume checks its pending "
                            "shards against their checksums, so rescore it once it is done")
    source = open_rollout_dir(args.dir)
    claim = take_claim(args.dir, "rescore")  # refused while a run or rollout writes there
    try:
        samples = 0
        for path in source.shards:
            try:
                batch = read_shard(path, retry_s=0)
            except ShardError as err:
                raise UserError(f"{err} (nothing was changed in it)") from err
            clash = sorted(set(rewards.names) & set(batch.reward_names))
            if clash:
                raise UserError(f"{path} already has rewards named {', '.join(clash)}; rescore "
                                "adds new ones and keeps the old, so name the function anew")
            _, per_function = rewards.score(
                source.prompt_rows(batch.prompt_ids), source.texts(batch),
                [t.tolist() for t in batch.completion_tokens.to_list()],
                source.columns(batch.prompt_ids),
                conversational=source.prompts.is_conversational)
            new = np.stack([per_function[n] for n in rewards.names], axis=1).astype(np.float32)
            old = (batch.reward_values if batch.reward_values is not None
                   else np.zeros((len(batch), 0), np.float32))
            batch.reward_names = (*batch.reward_names, *rewards.names)
            batch.reward_values = np.concatenate([old.reshape(len(batch), -1), new], axis=1)
            info = write_shard(path, batch)
            if source.kind == "offline":
                update_shard(args.dir, os.path.basename(path), info.file_checksum, len(batch))
            samples += len(batch)
            means = ", ".join(f"{n} {np.nanmean(per_function[n]):.4f}"
                              if np.isfinite(per_function[n]).any() else f"{n} n/a"
                              for n in rewards.names)
            print(f"{path}: {len(batch)} samples, {means}")
    finally:
        claim.release()
    print(f"rescored {len(source.shards)} shards, {samples} samples: added "
          f"{', '.join(rewards.names)}")
    return 0
