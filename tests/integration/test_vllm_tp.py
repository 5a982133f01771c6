"""vLLM with tensor_parallel_size 2: one engine over two generator ranks (CPU build, gloo).

Both ranks of a generator group build the same `vllm.LLM` with vLLM's external-launcher
executor (each holds one TP shard, in its own process) inside the run's torch.distributed
world, bring their own prompt rows to each `generate` and keep their own outputs
(engines/vllm_generation.py, docs/vllm.md). Checked for real:

- a GRPO run, `hpcalign run` with 1 trainer + 2 generator ranks forming one TP=2 engine:
  the trainer's recomputed log-probs equal vLLM's at step 0 and after a weight sync in
  10 KiB buckets (which cut layers apart), and both generators publish their shards;
- the engine in a 3-rank mpiexec world (this file run as a script: rank 0 plays trainer 0
  and sends perturbed weights through `NamedWeightSender`): seeded calls repeat exactly,
  log-probs equal the torch model's before and after the sync, the sync changes the
  samples, and loading the original weights back gives the first samples again, bitwise.

The config checks at the end need no vLLM. The rest is skipped where vllm is not installed
(the main venv: `make test` runs this file in .venv-vllm too).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hpcalign.launch.local import run_mpiexec

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (.venv-vllm: make install-vllm)")

TEMPERATURE = 0.7  # != 1: vLLM's processed (temperature-scaled) log-probs are the ones used
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]
ROWS = {1: PROMPTS * 2, 2: PROMPTS[1:]}  # generator 1's and 2's own rows (8 and 3)


def config(model_dir: str, **generator):
    from hpcalign.config.schema import Config

    return Config(run_dir="unused", model={"path": model_dir}, data={"train": "unused.jsonl"},
                  reward={"functions": ["exact_match"]}, trainer={"ranks": 1},
                  generator={"backend": "vllm", "ranks": 2, "temperature": TEMPERATURE,
                             "vllm": {"tensor_parallel_size": 2, "kv_cache_gb": 0.1,
                                      "max_model_len": 256}, **generator})


# ------------------------------------------------------------- the mpiexec world (script)
def _worst_logprob_gap(trainer, rows, out) -> float:
    import torch

    batch = trainer.pack(rows, out.token_ids)
    logp, _ = trainer.logprobs(batch, temperature=TEMPERATURE)
    mask = batch["completion_mask"].bool()
    return max(float((logp[i][mask[i]].cpu() - torch.tensor(lp)).abs().max())
               for i, lp in enumerate(out.logprobs))


def _world_main(model_dir: str, run_dir: str, device_kind: str = "cpu") -> int:
    """3 ranks: world rank 0 is trainer 0 (it sends), ranks 1, 2 run one TP=2 engine.

    device_kind "cuda" (tests/gpu): an NCCL world, rank r on GPU r; with 2 ranks (a 2-GPU
    machine) there is no trainer rank and the new weights go in through `load_weights`.
    """
    import torch
    import torch.distributed as dist
    from mpi4py import MPI

    from hpcalign.comm.control import Control
    from hpcalign.comm.weights import (
        NamedWeightReceiver,
        NamedWeightSender,
        init_distributed,
        unique_named_tensors,
    )
    from hpcalign.engines import SamplingParams, build_generation_engine
    from hpcalign.engines.torch_training import TorchTrainingEngine

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    control = Control(comm, 300, lambda r: f"world rank {r}")
    init_distributed(control, run_dir, "nccl" if device_kind == "cuda" else "gloo", 300,
                     device, f"world rank {rank}")
    torch.set_num_threads(1)
    generators = list(range(size - 2, size))  # [1, 2] beside trainer 0; [0, 1] alone
    # as roles/main.py: trainer 0 + every generator
    sync_group = dist.new_group([0, *generators]) if size == 3 else None
    cfg = config(model_dir)
    trainer = TorchTrainingEngine.build(model_dir, cfg, device=device)  # the torch policy
    original = [(n, t.detach().clone()) for n, t in unique_named_tensors(trainer.named_weights())]
    noise = torch.Generator().manual_seed(0)
    changed = [(n, t + 0.2 * torch.randn(t.shape, generator=noise).to(t.device))
               for n, t in original]
    report: dict = {}
    if rank not in generators:
        NamedWeightSender(changed, bucket_mb=16 / 1024, src=0, group=sync_group).sync()
    else:
        engine = build_generation_engine("vllm", model_dir, cfg, device=device, group=generators)
        params = SamplingParams(max_new_tokens=10, temperature=TEMPERATURE)
        index = generators.index(rank)
        rows = ROWS[index + 1]
        first = engine.generate(rows, params, seed=index)
        report["rows"] = [len(first.token_ids), len(rows)]
        report["repeats"] = engine.generate(rows, params, seed=index) == first
        report["gap_before"] = _worst_logprob_gap(trainer, rows, first)
        if sync_group is not None:
            receiver = NamedWeightReceiver(engine.weight_loader(), src=0, group=sync_group,
                                           device=engine.device)
            receiver.sync()  # whole tensors in 16 KiB buckets; vLLM takes this rank's shards
        else:
            engine.load_weights(changed)
        after = engine.generate(rows, params, seed=index)
        report["changed"] = after.token_ids != first.token_ids
        trainer.model.load_state_dict(dict(changed), strict=False)  # tied head: shared storage
        report["gap_after"] = _worst_logprob_gap(trainer, rows, after)
        engine.load_weights(original)
        report["restored"] = engine.generate(rows, params, seed=index) == first
    reports = comm.gather(report, root=0)
    if rank == 0:
        print("REPORTS " + json.dumps([r for r in reports if r]), flush=True)
    return 0


def run_world(model_dir: str, run_dir: str, ranks: int = 3, device_kind: str = "cpu") -> list:
    """This file as `mpiexec -n ranks` (`_world_main`); the generator ranks' reports."""
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    argv = [exe, "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        argv.append("--allow-run-as-root")
    argv += ["-n", str(ranks), sys.executable, os.path.abspath(__file__), model_dir, run_dir,
             device_kind]
    result = run_mpiexec(argv, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORTS "))
    return json.loads(line.removeprefix("REPORTS "))


def check_reports(reports: list) -> None:
    assert [r["rows"] for r in reports] == [[8, 8], [3, 3]]  # each rank its own rows back
    for r in reports:
        assert r["repeats"] and r["changed"] and r["restored"], r
        assert r["gap_before"] < 1e-4 and r["gap_after"] < 1e-4, r


# ------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from standins import qwen_standin

    # head_dim 32 (vLLM's CPU attention), 4 query and 2 key/value heads: 2 and 1 per TP rank
    return qwen_standin(tmp_path_factory.mktemp("vllm-tp") / "qwen", hidden=128)


@needs_vllm
def test_one_engine_over_two_ranks_is_seeded_exact_and_takes_the_sync(model_dir, tmp_path):
    check_reports(run_world(model_dir, str(tmp_path)))


@needs_vllm
def test_grpo_run_with_one_vllm_engine_over_two_generator_ranks(tmp_path):
    import numpy as np
    from local_runs import ROOT, hpcalign_argv, metrics

    from hpcalign.data.shards import read_shard, shard_path

    argv = hpcalign_argv(
        "run", os.path.join(ROOT, "configs", "grpo-vllm-tiny.yaml"), f"run_dir={tmp_path}",
        "generator.ranks=2", "generator.vllm.tensor_parallel_size=2", "trainer.steps=2",
        "trainer.sft_warmup_steps=5", "trainer.lr=3e-3", "sync.bucket_mb=0.01",
        "log.progress=false", "log.eval_every_steps=0", "log.tensorboard=false",
        "comm.timeout_s=240", "checkpoint.every_steps=0")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())["generator"]
    assert (plan["ranks"], plan["tp"], plan["dp"]) == (2, 2, 1)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]
    # on-policy: step 0 from the weights on disk, step 1 after the sync (lr 3e-3: a stale
    # engine would be off by the update's change, far above 1e-4)
    for row in rows:
        assert row["logprob_mismatch_max"] < 1e-4, row
    for step in range(2):
        for generator in range(2):
            shard = read_shard(shard_path(str(tmp_path), step, generator))
            assert shard.policy_version == step
            ids, counts = np.unique(shard.prompt_ids, return_counts=True)
            assert len(ids) == 8 and set(counts.tolist()) == {8}  # its 8 groups of 8


# ----------------------------------------------------------- config and placement (no vLLM)
def test_generator_ranks_must_fill_whole_engines():
    from hpcalign.config.load import load_config
    from hpcalign.errors import ConfigError

    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "grpo-vllm-tiny.yaml")
    with pytest.raises(ConfigError, match=r"generator.ranks=3 must be a multiple of "
                                          r"generator.vllm.tensor_parallel_size=2"):
        load_config(tiny, ["generator.ranks=3", "generator.prompts_per_step=12",
                           "generator.vllm.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="generator.refill_rounds=1 is not supported"):
        load_config(tiny, ["generator.ranks=2", "generator.vllm.tensor_parallel_size=2",
                           "generator.refill_rounds=1"])
    # the torch engine ignores the vllm section
    torch_cfg = load_config(tiny, ["generator.backend=torch", "generator.ranks=3",
                                   "generator.prompts_per_step=12",
                                   "generator.vllm.tensor_parallel_size=2"])
    from hpcalign.plan.placement import compute_placement

    assert compute_placement(torch_cfg).generator.tp == 1


def test_placement_groups_consecutive_generator_ranks():
    from hpcalign.config.load import load_config
    from hpcalign.plan.placement import compute_placement

    tiny = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "grpo-vllm-tiny.yaml")
    cfg = load_config(tiny, ["trainer.ranks=2", "generator.ranks=4",
                             "generator.vllm.tensor_parallel_size=2"])
    gen = compute_placement(cfg).generator
    assert (gen.first_rank, gen.tp, gen.dp) == (2, 2, 2)
    assert [gen.tp_group(r) for r in range(2, 6)] == [[2, 3], [2, 3], [4, 5], [4, 5]]
    with pytest.raises(ValueError, match="world rank 1 is not a generator rank"):
        gen.tp_group(1)


def test_tensor_parallel_engine_outside_a_run_is_refused(model_dir):
    import torch

    from hpcalign.engines.vllm_generation import VllmGenerationEngine
    from hpcalign.errors import UserError

    with pytest.raises(UserError, match="tensor_parallel_size=2 runs one vLLM engine over 2 "
                                        "generator ranks of a run"):
        VllmGenerationEngine.build(model_dir, config(model_dir), device=torch.device("cpu"))


if __name__ == "__main__":
    sys.exit(_world_main(*sys.argv[1:4]))
