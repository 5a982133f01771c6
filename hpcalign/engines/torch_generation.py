"""The plain-PyTorch generation engine: batched KV-cache sampling of an HF causal LM.

It wraps `hpcalign.models.sampler.sample` (left-padded prompts, one seeded generator on
the model's device, log-probs of the untruncated temperature-scaled policy) and the
model's own special tokens: it stops on any of the model's EOS ids and pads with the pad
token, or the first EOS where there is none. New weights come in place by name
(`hpcalign.comm.weights.ModuleLoader`), so a sender with another layout can feed it.

    engine = TorchGenerationEngine.build(model_dir, cfg, device=torch.device("cpu"))
    out = engine.generate([[1, 4, 5]] * 8, SamplingParams(max_new_tokens=16), seed=7)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hpcalign.comm.weights import ModuleLoader, load_into_module
from hpcalign.config.schema import Config
from hpcalign.engines.base import GenerationOutput, SamplingParams
from hpcalign.models.hf import eos_token_ids, load_model, padding_id
from hpcalign.models.precision import autocast
from hpcalign.models.sampler import sample, seeded_generator


class TorchGenerationEngine:
    """Sampling from an HF causal LM held in this process (CPU or one GPU)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, autocast_mode: str = "none",
                 eos_ids: tuple[int, ...] | None = None, pad_id: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.autocast_mode = autocast_mode
        self.eos_token_ids = eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer)
        self.pad_token_id = pad_id if pad_id is not None else padding_id(tokenizer,
                                                                         self.eos_token_ids)
        self.policy_version = 0
        self._loader: ModuleLoader | None = None

    @classmethod
    def build(cls, model_dir: str, cfg: Config, *, device: torch.device) -> TorchGenerationEngine:
        """The model of `model_dir` on `device`, frozen, in `cfg.model.dtype`."""
        model, tokenizer = load_model(model_dir, cfg.model.dtype)
        model.to(device).requires_grad_(False)
        return cls(model, tokenizer, autocast_mode=cfg.model.autocast)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 seed: int, *, sample_seeds: Sequence[int] | None = None) -> GenerationOutput:
        """Sample one completion per prompt; equal arguments give equal outputs (per device).
        `sample_seeds`: one random stream per prompt instead of one for the call."""
        if sample_seeds is None:
            generator = seeded_generator(self.model, seed)
        else:
            if len(sample_seeds) != len(prompt_token_ids):
                raise ValueError(f"{len(sample_seeds)} sample seeds for "
                                 f"{len(prompt_token_ids)} prompts")
            generator = [seeded_generator(self.model, int(s)) for s in sample_seeds]
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(self.model, self.autocast_mode):
                out = sample(self.model, [list(p) for p in prompt_token_ids],
                             max_new_tokens=params.max_new_tokens,
                             temperature=params.temperature, top_p=params.top_p,
                             top_k=params.top_k,
                             eos_id=[] if params.ignore_eos else list(self.eos_token_ids),
                             pad_id=self.pad_token_id,
                             generator=generator)
        finally:
            self.model.train(was_training)
        return GenerationOutput(token_ids=out.tokens, logprobs=out.logprobs,
                                finish_reasons=["stop" if f else "length" for f in out.finished])

    def weight_loader(self) -> ModuleLoader:
        """Copies received buckets into the model by name (checks the spec first)."""
        if self._loader is None:
            self._loader = load_into_module(self.model)
        return self._loader

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy `named` tensors into the model's parameters and buffers in place."""
        self.weight_loader()(list(named))
