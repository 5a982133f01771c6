"""Reward models: an HF sequence-classification head on a causal-LM backbone, scored at
the last token, trained with the Bradley-Terry loss on preference pairs.

The model is `AutoModelForSequenceClassification(num_labels=1)` built from the user's
causal-LM directory (the backbone's weights loaded, a new scalar `score` head seeded from
the config's seed), as TRL's RewardTrainer builds it, so the checkpoint it saves is one
`transformers` (and vLLM's reward-model runner) load as they load any reward model. A
sequence's reward is the head's output at its last real token: the index is taken from
the attention mask, not from searching for pad ids (the pad id may be an EOS the text
itself contains), and equals what transformers computes on the unpadded sequence.

Bradley-Terry (Ouyang et al. 2022, eq. 1; Llama 2's margin, Touvron et al. 2023):
    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)

    model = load_reward_model(base_dir, "float32", seed=0)
    rewards = sequence_rewards(model, input_ids, attention_mask)   # [B]
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from hpcalign.errors import UserError
from hpcalign.models.hf import _DTYPES, _WEIGHT_SUFFIXES, padding_id

# files of the base model that describe the causal LM itself: the reward model writes its own
_MODEL_FILES = ("config.json", "generation_config.json")


def load_reward_model(path: str, dtype: str = "float32", *, seed: int = 0) -> torch.nn.Module:
    """A scalar-head sequence classifier over the causal LM (or reward model) at `path`.

    A causal-LM directory gets a new `score` head, initialised from `seed`; a directory
    that already is a reward model (its config says so) loads whole.
    """
    if dtype not in _DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of {sorted(_DTYPES)}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path}: not an HF model directory (no config.json)")
    torch.manual_seed(seed)  # the new head's initialisation
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=_DTYPES[dtype], local_files_only=True,
            use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: cannot load a reward model ({type(err).__name__}: {err})") from err
    return model


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards [B] of right-padded sequences [B, T]: the head at each one's last real token."""
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    last = attention_mask.sum(-1) - 1  # [B]
    pooled = hidden[torch.arange(len(last), device=hidden.device), last]  # [B, H]
    return model.score(pooled).squeeze(-1).float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss [P]: -log sigmoid(r_chosen - r_rejected - margin)."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def pack_right(sequences: list[list[int]], pad_id: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] of right-padded sequences."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def save_reward_model(model: torch.nn.Module, tokenizer: Any, source_dir: str,
                      out_dir: str) -> None:
    """The reward model as an HF directory: its own config.json (sequence classification,
    one label, the pad id transformers pools with) and weights, and the base's tokenizer
    files byte for byte (so it tokenizes as the policy does)."""
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    model.config.pad_token_id = reward_pad_id(tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if (not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES) or name.startswith(".")
                or name in _MODEL_FILES):
            continue
        with open(path, "rb") as src, open(os.path.join(out_dir, name), "wb") as dst:
            dst.write(src.read())


def reward_pad_id(tokenizer: Any) -> int:
    """The id sequences are right-padded with (the tokenizer's pad, else its EOS)."""
    eos = tokenizer.eos_token_id
    return padding_id(tokenizer, () if eos is None else (int(eos),))
