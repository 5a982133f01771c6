"""`hpcalign export DIR --format jsonl|parquet`: rollouts as a dataset other tools read.

One row per sample, in the column layout of TRL and HF `datasets`: `prompt` (the dataset's
own prompt: a string, or chat messages for a conversational dataset) and `completion` (a
string, or `[{"role": "assistant", "content": ...}]`), then `prompt_id`, `sample_index`
(its place in the prompt's group), `prompt_token_ids`, `completion_token_ids`,
`logprobs` (per completion token), `reward` (the total sampled for; null where not
scored), one `reward_<name>` per reward function, `finished`, `policy_version`, `step`
and `seed`, then the dataset's other columns (`answer`, `solution`, ...). Written by
`datasets` itself (JSON lines or Parquet), so `datasets.load_dataset("json" | "parquet",
data_files=...)` reads it back.

    hpcalign export runs/r1/offline --format parquet --out r1.parquet
"""

from __future__ import annotations

import argparse
import math
import os

HELP = "write rollout shards as a JSONL or Parquet dataset (TRL/datasets columns)"


def _value(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def rows_of(source, batch) -> list[dict]:
    """The export rows of one shard (see the module docstring for the columns)."""
    texts = source.texts(batch)
    prompts = source.prompt_rows(batch.prompt_ids)
    conversational = source.prompts.is_conversational
    values = batch.reward_values if batch.reward_values is not None else None
    columns = source.columns(batch.prompt_ids)
    rows, previous, index = [], None, 0
    for i in range(len(batch)):
        prompt_id = int(batch.prompt_ids[i])
        index = index + 1 if prompt_id == previous else 0  # a prompt's samples are adjacent
        previous = prompt_id
        row = {
            "prompt": prompts[i],
            "completion": ([{"role": "assistant", "content": texts[i]}] if conversational
                           else texts[i]),
            "prompt_id": prompt_id, "sample_index": index,
            "prompt_token_ids": batch.prompt_tokens[i].tolist(),
            "completion_token_ids": batch.completion_tokens[i].tolist(),
            "logprobs": batch.logprobs[i].astype(float).tolist(),
            "reward": _value(float(batch.rewards[i])),
        }
        for column, name in enumerate(batch.reward_names):
            row[f"reward_{name}"] = _value(float(values[i, column]))
        row.update(finished=bool(batch.finished[i]), policy_version=int(batch.policy_version),
                   step=int(batch.step), seed=int(batch.seeds[i]))
        for name, column in columns.items():  # the dataset's own columns (answer, ...)
            row.setdefault(name, column[i])
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcalign export", description=HELP)
    parser.add_argument("dir", metavar="DIR", help="an `hpcalign rollout` OUT or a run directory")
    parser.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="output file (default: DIR/export.jsonl or DIR/export.parquet)")
    args = parser.parse_args(argv)

    from hpcalign.data.rollout_dir import open_rollout_dir
    from hpcalign.data.shards import read_shard
    from hpcalign.errors import ShardError, UserError

    source = open_rollout_dir(args.dir)
    rows: list[dict] = []
    for path in source.shards:
        try:
            rows.extend(rows_of(source, read_shard(path, retry_s=0)))
        except ShardError as err:
            raise UserError(str(err)) from err
    if not rows:
        raise UserError(f"{args.dir}: no rollout shards to export")
    names = {key for row in rows for key in row if key.startswith("reward_")}
    for row in rows:  # shards rescored at different times: every column in every row
        for name in names:
            row.setdefault(name, None)
    out = args.out or os.path.join(args.dir, f"export.{args.format}")

    import datasets

    dataset = datasets.Dataset.from_list(rows)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        if args.format == "jsonl":
            dataset.to_json(tmp, lines=True, force_ascii=False)
        else:
            dataset.to_parquet(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"exported {len(rows)} samples of {len(source.shards)} shards to {out}")
    return 0
