"""Preference pairs in TRL's format: `prompt`, `chosen`, `rejected` (optional `margin`).

TRL's preference datasets (https://huggingface.co/docs/trl/dataset_formats, "explicit
prompt") come in the two shapes its prompt-only datasets do:

    standard        {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    conversational  {"prompt": [{"role": "user", "content": "2+2?"}],
                     "chosen": [{"role": "assistant", "content": "4"}],
                     "rejected": [{"role": "assistant", "content": "5"}]}

loaded from the same files as prompts (JSONL, Parquet, a `save_to_disk` directory:
`data.datasets.load_prompt_dataset`, whose checks and error places they share). A pair
becomes token ids the way a policy's sample does: the prompt rendered by
`render_prompt` (the tokenizer's own BOS, or the chat template with the generation
prompt), then the completion's text tokenized without special tokens and the tokenizer's
EOS (which ends every finished sample), so a reward model trained here scores a policy's
completions in the very layout the generator produces (as TRL appends EOS to them too).

    pairs = load_preference_dataset("pairs.jsonl")
    prompt_ids, chosen_ids, rejected_ids = pairs.tokens(tokenizer, i)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hpcalign.data.datasets import PromptDataset, load_prompt_dataset, render_prompt
from hpcalign.errors import UserError

CHOSEN, REJECTED, MARGIN = "chosen", "rejected", "margin"


def _place(dataset: PromptDataset, i: int) -> str:
    path = dataset.path
    return f"{path}:{i + 1}:" if path.endswith((".jsonl", ".json")) else f"{path}: row {i} (0-based)"


def completion_text(value: Any, field: str, place: str) -> str:
    """The text of a `chosen`/`rejected` value: a string, or the content of its assistant
    message(s) (TRL's conversational shape)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, message in enumerate(value):
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
                raise UserError(f"{place} field '{field}[{j}]' must be a {{role, content}} "
                                "message with string content")
            if message.get("role") != "assistant":
                raise UserError(f"{place} field '{field}[{j}]'.role is "
                                f"{message.get('role')!r}; a completion's messages are the "
                                "assistant's (put the conversation so far in 'prompt')")
            texts.append(message["content"])
        return "".join(texts)
    raise UserError(f"{place} field '{field}' must be a string or a list of assistant "
                    f"messages, got {type(value).__name__ if value is not None else 'nothing'}")


class PreferenceDataset:
    """Pairs held in memory: each row's prompt, chosen and rejected texts and margin."""

    def __init__(self, prompts: PromptDataset, chosen: list[str], rejected: list[str],
                 margins: list[float]) -> None:
        self.prompts = prompts
        self.path = prompts.path
        self.is_conversational = prompts.is_conversational
        self.chosen, self.rejected, self.margins = chosen, rejected, margins

    def __len__(self) -> int:
        return len(self.chosen)

    def tokens(self, tokenizer: Any, i: int) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, chosen ids, rejected ids) of pair `i` (see the module docstring)."""
        prompt_ids = render_prompt(tokenizer, self.prompts.prompt(i))
        eos = tokenizer.eos_token_id
        chosen, rejected = (list(tokenizer(text, add_special_tokens=False).input_ids)
                            for text in (self.chosen[i], self.rejected[i]))
        if eos is not None:  # a finished sample ends with EOS: score what the generator writes
            chosen, rejected = ([*ids, eos] if not ids or ids[-1] != eos else ids
                                for ids in (chosen, rejected))
        if not chosen or not rejected:
            raise UserError(f"{_place(self.prompts, i)} an empty "
                            f"'{CHOSEN if not chosen else REJECTED}' completion (nothing for "
                            "the reward model to score)")
        return prompt_ids, chosen, rejected


class TokenizedPairs:
    """The token ids of the pairs within `max_tokens` (prompt + the longer completion), in
    dataset order, with their margins: what `train-rm` and DPO train on."""

    def __init__(self, pairs: PreferenceDataset, tokenizer: Any, max_tokens: int | None) -> None:
        self.path = pairs.path
        self.prompts: list[list[int]] = []
        self.chosen: list[list[int]] = []
        self.rejected: list[list[int]] = []
        self.margins: list[float] = []
        self.skipped = 0
        for i in range(len(pairs)):
            prompt, chosen, rejected = pairs.tokens(tokenizer, i)
            if max_tokens is not None and len(prompt) + max(len(chosen), len(rejected)) > max_tokens:
                self.skipped += 1
                continue
            self.prompts.append(prompt)
            self.chosen.append(chosen)
            self.rejected.append(rejected)
            self.margins.append(pairs.margins[i])
        if not self.prompts:
            raise UserError(f"{pairs.path}: every pair is longer than data.max_tokens={max_tokens}")

    def __len__(self) -> int:
        return len(self.prompts)


def load_preference_dataset(path: str) -> PreferenceDataset:
    """The pairs at `path`, every row checked: a UserError names the file, line or row and
    field of the first bad one (a missing `chosen`, a message without content, ...)."""
    dataset = load_prompt_dataset(path)
    missing = [c for c in (CHOSEN, REJECTED) if c not in dataset.columns]
    if missing:
        raise UserError(f"{path}: no {' and '.join(repr(c) for c in missing)} column (columns: "
                        f"{', '.join(['prompt', *dataset.columns])}); TRL's preference format "
                        "is prompt, chosen, rejected")
    columns = dataset.column_values(range(len(dataset)))
    texts = {field: [completion_text(v, field, _place(dataset, i))
                     for i, v in enumerate(columns[field])] for field in (CHOSEN, REJECTED)}
    margins = []
    for i, margin in enumerate(columns.get(MARGIN, [None] * len(dataset))):
        if margin is not None and not (isinstance(margin, int | float)
                                       and not isinstance(margin, bool) and math.isfinite(margin)):
            raise UserError(f"{_place(dataset, i)} field '{MARGIN}' must be a finite number, "
                            f"got {margin!r}")
        margins.append(0.0 if margin is None else float(margin))
    return PreferenceDataset(dataset, texts[CHOSEN], texts[REJECTED], margins)
