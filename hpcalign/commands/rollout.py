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
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="run checkpoint (RUN_DIR/checkpoints/step-N) or HF model dir")
    parser.add_argument("--prompts", metavar="DATASET",
                        help="JSONL, Parquet or a datasets save_to_disk directory with a "
                             "'prompt' column (a string or chat messages); other columns go "
                             "to the reward functions")
    parser.add_argument("--out", metavar="OUT_DIR", help="shard directory")
    parser.add_argument("--replay", metavar="RUN_DIR",
                        help="regenerate the rollouts training step --step of RUN_DIR used and "
                             "compare them with its stored shards (then --out is optional)")
    parser.add_argument("--step", type=int, default=None, metavar="K", help="with --replay")
    parser.add_argument("--workers", type=int, default=1, metavar="W",
                        help="local processes sharing this task's prompts; the samples are the "
                             "same for any W (%(default)s)")
    parser.add_argument("--threads", type=int, default=1, metavar="T",
                        help="CPU threads per process; on CPU the samples depend on it, so it "
                             "is a setting of the rollout (recorded): scale with --workers or "
                             "array tasks instead (%(default)s)")
    parser.add_argument("--engine", default=None, metavar="NAME",
                        help="generation engine: torch or vllm (default: torch; with --replay "
                             "the run's generator.backend)")
    parser.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
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
    parser = _parser()
    args = parser.parse_args(argv)
    if args.replay is not None:
        return _replay(args)
    missing = [f"--{name}" for name in ("checkpoint", "prompts", "out")
               if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} "
                     "(or --replay RUN_DIR --step K)")
    task_index, num_tasks = _array_position(args.shard_index, args.num_shards)
    if args.workers < 1:
        raise UserError(f"--workers={args.workers} must be >= 1")
    if args.threads < 1:
        raise UserError(f"--threads={args.threads} must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be >= 1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UserError(f"--max-prompt-tokens={args.max_prompt_tokens} must be >= 1")
    model_dir, policy_version = resolve_checkpoint(args.checkpoint)
    args.engine = args.engine or "torch"
    if args.workers > 1 and args.worker_of is None:
        return _run_workers(argv, args)
    # part = this task's worker: W workers of task I of N are parts I*W..I*W+W-1 of N*W
    part = task_index * args.workers + (args.worker_of or 0)
    parts = num_tasks * args.workers

    # torch and transformers only now: a wrong flag or path answers in a blink
    from transformers.utils import logging as hf_logging

    from hpcalign.data.datasets import load_prompt_dataset
    from hpcalign.engines import SamplingParams, build_generation_engine
    from hpcalign.engines.offline import (
        OfflineRollout,
        prompt_order,
        run_offline_rollout,
        slice_prompts,
    )
    from hpcalign.rewards import RewardSet, load_reward_functions

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
    device = _device(args.device)
    import torch

    torch.set_num_threads(args.threads)
    try:
        engine = build_generation_engine(args.engine, model_dir,
                                         _engine_config(args.out, model_dir, args.dtype),
                                         device=device)
    except ValueError as err:  # an unknown engine name
        raise UserError(f"--engine: {err}") from err
    rows = prompt_order(len(prompts))[slice_prompts(len(prompts), part, parts)]
    _check_spelling(engine.tokenizer, prompts, rows, args.prompts)
    attrs: dict[str, str | int | float] = {
        "task": args.task, "checkpoint": os.path.realpath(args.checkpoint),
        "prompts": os.path.realpath(args.prompts),
        "reward": ",".join(args.reward) if args.reward else ("answer" if specs else "none"),
        "dtype": args.dtype, "device": device.type}
    if device.type == "cpu":  # the CPU kernels' results depend on the thread count
        attrs["threads"] = args.threads
    if args.engine != "torch":  # recorded only when not the default: old shards stay valid
        attrs["engine"] = args.engine
    if args.max_prompt_tokens is not None:  # recorded: another limit is another rollout
        attrs.update(max_prompt_tokens=args.max_prompt_tokens, truncation=args.truncation)
    job = OfflineRollout(
        engine=engine, prompts=prompts, rewards=rewards, params=params, out_dir=args.out,
        shard_index=part, num_shards=parts, batch_size=args.batch_size,
        seed=args.seed, policy_version=policy_version, max_prompt_tokens=args.max_prompt_tokens,
        truncation=args.truncation, attrs=attrs,
        manifest=_manifest_record(args, model_dir, policy_version, params, attrs, parts),
        progress=args.worker_of is None)
    # NOTE: the claim is taken only now, right before the first write into --out: array
    # tasks of one job share it (same SLURM_ARRAY_JOB_ID); a second local rollout or
    # another job on the same --out is refused. Workers run under their parent's claim.
    from hpcalign import faults
    from hpcalign.launch.claim import take_claim

    faults.configure(args.out)  # HPCALIGN_FAULTS=rollout-shard@N: the kill-and-resume tests
    claim = take_claim(args.out, "rollout") if args.worker_of is None else None
    try:
        if claim is not None:
            claim.start_heartbeat()
        summary = run_offline_rollout(job)
    finally:
        if claim is not None and not os.environ.get("SLURM_ARRAY_JOB_ID"):
            claim.release()  # an array's other tasks may still run
    print(summary.line())
    return 0


def _device(name: str):
    from hpcalign.roles.device import role_device

    try:
        return role_device(name, "--device")
    except RuntimeError as err:
        raise UserError(str(err)) from err


def _engine_config(out_dir: str, model_dir: str, dtype: str):
    """The run config an engine is built from: this model at `dtype`, all else default."""
    from hpcalign.config.schema import Config, ModelConfig

    return Config(run_dir=out_dir, model=ModelConfig(path=model_dir, dtype=dtype))


def _manifest_record(args: argparse.Namespace, model_dir: str, policy_version: int, params,
                     attrs: dict, parts: int) -> dict:
    """What every part of the rollout must agree on (data/manifest.py)."""
    from hpcalign.data.manifest import FORMAT_VERSION, content_hash

    sampling = {**params.as_attrs(), "seed": args.seed, "engine": args.engine,
                **{k: v for k, v in attrs.items() if k not in ("checkpoint", "prompts")}}
    return {"format_version": FORMAT_VERSION,
            "checkpoint": {"path": os.path.realpath(model_dir),
                           "content_hash": content_hash(model_dir),
                           "policy_version": policy_version},
            "prompts": {"path": os.path.realpath(args.prompts),
                        "content_hash": content_hash(args.prompts)},
            "sampling": sampling, "parts": parts, "batch_size": args.batch_size}


def _run_workers(argv: list[str], args: argparse.Namespace) -> int:
    """`--workers W`: W local processes, each one part of this task's prompts, under one
    claim on --out; the manifest is complete when the last one ends."""
    import subprocess
    import sys

    from hpcalign.launch.claim import take_claim

    claim = take_claim(args.out, "rollout")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        claim.start_heartbeat()
        children = [subprocess.Popen([sys.executable, "-m", "hpcalign.cli", "rollout", *argv,
                                      "--worker-of", str(w)], env=env)
                    for w in range(args.workers)]
        codes = [child.wait() for child in children]
    finally:
        if not os.environ.get("SLURM_ARRAY_JOB_ID"):
            claim.release()
    failed = [w for w, code in enumerate(codes) if code != 0]
    if failed:
        raise UserError(f"rollout worker(s) {', '.join(map(str, failed))} of {args.workers} "
                        "failed (their error is above); rerun the same command to resume")
    return 0


def _replay(args: argparse.Namespace) -> int:
    if args.step is None:
        raise UserError("--replay RUN_DIR needs --step K (the training step to regenerate)")
    from transformers.utils import logging as hf_logging

    from hpcalign.engines.replay import replay_step

    hf_logging.disable_progress_bar()
    report = replay_step(args.replay, args.step, device=_device(args.device),
                         engine_name=args.engine,
                         out_dir=args.out)
    print(report.line())
    return 0 if report.ok else 1


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
