"""The megatron-core training engine (`trainer.backend: megatron`).

Modules: `compat` (CPU patches), `model` (HF config -> GPTModel), `weights` (HF <-> megatron
state dicts for any TP x PP), `logprobs` (vocab-parallel log-probs), `parallel` (groups
and gathers), `checkpoint` (dist_checkpointing), `engine` (`MegatronTrainingEngine`).
Nothing here imports megatron-core at import time of this package.
"""
