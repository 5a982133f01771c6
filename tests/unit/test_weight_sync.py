"""Weight sync by name (hpcalign/comm/weights.py) over real gloo, 3 local processes.

Rank 0 sends a tiny tied Qwen2 (float32); rank 1 receives into a freshly initialised
float32 copy, rank 2 into a bfloat16 copy whose parameters are registered in reverse order
(so position-based copying would scramble it). Three bucket sizes, one smaller than the
biggest tensor, two versions each. The error paths run in-process on real specs.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpcalign.comm.weights import (
    NamedWeightReceiver,
    NamedWeightSender,
    WeightSpec,
    coalesce_in_place,
    load_into_module,
    unique_named_tensors,
)
from hpcalign.config.schema import ModelInit
from hpcalign.models.tiny import build_model

VOCAB = 200  # embedding 200 x 64 float32 = 51,200 bytes: the biggest tensor
# (bucket MB, what the sender's named source is)
SCENARIOS = [(0.01, "reversed"), (0.1, "state_dict"), (64.0, "named_parameters")]


def tiny(seed: int, tie: bool = True, vocab: int = VOCAB) -> torch.nn.Module:
    init = ModelInit(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                     tie_embeddings=tie, seed=seed)
    return build_model(init, vocab_size=vocab)


@torch.no_grad()
def set_version(model: torch.nn.Module, version: int) -> None:
    """Deterministic weights per version, the same in every process."""
    generator = torch.Generator().manual_seed(version)
    for _, param in model.named_parameters():
        param.copy_(torch.randn(param.shape, generator=generator))


def reverse_registration(module: torch.nn.Module) -> None:
    """Same names, reverse order of named_parameters(): a model laid out differently."""
    for sub in module.modules():
        sub._parameters = dict(reversed(sub._parameters.items()))
        sub._modules = dict(reversed(sub._modules.items()))


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=3, timeout=datetime.timedelta(seconds=30))
    try:
        expected = tiny(0)
        if rank == 0:
            model = tiny(0)
            sources = {"reversed": lambda: list(reversed(list(model.named_parameters()))),
                       "state_dict": lambda: model.named_parameters(remove_duplicate=False),
                       "named_parameters": model.named_parameters}
        else:
            model = tiny(rank)
            if rank == 2:
                model.to(torch.bfloat16)
                reverse_registration(model)
                names = [n for n, _ in model.named_parameters()]
                assert names != [n for n, _ in expected.named_parameters()]
        for index, (bucket_mb, source) in enumerate(SCENARIOS):
            if rank == 0:
                side = NamedWeightSender(sources[source], bucket_mb, src=0)
            else:
                side = NamedWeightReceiver(load_into_module(model), src=0, device="cpu")
            for version in (2 * index + 1, 2 * index + 2):
                set_version(model if rank == 0 else expected, version)
                if rank:
                    set_version(model, 1000 + version)  # stale values must not survive
                side.sync()
                if rank == 0:
                    continue
                got = dict(model.named_parameters(remove_duplicate=False))
                for name, want in expected.named_parameters(remove_duplicate=False):
                    want = want if rank == 1 else want.to(torch.bfloat16)
                    assert got[name].dtype == want.dtype, name
                    assert torch.equal(got[name], want), (bucket_mb, source, version, name)
            spec = side.spec
            assert spec is not None and len(spec.tensors) == len(list(expected.parameters()))
            if bucket_mb == 0.01:  # the embedding is bigger than a bucket: it goes alone
                buckets = spec.buckets()
                alone = [b for b in buckets if b.nbytes > spec.bucket_bytes]
                assert alone and all(len(b.indices) == 1 for b in alone)
                assert any(len(b.indices) > 1 for b in buckets)  # small ones coalesce
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_named_sync_fp32_and_bf16_any_order_any_bucket(tmp_path):
    # NOTE: fork, not spawn: a spawned child re-imports torch and transformers (~4 s each on
    # the shared 2-core machine); nothing in this process has started gloo or CUDA.
    mp.start_processes(_worker, args=(str(tmp_path / "store"),), nprocs=3,
                       start_method="fork")


def test_spec_round_trips_and_refuses_malformed_bytes():
    named = unique_named_tensors(tiny(0).named_parameters(remove_duplicate=False))
    spec = WeightSpec.of(named, 4096)
    assert WeightSpec.decode(spec.encode()) == spec
    assert "lm_head.weight" not in [t.name for t in spec.tensors]  # tied: sent once
    for bad in (b"\x80\x04pickle", b"[1, 2]", b'{"format": "other"}',
                spec.encode().replace(b'"float32"', b'"object"'),
                spec.encode().replace(b"4096", b"-1")):
        with pytest.raises(ValueError, match="weight spec"):
            WeightSpec.decode(bad)


def test_bucket_plan_splits_on_size_and_dtype():
    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("big", torch.zeros(100)),
               ("c", torch.zeros(5)), ("d", torch.zeros(5, dtype=torch.bfloat16))]
    plan = WeightSpec.of(tensors, bucket_bytes=80).buckets()
    assert [b.indices for b in plan] == [(0, 1), (2,), (3,), (4,)]
    assert plan[0].offsets == (0, 10) and plan[3].dtype == torch.bfloat16


def test_missing_unexpected_and_mismatched_names_are_named():
    spec = WeightSpec.of(list(tiny(0).named_parameters()), 1 << 20)
    untied = tiny(1, tie=False)  # has lm_head.weight of its own: the sender never sends it
    with pytest.raises(ValueError, match=r"missing \(.*\(1\): lm_head.weight"):
        load_into_module(untied).check_spec(spec)
    with pytest.raises(ValueError, match=r"shape or kind mismatch.*model.embed_tokens.weight"):
        load_into_module(tiny(1, vocab=VOCAB + 1)).check_spec(spec)
    prefixed = load_into_module(tiny(1), rename=lambda name: "module." + name)
    with pytest.raises(ValueError,
                       match=r"unexpected .*\(26\): model.embed_tokens.weight \(as module.model"):
        prefixed.check_spec(spec)
    with pytest.raises(ValueError, match="cannot load 'nope'"):
        prefixed([("nope", torch.zeros(1))])


def test_rename_hook_loads_other_names_and_skips_none():
    sender, receiver = tiny(0), tiny(1)
    named = [("module." + name, t) for name, t in sender.named_parameters()]
    named.append(("module.extra_head", torch.zeros(3)))
    spec = WeightSpec.of(named, 1 << 20)
    load = load_into_module(
        receiver, rename=lambda n: None if n.endswith("extra_head") else n.removeprefix("module."))
    load.check_spec(spec)
    load(named)
    for (name, got), want in zip(receiver.named_parameters(), sender.parameters()):
        assert torch.equal(got, want), name


def test_unique_named_tensors_refuses_two_tensors_with_one_name():
    with pytest.raises(ValueError, match="two tensors are named 'w'"):
        unique_named_tensors([("w", torch.zeros(2)), ("w", torch.ones(2))])


if __name__ == "__main__":  # pragma: no cover
    pytest.main([os.path.abspath(__file__), "-q"])


def _in_place_worker(rank: int, init_file: str) -> None:
    """Rank 0: a coalesced sender; rank 1: an fp32 receiver (bound in place); rank 2: a
    bf16 receiver (cast by copy)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=3, timeout=datetime.timedelta(seconds=30))
    try:
        model, expected = tiny(rank), tiny(0)
        if rank == 2:
            model.to(torch.bfloat16)
        if rank == 0:
            assert coalesce_in_place(model.named_parameters(), 0.02) > 0
            side = NamedWeightSender(model.named_parameters, 0.02, src=0)
        else:
            side = NamedWeightReceiver(load_into_module(model), src=0, device="cpu")
        pointers = None
        for version in (1, 2, 3):
            set_version(model if rank == 0 else expected, version)
            if rank:
                set_version(model, 1000 + version)
            side.sync()
            if rank == 0:
                assert side.copied_bytes == 0  # every bucket went as it lies
                continue
            got = dict(model.named_parameters(remove_duplicate=False))
            for name, want in expected.named_parameters(remove_duplicate=False):
                want = want if rank == 1 else want.to(torch.bfloat16)
                assert torch.equal(got[name], want), (version, name)
            now = [p.data_ptr() for p in model.parameters()]
            if rank == 1:  # received into the parameters themselves: nothing loaded
                assert side.copied_bytes == 0
                assert pointers is None or now == pointers
            else:
                assert side.copied_bytes == side.spec.num_bytes
            pointers = now
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_coalesced_sender_and_same_dtype_receiver_copy_nothing(tmp_path):
    mp.start_processes(_in_place_worker, args=(str(tmp_path / "store"),), nprocs=3,
                       start_method="fork")
