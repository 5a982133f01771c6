"""Prompt datasets in TRL's formats: JSONL, Parquet, or a `datasets.save_to_disk` directory.

Why: TRL users already have their prompts as HF datasets, in TRL's two "prompt-only"
shapes (https://huggingface.co/docs/trl/dataset_formats):

    standard        {"prompt": "What is 2+2?", "answer": "4"}
    conversational  {"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4"}

Every other column ("answer", "solution", ...) travels with the row to the reward functions,
as TRL passes them. This module loads those files with HF `datasets` (so values get exactly
the types a TRL user sees), checks every row once, and turns a prompt into token ids with the
model's own tokenizer and chat template.

    ds = load_prompt_dataset("gsm8k.parquet")
    ids = render_prompt(tokenizer, ds.prompt(i))
    batch = indices_for_step(len(ds), seed, step, prompts_per_step)

Nothing touches the network: the HF offline switches are set before `datasets` is imported,
a hub name that is not a local path is an error, and `load_dataset`'s Arrow cache goes to a
private temporary directory (node-local `$TMPDIR`, no shared-filesystem locks) that is
removed once the rows are in memory.

Errors are `UserError`s on one line naming the file and the place: `FILE:LINE:` for JSONL
(1-based line numbers), `FILE: row R (0-based)` for Parquet and dataset directories.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hpcalign.errors import UserError

PROMPT = "prompt"
Prompt = str | list[dict[str, Any]]  # standard text, or conversational messages
_JSON_SUFFIXES = (".jsonl", ".json")
_EPOCH_SALT = 4  # seed-derivation key of the epoch permutations (shared with data.tasks)


class PromptDataset:
    """Rows of a prompt dataset, all of one kind (standard or conversational), held in memory."""

    def __init__(
        self, path: str, dataset: Any, prompts: list[Prompt], is_conversational: bool
    ) -> None:
        self.path = path
        self.is_conversational = is_conversational
        self.columns: list[str] = [c for c in dataset.column_names if c != PROMPT]
        self._dataset = dataset  # a datasets.Dataset
        self._prompts = prompts

    def __len__(self) -> int:
        return len(self._prompts)

    def prompt(self, i: int) -> Prompt:
        """Row `i`'s prompt: a string, or a list of {"role", "content"} messages."""
        return self._prompts[i]

    def row(self, i: int) -> dict[str, Any]:
        """Row `i`, every column (the prompt included)."""
        return self._dataset[int(i)]

    def column_values(self, indices: Sequence[int]) -> dict[str, list]:
        """The non-prompt columns of rows `indices`, as TRL hands them to reward functions."""
        if not self.columns:
            return {}
        batch = self._dataset.select_columns(self.columns)[[int(i) for i in indices]]
        return {name: list(batch[name]) for name in self.columns}


def load_prompt_dataset(path: str) -> PromptDataset:
    """The prompts at `path`: `.jsonl`/`.json` (JSON Lines), `.parquet`, or a `save_to_disk` dir."""
    path = os.fspath(path)
    if os.path.isdir(path):
        dataset = _load_from_disk(path)
        where = _row_place
    elif os.path.isfile(path):
        if path.endswith(_JSON_SUFFIXES):
            _prevalidate_jsonl(path)
            dataset = _load_file(path, "json")
            where = None  # checked line by line already
        elif path.endswith(".parquet"):
            _prevalidate_parquet(path)
            dataset = _load_file(path, "parquet")
            where = _row_place
        else:
            raise UserError(
                f"{path}: unknown prompt file type; use .jsonl, .json (JSON Lines), .parquet "
                "or a directory written by datasets' save_to_disk"
            )
    else:
        raise UserError(
            f"{path}: no such file or directory (hub datasets are not downloaded: save one with "
            "datasets.load_dataset(NAME, split='train').save_to_disk(DIR) where there is internet)"
        )
    if len(dataset) == 0:
        raise UserError(f"{path}: the dataset has no rows")
    if PROMPT not in dataset.column_names:
        raise UserError(
            f"{path}: no '{PROMPT}' column (columns: {', '.join(dataset.column_names)}); TRL's "
            "prompt-only format needs one"
        )
    prompts = list(dataset[PROMPT])
    conversational = _check_prompts(prompts, path, where, str(dataset.features[PROMPT]))
    return PromptDataset(path, dataset, prompts, conversational)


def _row_place(path: str, i: int) -> str:
    return f"{path}: row {i} (0-based)"


def _line_place(path: str, line_no: int) -> str:
    return f"{path}:{line_no}:"


def _datasets_module() -> Any:
    # NOTE: the offline switches are read when datasets is imported; set them first. Local
    # files go through datasets' packaged json/parquet builders, which need no network anyway.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets  # heavy (~1 s): only when a dataset is loaded

    datasets.disable_progress_bars()
    return datasets


def _load_file(path: str, builder: str) -> Any:
    datasets = _datasets_module()
    cache_dir = tempfile.mkdtemp(prefix="hpcalign-datasets-")
    try:
        return datasets.load_dataset(
            builder,
            data_files=os.path.abspath(path),
            split="train",
            cache_dir=cache_dir,
            keep_in_memory=True,
        )
    except Exception as err:  # datasets/pyarrow raise many types for a bad file; all are the file's
        raise UserError(f"{path}: cannot load as {builder} ({_one_line(err)})") from err
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _load_from_disk(path: str) -> Any:
    datasets = _datasets_module()
    try:
        loaded = datasets.load_from_disk(path, keep_in_memory=True)
    except Exception as err:  # not a save_to_disk directory, or damaged Arrow files
        raise UserError(
            f"{path}: not a dataset directory written by save_to_disk ({_one_line(err)})"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UserError(
                f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(loaded)}); "
                "save the split to use with dataset['NAME'].save_to_disk(DIR)"
            )
        loaded = loaded["train"]
    return loaded


def _one_line(err: BaseException) -> str:
    """The innermost cause of `err` on one line (datasets wraps the useful pyarrow error)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _prevalidate_parquet(path: str) -> None:
    """Refuse a file that is not Parquet, or has no rows (datasets 5 fails on it obscurely)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise UserError(f"{path}: not a Parquet file ({_one_line(err)})") from err
    if rows == 0:
        raise UserError(f"{path}: the dataset has no rows")


def _prevalidate_jsonl(path: str) -> None:
    """Check every JSONL line, so errors name the line (datasets' json loader does not)."""
    first_kind: dict[str, tuple[str, int]] = {}  # column -> (JSON kind, first line with it)
    prompts_kind: tuple[bool, int] | None = None
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                place = _line_place(path, line_no)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(
                        f"{place} invalid JSON ({err.msg} at column {err.colno})"
                    ) from err
                if not isinstance(record, dict):
                    raise UserError(
                        f"{place} expected one JSON object per line (JSON Lines), got "
                        f"{_kind(record)}"
                    )
                if PROMPT not in record:
                    raise UserError(f"{place} missing field '{PROMPT}'")
                conversational = _check_prompt(record[PROMPT], place)
                if prompts_kind is None:
                    prompts_kind = (conversational, line_no)
                elif conversational != prompts_kind[0]:
                    raise UserError(_mixed(place, conversational, f"line {prompts_kind[1]}"))
                for column, value in record.items():
                    _check_column_kind(first_kind, column, value, place, line_no)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from err
    if prompts_kind is None:
        raise UserError(f"{path}: the file has no rows")


def _check_column_kind(
    first_kind: dict[str, tuple[str, int]], column: str, value: Any, place: str, line_no: int
) -> None:
    # NOTE: Arrow gives a column one type; a string on one line and a number on another fails
    # deep inside datasets with no line number, so it is caught here.
    kind = _kind(value)
    if kind == "null":
        return
    seen = first_kind.setdefault(column, (kind, line_no))
    if seen[0] != kind:
        raise UserError(
            f"{place} field '{column}' is {kind} but {seen[0]} on line {seen[1]} "
            "(a column must have one type)"
        )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_prompts(prompts: list, path: str, where: Any, feature: str) -> bool:
    """Whether the (already loaded) prompts are conversational; UserError on a bad row."""
    if where is None:  # pre-validated JSONL: only the kind is needed
        return isinstance(prompts[0], list)
    first = None
    for i, prompt in enumerate(prompts):
        conversational, problem = _prompt_problem(prompt)
        if problem:
            typed = f" (column type {feature})" if not isinstance(prompt, str | list) else ""
            raise UserError(f"{where(path, i)} {problem}{typed}")
        if first is None:
            first = conversational
        elif conversational != first:
            raise UserError(_mixed(where(path, i), conversational, "row 0"))
    return bool(first)


def _check_prompt(prompt: Any, place: str) -> bool:
    conversational, problem = _prompt_problem(prompt)
    if problem:
        raise UserError(f"{place} {problem}")
    return conversational


def _mixed(place: str, conversational: bool, first: str) -> str:
    kinds = ("standard (text)", "conversational (messages)")
    return (
        f"{place} field '{PROMPT}' is {kinds[conversational]} but {first} is "
        f"{kinds[not conversational]}; "
        "a dataset must be all one kind"
    )


def _prompt_problem(prompt: Any) -> tuple[bool, str | None]:
    """(is conversational, what is wrong with the prompt or None)."""
    if isinstance(prompt, str):
        return False, None
    if not isinstance(prompt, list):
        return False, (
            f"field '{PROMPT}' must be a string or a list of {{role, content}} messages, "
            f"got {type(prompt).__name__}"
        )
    if not prompt:
        return True, f"field '{PROMPT}' is an empty list of messages"
    for j, message in enumerate(prompt):
        field = f"'{PROMPT}[{j}]'"
        if not isinstance(message, Mapping):
            return (
                True,
                f"field {field} must be a {{role, content}} message, got {type(message).__name__}",
            )
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                what = "missing" if value is None else f"not a string ({type(value).__name__})"
                hint = (
                    " (multimodal content parts are not supported)"
                    if key == "content" and value
                    else ""
                )
                return True, f"field {field}.{key} is {what}{hint}"
    return True, None


def render_prompt(
    tokenizer: Any, prompt: Prompt, chat_template_kwargs: Mapping[str, Any] | None = None
) -> list[int]:
    """Token ids of `prompt` as TRL's GRPOTrainer makes them.

    Standard: `tokenizer(prompt).input_ids`, so the tokenizer's own convention decides BOS
    (a Llama tokenizer adds `<s>` once, a Qwen one adds nothing). Conversational: the chat
    template with the generation prompt, tokenized without special tokens, because the
    template already writes the BOS it wants.
    """
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"tokenizer of '{name}' has no chat_template; conversational prompts need a chat "
            "template (use a chat/instruct model, or standard text prompts)"
        )
    text = tokenizer.apply_chat_template(
        list(prompt), add_generation_prompt=True, tokenize=False, **dict(chat_template_kwargs or {})
    )
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@functools.lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation [n] (int64, read-only) of row indices that epoch `epoch` visits."""
    if n < 1 or epoch < 0:
        raise ValueError(f"n={n} must be >= 1 and epoch={epoch} >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, _EPOCH_SALT, epoch]))
    order = rng.permutation(n)
    order.flags.writeable = False  # cached: shared by every caller
    return order


def indices_for_step(n: int, seed: int, step: int, batch: int) -> np.ndarray:
    """Row indices [batch] (int64) of `step`: consecutive slices of the concatenated epochs.

    Position `step * batch + j` of the stream is element `pos % n` of `epoch_order(n, seed,
    pos // n)`, so a batch can straddle epochs (the end of e, then the start of e + 1) and any
    step is recomputed from (n, seed, step) alone: a resumed run continues exactly.
    """
    if n < 1 or step < 0 or batch < 1:
        raise ValueError(f"n={n} must be >= 1, step={step} >= 0 and batch={batch} >= 1")
    positions = np.arange(step * batch, (step + 1) * batch, dtype=np.int64)
    epochs = positions // n
    out = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        out[where] = epoch_order(n, seed, int(epoch))[positions[where] % n]
    return out


def filter_prompts(
    token_lists: Sequence[Sequence[int]], max_tokens: int | None, policy: str
) -> tuple[np.ndarray, list[list[int]], int]:
    """Apply `max_prompt_tokens`: (kept positions [k] int64, their token lists, skipped count).

    "skip" drops prompts longer than `max_tokens` and counts them; "truncate_left" keeps every
    prompt's last `max_tokens` tokens (this cuts off a leading BOS or the chat template's first
    turn: "skip" is the safer policy). `max_tokens=None` keeps everything.
    """
    if policy not in ("skip", "truncate_left"):
        raise UserError(f"max-prompt-tokens policy '{policy}' is not one of: skip, truncate_left")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_prompt_tokens={max_tokens} must be >= 1")
    lists = [list(tokens) for tokens in token_lists]
    if max_tokens is None:
        return np.arange(len(lists), dtype=np.int64), lists, 0
    if policy == "truncate_left":
        return np.arange(len(lists), dtype=np.int64), [t[-max_tokens:] for t in lists], 0
    kept = [i for i, tokens in enumerate(lists) if len(tokens) <= max_tokens]
    return np.array(kept, dtype=np.int64), [lists[i] for i in kept], len(lists) - len(kept)
