"""Slurm settings: one `Component` per heterogeneous-job component (train, gen)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator

from hpcalign.config.base import Section


class Component(Section):
    """Resources of one het-job component. Every value is shell-quoted in the sbatch text."""

    partition: str = Field("train", description="Slurm partition of this component.")
    nodes: int = Field(1, ge=1, description="Nodes of this component.")
    tasks_per_node: int = Field(1, ge=1, description="MPI ranks per node.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0 on CPU clusters).")
    cpus_per_task: int = Field(1, ge=1, description="CPU cores per rank.")
    mem_gb: float = Field(0, ge=0, description="Memory per node in GB (0: Slurm default).")
    time_min: int = Field(60, ge=1, description="Time limit of the job in minutes.")
    account: str | None = Field(None, description="Slurm account to charge.")
    qos: str | None = Field(None, description="Slurm QoS.")
    constraint: str | None = Field(None, description="Node feature constraint.")
    reservation: str | None = Field(None, description="Slurm reservation.")
    exclusive: bool = Field(False, description="Ask for whole nodes.")
    sbatch_args: dict[str, str] = Field(
        default_factory=dict, description="Extra #SBATCH flags: {flag: value}, e.g. {comment: x}."
    )
    srun_args: list[str] = Field(
        default_factory=list,
        description="Extra srun arguments for this component, e.g. ['--container-image=x.sqsh'].",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines every rank of this component runs before its Python starts "
        "(module loads or a venv for this partition's nodes); slurm.setup runs once, in the "
        "batch shell, before the job step.",
    )


def _gen_default() -> Component:
    return Component(partition="gen")


class SlurmConfig(Section):
    """How `hpcalign submit` and sbatch/hetjob.sbatch shape the heterogeneous job."""

    train: Component = Field(default_factory=Component, description="Component 0: trainers.")
    gen: Component = Field(default_factory=_gen_default, description="Component 1: generators.")

    @field_validator("gen", mode="before")
    @classmethod
    def _gen_partition_default(cls, value: Any) -> Any:
        """`slurm.gen` given in part (e.g. only `slurm.gen.nodes=2`) keeps partition gen,
        not the Component default of the trainers."""
        if isinstance(value, Mapping) and "partition" not in value:
            return {"partition": "gen", **value}
        return value
    models: dict[str, Component] = Field(
        default_factory=dict,
        description="One further het component per model placed on ranks of its own "
        "(models.<name>.placement: exclusive), by model name, e.g. slurm.models.reward. "
        "Unset: on slurm.gen's partition with its time, CPUs and GPUs, one node holding "
        "the model's ranks.")
    job_name: str = Field("hpcalign", description="Slurm job name.")

    def model_component(self, name: str, ranks: int) -> Component:
        """The het component of a model on `ranks` ranks of its own: `models.<name>`, else
        slurm.gen's partition, time, CPUs, GPUs, memory and account on one node."""
        gen = self.gen
        return self.models.get(name) or Component(
            partition=gen.partition, nodes=1, tasks_per_node=ranks,
            cpus_per_task=gen.cpus_per_task, gpus_per_node=gen.gpus_per_node,
            mem_gb=gen.mem_gb, time_min=gen.time_min, account=gen.account, qos=gen.qos)
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before the job step (module loads, venv activation).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for every rank (NCCL_*, network settings), exported quoted.",
    )
    signal_before_end_s: int = Field(
        120, ge=0, description="Seconds before the time limit that Slurm sends USR1."
    )
    max_requeues: int = Field(3, ge=0, description="How often the job may requeue itself.")
    python: str = Field("python", description="Python interpreter on the compute nodes.")
