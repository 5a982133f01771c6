"""Device placement and the backend rank 0 announces (hpcalign/roles/device.py).

GPU counts are injected: the decisions are the same code on a laptop and on a GPU node;
tests/gpu/test_local_run_gpu.py runs them for real where there are GPUs.
"""

from __future__ import annotations

import pytest
import torch

from hpcalign.comm.weights import check_backend
from hpcalign.models.sampler import seeded_generator
from hpcalign.roles.device import choose_backend, local_rank, role_device

CPU, GPU1 = torch.device("cpu"), torch.device("cuda", 1)


def test_local_rank_from_slurm_then_open_mpi_then_torchrun() -> None:
    assert local_rank({"SLURM_LOCALID": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}) == 3
    assert local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "5", "LOCAL_RANK": "7"}) == 5
    assert local_rank({"LOCAL_RANK": "7"}) == 7
    assert local_rank({"SLURM_LOCALID": ""}) == 0


@pytest.mark.parametrize("choice, gpus, env, expected", [
    ("auto", 0, {}, CPU),
    ("cpu", 8, {"SLURM_LOCALID": "3"}, CPU),
    ("auto", 8, {"SLURM_LOCALID": "3"}, torch.device("cuda", 3)),
    ("cuda", 2, {"SLURM_LOCALID": "3"}, GPU1),  # more ranks than GPUs: they share, mod
])
def test_role_device(choice, gpus, env, expected) -> None:
    assert role_device(choice, "trainer.device", env, cuda_count=gpus) == expected


def test_cuda_without_a_gpu_names_the_field() -> None:
    with pytest.raises(RuntimeError, match="generator.device=cuda but this rank sees no GPU"):
        role_device("cuda", "generator.device", {}, cuda_count=0)


@pytest.mark.parametrize("configured, rank0, trainer, generator, expected", [
    ("auto", GPU1, "auto", "auto", "nccl"),
    ("auto", GPU1, "auto", "cpu", "gloo"),  # generators on CPUs: NCCL could not reach them
    ("auto", CPU, "auto", "auto", "gloo"),
    ("gloo", GPU1, "cuda", "cuda", "gloo"),  # an explicit choice wins
    ("nccl", CPU, "auto", "auto", "nccl"),
])
def test_rank0_backend_choice(configured, rank0, trainer, generator, expected) -> None:
    assert choose_backend(configured, rank0, trainer, generator) == expected


def test_a_cpu_rank_refuses_an_nccl_world_by_name() -> None:
    with pytest.raises(RuntimeError, match="generator 0 .* computes on cpu but the world uses NCCL"):
        check_backend("nccl", CPU, "generator 0 (world rank 1)")
    check_backend("gloo", CPU, "x")
    check_backend("nccl", GPU1, "x")


def test_seeded_generator_follows_the_model() -> None:
    model = torch.nn.Linear(2, 2)
    gen = seeded_generator(model, 7)
    assert gen.device == CPU
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=seeded_generator(model, 7)))
