"""`hpcalign rollout`: sample rollouts offline from a checkpoint into HDF5 shards.

For evaluation or distillation, on a laptop or as a Slurm job array (docs/rollout.md):

    hpcalign rollout --checkpoint runs/r1/checkpoints/step-000200 --prompts eval.jsonl \\
        --out runs/r1/offline --samples-per-prompt 4 --max-new-tokens 64 --reward math_verify
    sbatch --array=0-7 sbatch/rollout-array.sbatch CHECKPOINT PROMPTS OUT [options]

Prompts are a TRL-format dataset (JSONL, Parquet or a `save_to_disk` directory; standard
or conversational prompts) and rewards TRL-signature functions, loaded as a run loads
`data.train` and `reward.functions`. Array task I of N (`--shard-index/--num-shards`, by
default `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`) samples the I-th slice of the
rows into `OUT/shard-{I:04d}-{batch:05d}.h5`, skipping shards a previous attempt
completed, then prints one summary line and writes `OUT/rollout-summary-{I:04d}.json`.
"""

from __future__ import annotations

import argparse
import json
import os

from hpcalign.config.schema import GeneratorConfig
from hpcalign.errors import UserError

HELP = "sample rollouts offline from a checkpoint into HDF5 shards (Slurm-array ready)"

# Without --reward, a dataset with an `answer` column is scored as a run scores a built-in
# task (1.0 exact, else matching positions); one without is not scored (NaN).
DEFAULT_REWARD = "hpcalign.rewards.builtin:partial_match"


def _parser() -> argparse.ArgumentParser:
    defaults = GeneratorConfig()  # a run's sampling defaults; light to import, unlike torch
    parser = argparse.ArgumentParser(prog="hpcalign rollout", description=HELP)
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="run checkpoint (RUN_DIR/checkpoints/step-N) or HF model dir")
    parser.add_argument("--prompts", required=True, metavar="DATASET",
                        help="JSONL, Parquet or a datasets save_to_disk directory with a "
                             "'prompt' column (a string or chat messages); other columns go "
                             "to the reward functions")
    parser.add_argument("--out", required=True, metavar="OUT_DIR", help="shard directory")
    parser.add_argument("--shard-index", type=int, default=None, metavar="I",
                        help="this array task (default: $SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--num-shards", type=int, default=None, metavar="N",
                        help="array tasks in all (default: $SLURM_ARRAY_TASK_COUNT, else 1)")
    parser.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt,
                        metavar="K", help="completions per prompt (%(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        metavar="T", help="longest completion in tokens (%(default)s)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, metavar="X",
                        help="sampling temperature (%(default)s)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, metavar="P",
                        help="nucleus mass (%(default)s; 1: off)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K",
                        help="top-k (%(default)s; 0: off)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B",
                        help="prompts per shard, sampled as one batch of B*K sequences (%(default)s)")
    parser.add_argument("--seed", type=int, default=1234, metavar="S", help="sampling seed (%(default)s)")
    parser.add_argument("--task", default="jsonl", metavar="NAME",
                        help="task label recorded in the shards (default: jsonl)")
    parser.add_argument("--reward", action="append", default=None, metavar="SPEC",
                        help="a reward function with TRL's signature, 'module:function' or a "
                             "built-in (exact_match, math_verify, format); repeat for several "
                             "(summed); default: partial match against an 'answer' column, "
                             "else not scored (NaN)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                        help="longer prompts are skipped and counted, or cut (--truncation)")
    parser.add_argument("--truncation", choices=["skip", "truncate_left"], default="skip",
                        help="what --max-prompt-tokens does to a longer prompt (%(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="parameter dtype (%(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: this task's node-local GPU when it sees one, else the CPU "
                             "(%(default)s)")
    return parser


def _array_position(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """(I, N) from the flags, else from Slurm's array variables, else (0, 1)."""
    def from_env(value: int | None, name: str, default: int) -> int:
        if value is not None:
            return value
        text = os.environ.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{name}={text!r} is not an integer") from None

    index = from_env(shard_index, "SLURM_ARRAY_TASK_ID", 0)
    count = from_env(num_shards, "SLURM_ARRAY_TASK_COUNT", 1)
    if count < 1:
        raise UserError(f"--num-shards={count} must be >= 1")
    if not 0 <= index < count:
        raise UserError(f"--shard-index={index} must be in 0..{count - 1} (--num-shards={count}); "
                        "a Slurm array must be contiguous from 0 (--array=0-N)")
    return index, count


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """(model dir, policy_version) of a run checkpoint dir or a plain HF model dir."""
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint {path}: no such directory")
    model_dir = os.path.join(path, "model")
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        state_path = os.path.join(path, "state.json")
        if not os.path.exists(state_path):
            return model_dir, 0
        try:
            with open(state_path) as f:
                return model_dir, int(json.load(f)["policy_version"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{state_path}: no readable policy_version "
                            f"({type(err).__name__}: {err})") from err
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, 0
    hint = ""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        hint = f"; for a run directory pass {os.path.join(path, 'checkpoints', 'step-N')}"
    raise UserError(f"--checkpoint {path}: neither a run checkpoint (model/ + state.json) nor "
                    f"an HF model directory (config.json){hint}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    shard_index, num_shards = _array_position(args.shard_index, args.num_shards)
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be >= 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UserError(f"--max-prompt-tokens={args.max_prompt_tokens} must be >= 1")
    model_dir, policy_version = resolve_checkpoint(args.checkpoint)

    # torch and transformers only now: a wrong flag or path answers in a blink
    from transformers.utils import logging as hf_logging

    from hpcalign.data.datasets import load_prompt_dataset
    from hpcalign.engines import SamplingParams
    from hpcalign.engines.offline import (
        OfflineRollout,
        prompt_order,
        run_offline_rollout,
        slice_prompts,
    )
    from hpcalign.engines.torch_generation import TorchGenerationEngine
    from hpcalign.models.hf import load_model
    from hpcalign.rewards import RewardSet, load_reward_functions
    from hpcalign.roles.device import role_device

    try:
        params = SamplingParams(samples_per_prompt=args.samples_per_prompt,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k)
    except ValueError as err:  # "top_p=2.0 must be in (0, 1]" -> "top-p=2.0 ..." (the flag)
        raise UserError(str(err).replace("_", "-")) from err
    hf_logging.disable_progress_bar()
    prompts = load_prompt_dataset(args.prompts)
    specs = args.reward or ([DEFAULT_REWARD] if "answer" in prompts.columns else [])
    rewards = load_reward_functions(specs) if specs else RewardSet([])
    model, tokenizer = load_model(model_dir, args.dtype)
    try:
        device = role_device(args.device, "--device")
    except RuntimeError as err:
        raise UserError(str(err)) from err
    model.to(device).requires_grad_(False)  # the generator role's placement rule
    engine = TorchGenerationEngine(model, tokenizer)
    rows = prompt_order(len(prompts))[slice_prompts(len(prompts), shard_index, num_shards)]
    _check_spelling(tokenizer, prompts, rows, args.prompts)
    attrs: dict[str, str | int | float] = {
        "task": args.task, "checkpoint": os.path.realpath(args.checkpoint),
        "prompts": os.path.realpath(args.prompts),
        "reward": ",".join(args.reward) if args.reward else ("answer" if specs else "none"),
        "dtype": args.dtype, "device": device.type}
    if args.max_prompt_tokens is not None:  # recorded: another limit is another rollout
        attrs.update(max_prompt_tokens=args.max_prompt_tokens, truncation=args.truncation)
    job = OfflineRollout(
        engine=engine, prompts=prompts, rewards=rewards, params=params, out_dir=args.out,
        shard_index=shard_index, num_shards=num_shards, batch_size=args.batch_size,
        seed=args.seed, policy_version=policy_version, max_prompt_tokens=args.max_prompt_tokens,
        truncation=args.truncation, attrs=attrs)
    # NOTE: the claim is taken only now, right before the first write into --out: array
    # tasks of one job share it (same SLURM_ARRAY_JOB_ID); a second local rollout or
    # another job on the same --out is refused.
    from hpcalign.launch.claim import take_claim

    claim = take_claim(args.out, "rollout")
    try:
        claim.start_heartbeat()
        summary = run_offline_rollout(job)
    finally:
        if not os.environ.get("SLURM_ARRAY_JOB_ID"):  # an array's other tasks may still run
            claim.release()
    print(summary.line())
    return 0


def _check_spelling(tokenizer, prompts, rows, prompts_path: str) -> None:
    """UserError for a prompt the tokenizer cannot spell (it would become `<unk>`, or vanish
    in a tokenizer without one, and the model would be sampled on garbage, silently): the
    first such prompt and its missing characters. Chat prompts: each message's content."""
    def spelled(text: str) -> bool:
        ids = tokenizer(text).input_ids
        return tokenizer.decode(ids, skip_special_tokens=True) == text

    for row in rows:
        prompt = prompts.prompt(int(row))
        texts = [prompt] if isinstance(prompt, str) else [str(m.get("content") or "")
                                                          for m in prompt]
        for text in texts:
            if spelled(text):
                continue
            # NOTE: per character, and not whitespace: some tokenizers decode spaces
            # differently (SentencePiece's leading space), not a character the model lacks
            missing = sorted({c for c in text if not c.isspace() and not spelled(c)})
            if missing:
                raise UserError(f"{prompts_path}: prompt {text!r} (row {int(row)}) has "
                                f"characters the model's tokenizer lacks: {''.join(missing)!r}")
