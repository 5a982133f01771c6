"""A directory of rollout shards with what it takes to read them as text again.

`hpcalign rescore` and `hpcalign export` work on either kind of rollout directory:

- an `hpcalign rollout` OUT directory: shards `shard-IIII-BBBBB.h5`, and a `manifest.json`
  naming the checkpoint (for its tokenizer) and the prompt dataset (for the prompts and
  their other columns), each checked against its recorded content hash first — a prompt
  file edited since would pair old completions with new prompts, silently;
- a run directory: `rollouts/step-*/shard-*.h5`, with the prompts and tokenizer of its
  `config.yaml` (the dataset or the built-in task, the model).

    source = open_rollout_dir("runs/r1/offline")
    for path in source.shards: ...
    source.texts(batch); source.prompt_rows(batch.prompt_ids)
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcalign.data.manifest import MANIFEST, content_hash, read_manifest
from hpcalign.data.shards import RolloutBatch
from hpcalign.data.sources import Prompts
from hpcalign.errors import UserError


@dataclass
class RolloutDir:
    path: str
    kind: str
    """"offline" (an `hpcalign rollout` OUT) or "run" (a RUN_DIR)."""
    shards: list[str]
    prompts: Prompts
    tokenizer: Any

    def texts(self, batch: RolloutBatch) -> list[str]:
        """The completions as the reward functions saw them when sampled (decoded, special
        tokens dropped: `engines.rollouts.sample_and_score`)."""
        return self.tokenizer.batch_decode([t.tolist() for t in batch.completion_tokens.to_list()],
                                           skip_special_tokens=True)

    def prompt_rows(self, prompt_ids: np.ndarray) -> list[Any]:
        """The dataset prompt of each sample (a string or chat messages)."""
        self._check_rows(prompt_ids)
        return [self.prompts.prompt(int(i)) for i in prompt_ids]

    def columns(self, prompt_ids: np.ndarray) -> dict[str, list]:
        """The dataset's other columns, one value per sample."""
        self._check_rows(prompt_ids)
        return self.prompts.column_values([int(i) for i in prompt_ids])

    def _check_rows(self, prompt_ids: np.ndarray) -> None:
        if len(prompt_ids) and (int(prompt_ids.min()) < 0
                                or int(prompt_ids.max()) >= len(self.prompts)):
            raise UserError(f"{self.path}: a shard names prompt row {int(prompt_ids.max())}, but "
                            f"{self.prompts.path} has {len(self.prompts)} rows")


def open_rollout_dir(path: str) -> RolloutDir:
    """The rollout directory `path` (offline OUT or RUN_DIR), or a UserError saying why not."""
    from hpcalign.data.datasets import load_prompt_dataset
    from hpcalign.models.hf import load_tokenizer

    if os.path.isfile(os.path.join(path, MANIFEST)):
        manifest = read_manifest(path)
        for what in ("checkpoint", "prompts"):
            source = manifest[what]
            if not os.path.exists(source["path"]):
                raise UserError(f"{path}: its {what} {source['path']} is gone (needed to read "
                                "the completions as text and pair them with their prompts)")
            if content_hash(source["path"]) != source["content_hash"]:
                raise UserError(f"{path}: its {what} {source['path']} changed since the "
                                "rollout (content hash differs from manifest.json)")
        shards = [os.path.join(path, s["file"]) for s in manifest["shards"]]
        return RolloutDir(path, "offline", shards, load_prompt_dataset(manifest["prompts"]["path"]),
                          load_tokenizer(manifest["checkpoint"]["path"]))
    if os.path.isfile(os.path.join(path, "config.yaml")):
        from hpcalign.data.sources import load_sources
        from hpcalign.launch.rundir import read_run_config
        from hpcalign.models.tokenizer import char_symbols

        cfg = read_run_config(path)
        tokenizer = load_tokenizer(cfg.model.path)
        symbols = char_symbols(tokenizer) if cfg.task is not None else None
        sources = load_sources(cfg, symbols=symbols)
        shards = sorted(glob.glob(os.path.join(path, "rollouts", "step-*", "shard-*.h5")))
        return RolloutDir(path, "run", shards, sources.train, tokenizer)
    raise UserError(f"{path}: neither an `hpcalign rollout` directory ({MANIFEST}) nor a run "
                    "directory (config.yaml)")
