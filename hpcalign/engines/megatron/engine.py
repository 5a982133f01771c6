"""The megatron-core training engine: an HF Llama/Qwen2 model trained with TP x PP x DP.

`MegatronTrainingEngine.build(model_dir, cfg, ...)` reads an HF directory (or a megatron
checkpoint written by `hpcalign convert hf-to-megatron`), builds this rank's part of a
megatron `GPTModel` (`model.py`), loads its shard of the weights (`weights.py`) and, when
given an `OptimizerSpec`, wraps it in megatron's DDP and optimizer. Compute goes through
megatron's pipeline schedules (`get_forward_backward_func`: no pipelining at PP=1, 1F1B
otherwise); per-token log-probs come from the vocabulary-sharded logits (`logprobs.py`).

    engine = MegatronTrainingEngine.build(model_dir, cfg, device=cpu, optimizer=spec,
                                          tp=2, pp=1)
    result = engine.train_step(micro_batches, loss_fn, temperature=1.0)
    engine.named_weights()   # HF names, whole tensors, on every rank
    engine.weight_sender(bucket_mb=64, src=0, group=g).sync()  # layer by layer to rank 0

Conventions are the torch engine's (`engines/torch_training.py`), so the roles cannot tell
them apart: losses are normalised for the global batch by `loss_fn` and summed (megatron's
`calculate_per_token_loss`: no division by micro-batches, DP gradients summed), AdamW
with weight decay on every parameter, global-norm clipping.

On CPU: `compat.apply()` first (FACTS.md). The distributed optimizer is not used: its
checkpoint format does not work on CPU (FACTS.md); `use_distributed_optimizer` stays off.

Beside generator ranks (a run): megatron's world is the trainer ranks, world ranks
0..trainer.ranks-1 (`parallel.megatron_world`, which every method that enters megatron
runs inside). Only the trainer ranks together hold the model, so the weight sync, the HF
export (`save_model`), checkpoints and the greedy-eval copy (`generation_view`) are
collective over them (`collective_weights`): each sends its shards unit by unit (the
embedding, one layer, the head) to world rank 0, which hands them on as HF-named tensors
(`parallel.hf_stream`), never holding more than a layer beyond its own shard, except where
a whole copy is the point (one safetensors file, the eval copy).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial, wraps
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from hpcalign.comm.weights import WeightSpec
from hpcalign.engines.base import LossFn, OptimizerSpec, TrainStepResult
from hpcalign.engines.megatron import compat
from hpcalign.engines.megatron import weights as W
from hpcalign.engines.megatron.checkpoint import (
    is_megatron_checkpoint,
    load_dist_checkpoint,
    load_training_checkpoint,
    read_meta,
    save_training_checkpoint,
)
from hpcalign.engines.megatron.logprobs import shard_logprobs
from hpcalign.engines.megatron.model import GptShape, build_gpt_model
from hpcalign.engines.megatron.parallel import (
    Ranks,
    broadcast_from_last_stage,
    ensure_world,
    global_state,
    hf_stream,
    init_model_parallel,
    megatron_world,
    set_trainer_world,
)
from hpcalign.models.hf import copy_model_files, eos_token_ids, load_tokenizer, padding_id
from hpcalign.models.logprobs import pack_sequences

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _hf_weights(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (sharded checkpoints too)."""
    names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        out.update(load_file(os.path.join(model_dir, name)))
    return out


def _in_megatron_world(method: Callable) -> Callable:
    """Run `method` with megatron's world as the default group (`parallel.megatron_world`)."""
    @wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with megatron_world():
            return method(*args, **kwargs)
    return wrapper


class MegatronTrainingEngine:
    """This rank's shard of one megatron GPT model; trains when built with an optimizer."""

    # the weights are sharded over the trainer ranks: named_weights, save_model,
    # save_checkpoint, generation_view and the weight sender need every trainer rank
    collective_weights = True

    def __init__(self, model: Any, shape: GptShape, padded_vocab: int, ranks: Ranks,
                 tokenizer: Any, source_dir: str, dtype: torch.dtype,
                 optimizer: OptimizerSpec | None, generation_config: Any = None) -> None:
        self.module = model  # the GPTModel (unwrapped)
        self.shape, self.padded_vocab, self.ranks = shape, padded_vocab, ranks
        self.tokenizer = tokenizer
        self.source_dir = source_dir  # the HF files (tokenizer, config) saved models keep
        self.dtype = dtype
        self.eos_token_ids = eos_token_ids(generation_config, tokenizer)
        self.pad_token_id = padding_id(tokenizer, self.eos_token_ids)
        self.device = torch.device("cpu") if compat.needed() else torch.device(
            "cuda", torch.cuda.current_device())
        self.spec = optimizer
        self.model: Any = model  # what the schedules run: DDP-wrapped when training
        self.optimizer: Any = None
        self._view: Any = None  # generation_view's HF copy (rank 0), and its loader
        self._view_loader: Any = None
        if optimizer is None:
            model.requires_grad_(False)
            model.eval()
        else:
            self._build_optimizer(optimizer)

    def _build_optimizer(self, spec: OptimizerSpec) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        self.module.train()
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=False)
        self.model = DistributedDataParallel(self.module.config, ddp_config, self.module)
        config = OptimizerConfig(
            optimizer="adam", lr=spec.lr, weight_decay=spec.weight_decay,
            adam_beta1=spec.betas[0], adam_beta2=spec.betas[1], adam_eps=1e-8,
            clip_grad=spec.grad_clip, bf16=self.dtype == torch.bfloat16,
            params_dtype=self.dtype, use_distributed_optimizer=False)
        with compat.cpu_factories():
            # config_overrides={}: weight decay on every parameter, as the torch engine's
            # AdamW (megatron's default exempts biases and norms)
            self.optimizer = get_megatron_optimizer(config, [self.model], config_overrides={})

    @classmethod
    def build(cls, model_dir: str, cfg: Any, *, device: torch.device | None = None,
              optimizer: OptimizerSpec | None = None, dp_group: Any = None, dp_size: int = 1,
              tp: int | None = None, pp: int | None = None) -> MegatronTrainingEngine:
        """The model of `model_dir` (HF directory or megatron checkpoint) for layout tp x pp.

        tp/pp default to `cfg.trainer.tp/pp`; DP is the rest of the world. `device`,
        `dp_group` and `dp_size` are the torch engine's arguments: megatron derives its
        own groups (the device is the CPU without CUDA, else the current CUDA device).
        """
        del device, dp_group, dp_size  # megatron's parallel state owns these
        trainer = getattr(cfg, "trainer", None)
        tp = tp or getattr(trainer, "tp", 1)
        pp = pp or getattr(trainer, "pp", 1)
        ensure_world()
        # a run: trainers are world ranks 0..trainer.ranks-1, generators the rest
        set_trainer_world(getattr(trainer, "ranks", None))
        with megatron_world():
            return cls._build(model_dir, cfg, optimizer, tp, pp)

    @classmethod
    def _build(cls, model_dir: str, cfg: Any, optimizer: OptimizerSpec | None, tp: int,
               pp: int) -> MegatronTrainingEngine:
        dtype = _DTYPES[cfg.model.dtype]
        ranks = init_model_parallel(tp, pp, seed=int(getattr(cfg, "seed", 1234)))
        if is_megatron_checkpoint(model_dir):
            meta = read_meta(model_dir)
            shape = GptShape(**meta["shape"])
            padded = int(meta["padded_vocab"])
            if padded % (128 * tp) and padded % tp:
                raise ValueError(f"{model_dir}: vocabulary padded to {padded}, not a multiple "
                                 f"of tp={tp}")
            source = os.path.join(model_dir, "hf")
            model = build_gpt_model(shape, tp=tp, pp=pp, dtype=dtype, padded_vocab=padded)
            load_dist_checkpoint(model, model_dir)
        else:
            source = model_dir
            shape = GptShape.from_hf_dir(model_dir)
            padded = shape.padded_vocab(tp)
            model = build_gpt_model(shape, tp=tp, pp=pp, dtype=dtype, padded_vocab=padded)
            hf = {k: v.to(dtype) for k, v in _hf_weights(model_dir).items()}
            _load_local(model, W.local_state(W.hf_to_global(hf, shape, padded), shape, tp=tp,
                                             tp_rank=ranks.tp_rank, pp=pp,
                                             pp_rank=ranks.pp_rank))
        tokenizer = load_tokenizer(source)
        return cls(model, shape, padded, ranks, tokenizer, source, dtype, optimizer,
                   generation_config=_generation_config(source))

    # ------------------------------------------------------------ compute
    def pack(self, prompts: Sequence[Sequence[int]],
             completions: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-padded [B, T] `input_ids`, `attention_mask`, `completion_mask`."""
        batch = pack_sequences(list(prompts), list(completions), self.pad_token_id)
        return {key: value.to(self.device) for key, value in batch.items()}

    def _run(self, micro_batches: Sequence[dict[str, torch.Tensor]], loss_of: Callable,
             forward_only: bool) -> list[Any]:
        """megatron's schedule over `micro_batches`; returns the last stage's loss_of outputs.

        Pipelined schedules need one [T, B] shape per call: micro-batches are padded to the
        longest T (right padding: causal attention leaves earlier positions unchanged) and
        run in one call per distinct B.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        seq = max(int(b["input_ids"].shape[1]) for b in micro_batches)
        groups: list[list[int]] = []
        for index, batch in enumerate(micro_batches):
            if groups and micro_batches[groups[-1][0]]["input_ids"].shape[0] == \
                    batch["input_ids"].shape[0]:
                groups[-1].append(index)
            else:
                groups.append([index])
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=self.device),
                            diagonal=1)[None, None]  # [1, 1, T, T], True = masked
        positions = torch.arange(seq, device=self.device)[None]
        outputs: list[Any] = []

        def collect(index: int, logits: torch.Tensor, non_loss_data: bool = False) -> Any:
            result = loss_of(index, logits)
            if forward_only:
                outputs.append(result)
                return result
            loss, metrics = result
            outputs.append(metrics)
            # (loss, token count, reduced dict): with calculate_per_token_loss the schedule
            # backpropagates `loss` as is (loss_fn has normalised it for the global batch)
            return loss, torch.tensor(1, dtype=torch.int), {}

        def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable]:
            index = next(data_iterator)
            ids = micro_batches[index]["input_ids"]
            padded = torch.full((ids.shape[0], seq), self.pad_token_id, dtype=ids.dtype,
                                device=ids.device)
            padded[:, : ids.shape[1]] = ids
            output = model(padded, positions.expand(ids.shape[0], -1), causal)
            return output, partial(collect, index)

        schedule = get_forward_backward_func()
        for group in groups:
            with compat.cpu_factories():
                schedule(forward_step_func=forward_step, data_iterator=iter(group),
                         model=[self.model], num_microbatches=len(group), seq_length=seq,
                         micro_batch_size=int(micro_batches[group[0]]["input_ids"].shape[0]),
                         forward_only=forward_only, collect_non_loss_data=forward_only)
        return outputs

    def _logprobs_of(self, batch: dict[str, torch.Tensor], logits: torch.Tensor,
                     temperature: float, with_entropy: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of `batch` from the last stage's logits [B, T_run, V_pad/tp]."""
        length = batch["input_ids"].shape[1]
        return shard_logprobs(logits[:, :length], batch["input_ids"], batch["completion_mask"],
                              temperature=temperature, vocab=self.shape.vocab,
                              tp_rank=self.ranks.tp_rank, with_entropy=with_entropy)

    @torch.no_grad()
    @_in_megatron_world
    def logprobs(self, batch: dict[str, torch.Tensor], *, temperature: float,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logp, entropy) [B, T] float32 without gradients, on every rank."""
        was_training = self.module.training
        self.module.eval()
        try:
            found = self._run([batch], lambda _i, logits: self._logprobs_of(
                batch, logits, temperature, with_entropy), forward_only=True)
        finally:
            self.module.train(was_training)
        shape = batch["input_ids"].shape
        if self.ranks.last_stage:
            logp, entropy = found[0]
        else:
            logp = torch.empty(shape, dtype=torch.float32, device=self.device)
            entropy = torch.empty_like(logp) if with_entropy else None
        logp = broadcast_from_last_stage(logp.contiguous(), self.ranks)
        if entropy is not None:
            entropy = broadcast_from_last_stage(entropy.contiguous(), self.ranks)
        return logp, entropy

    @_in_megatron_world
    def train_step(self, micro_batches: Sequence[dict[str, torch.Tensor]], loss_fn: LossFn, *,
                   temperature: float, with_entropy: bool = False,
                   after_backward: Callable[[], None] | None = None) -> TrainStepResult:
        """Gradients of `loss_fn` over `micro_batches` (summed over micro-batches and DP),
        tied-embedding gradients joined across stages, clipped, one AdamW step.

        `after_backward` runs once after the schedule's backward passes (megatron runs
        forward and backward inside one call; there is no per-micro-batch hook).
        """
        from megatron.core.distributed import finalize_model_grads

        if self.optimizer is None or self.spec is None:
            raise RuntimeError("train_step on a frozen engine (built without an optimizer)")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

        def loss_of(index: int, logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            batch = micro_batches[index]
            logp, entropy = self._logprobs_of(batch, logits, temperature, with_entropy)
            return loss_fn(index, batch, logp, entropy)

        metrics = self._run(micro_batches, loss_of, forward_only=False)
        if after_backward is not None:
            after_backward()
        # DP all-reduce (summed: calculate_per_token_loss) + embedding grads across stages
        finalize_model_grads([self.model], num_tokens=None)
        with compat.cpu_factories():
            _, grad_norm, _ = self.optimizer.step()
        totals = self._sum_metrics(metrics)
        norm = math.nan if self.spec.grad_clip <= 0 or grad_norm is None else float(grad_norm)
        return TrainStepResult(metrics=totals, grad_norm=norm)

    def _sum_metrics(self, metrics: list[dict[str, float]]) -> dict[str, float]:
        """The last stage's metrics summed over micro-batches and DP, on every rank."""
        from megatron.core import parallel_state as ps

        totals: dict[str, float] = {}
        for entry in metrics:
            for key, value in entry.items():
                totals[key] = totals.get(key, 0.0) + value
        if self.ranks.last_stage and self.ranks.dp > 1:
            keys = sorted(totals)
            summed = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(summed, group=ps.get_data_parallel_group())
            totals = dict(zip(keys, summed.tolist()))
        if self.ranks.pp > 1:
            box = [totals]
            dist.broadcast_object_list(box, src=_last_stage_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            totals = box[0]
        return totals

    # ------------------------------------------------------------ weights and state
    @property
    def data_parallel(self) -> tuple[int, int, Any]:
        """(DP size, this rank's DP index, DP group): how a step's samples split over
        the trainer ranks (TP and PP peers take the same samples)."""
        from megatron.core import parallel_state as ps

        return self.ranks.dp, self.ranks.dp_rank, ps.get_data_parallel_group()

    def _local_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.module.state_dict().items() if "_extra_state" not in k}

    @_in_megatron_world
    def global_state(self) -> dict[str, torch.Tensor]:
        """The whole global megatron state dict (TP x PP gathered) on every rank."""
        return global_state(self._local_state(), self.shape, self.padded_vocab, self.ranks)

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Whole weights under HF names (vocabulary padding cut off; a tied head once), on
        every rank (collective; tests and small models: a run sends `hf_weight_stream`)."""
        return list(W.global_to_hf(self.global_state(), self.shape).items())

    def hf_weight_spec(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(HF name, shape, dtype) of every tensor `hf_weight_stream` yields, in its order,
        from the mapping itself on shapes alone (meta tensors: nothing gathered)."""
        sizes = W.global_shapes(self.shape, self.padded_vocab)
        spec = []
        for _stage, names in W.sync_units(self.shape, self.ranks.pp):
            meta = {n: torch.empty(sizes[n], dtype=self.dtype, device="meta") for n in names}
            spec += [(name, tuple(t.shape), t.dtype)
                     for name, t in W.unit_to_hf(meta, names, self.shape).items()]
        return spec

    def hf_weight_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named whole tensors on world rank 0, unit by unit (`parallel.hf_stream`);
        every trainer rank must run it to the end at the same time."""
        with torch.no_grad():
            yield from hf_stream(self._local_state(), self.shape, self.padded_vocab, self.ranks)

    def weight_sender(self, bucket_mb: float, src: int = 0, group: Any = None) -> Any:
        """The weight sync's sending side, `.sync()` on every trainer rank: rank `src`
        (world rank 0) broadcasts the streamed HF tensors to `group` in coalesced buckets
        (`comm.weights.StreamedWeightSender`: `NamedWeightReceiver`s receive them), the
        other trainer ranks send it their shards."""
        from hpcalign.comm.weights import StreamedWeightSender

        if dist.get_rank() != src:
            return _StreamDriver(self)
        return StreamedWeightSender(self.hf_weight_spec(), self.hf_weight_stream, bucket_mb,
                                    src=src, group=group, device=self.device)

    @_in_megatron_world
    def save_model(self, out_dir: str) -> None:
        """An HF directory (safetensors + the input's tokenizer/config files) from rank 0.

        Every trainer rank must call it (the gather is collective); `out_dir` counts on
        rank 0 only, which holds the whole model once to write one file."""
        named = {name: tensor.cpu() for name, tensor in self.hf_weight_stream()}
        if dist.get_rank() == 0:
            os.makedirs(out_dir, mode=0o700, exist_ok=True)
            save_file(named, os.path.join(out_dir, "model.safetensors"),
                      metadata={"format": "pt"})
            copy_model_files(self.source_dir, out_dir)
        dist.barrier()

    def save_checkpoint(self, run_dir: str, step: int, state: dict[str, Any], keep: int) -> str:
        """Collective over the trainer ranks; rank 0's `state` is written."""
        if self.optimizer is None:
            raise RuntimeError("a frozen engine has no training state to checkpoint")
        return save_training_checkpoint(self, run_dir, step, state, keep)

    def load_checkpoint(self, run_dir: str, step: int) -> dict[str, Any]:
        if self.optimizer is None:
            raise RuntimeError("a frozen engine has no training state to restore")
        return load_training_checkpoint(self, run_dir, step)

    def generation_view(self) -> Any:
        """A torch sampler over an HF copy of the current weights on world rank 0 (greedy
        evaluation), None on the other ranks. Collective over the trainer ranks: the copy
        is made once and refreshed in place, unit by unit, at every call.

        TODO: a megatron-native sampler would sample from the shards without a copy.
        """
        from hpcalign.comm.weights import load_into_module

        if dist.get_rank() != 0:
            for _ in self.hf_weight_stream():
                pass
            return None
        if self._view is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            from hpcalign.engines.torch_generation import TorchGenerationEngine

            config = AutoConfig.from_pretrained(self.source_dir, local_files_only=True)
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            if self.shape.tied:
                model.tie_weights()
            self._view = TorchGenerationEngine(model.eval(), self.tokenizer,
                                               autocast_mode="none", eos_ids=self.eos_token_ids,
                                               pad_id=self.pad_token_id)
            self._view_loader = load_into_module(model)
            self._view_loader.check_spec(WeightSpec.of(
                [(n, torch.empty(s, dtype=d, device="meta")) for n, s, d in
                 self.hf_weight_spec()], 1))
        for name, tensor in self.hf_weight_stream():
            self._view_loader([(name, tensor)])
        return self._view


class _StreamDriver:
    """A trainer rank other than the sender: its part of every sync is sending its
    shards on (the stream yields nothing here)."""

    def __init__(self, engine: MegatronTrainingEngine) -> None:
        self.engine = engine

    def sync(self) -> None:
        for _ in self.engine.hf_weight_stream():
            pass


def _last_stage_rank() -> int:
    from megatron.core import parallel_state as ps

    return dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[-1]


def _load_local(model: Any, local: dict[str, torch.Tensor]) -> None:
    """Load this rank's tensors; every parameter must be covered (no silent random init)."""
    missing, unexpected = model.load_state_dict(local, strict=False)
    missing = [k for k in missing if "_extra_state" not in k]
    if missing or unexpected:
        raise RuntimeError(f"megatron state dict mismatch: missing {missing}, "
                           f"unexpected {unexpected}")


def _generation_config(model_dir: str) -> SimpleNamespace:
    """What `eos_token_ids` reads of a model (generation_config.json's EOS list, else
    config.json's), without building the HF model."""
    from transformers import GenerationConfig

    generation = None
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    with open(os.path.join(model_dir, "config.json")) as handle:
        eos = json.load(handle).get("eos_token_id")
    return SimpleNamespace(generation_config=generation, config=SimpleNamespace(eos_token_id=eos))
