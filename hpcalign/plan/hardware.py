"""A small table of accelerators: peak bf16 FLOP/s, HBM size and bandwidth, links.

Peak numbers are the vendors' data-sheet figures (dense, no sparsity); the achievable
fractions (`matmul_efficiency`, `hbm_efficiency`) are the planner's one calibration and are
documented with their sources in `docs/planner.md`, "Hardware". Bandwidths are per GPU and
per direction, in GB/s (1e9 bytes/s), which is what a ring collective sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcalign.errors import ConfigError


@dataclass(frozen=True)
class Hardware:
    """One accelerator kind in a node of `gpus_per_node`."""

    name: str
    peak_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s (fp32 for the CPU entry)."""
    mem_gb: float
    """HBM per GPU, GB (1e9 bytes)."""
    hbm_gbps: float
    """HBM bandwidth, GB/s."""
    intra_gbps: float
    """GPU-to-GPU bandwidth inside a node (NVLink / Infinity Fabric), per direction."""
    inter_gbps: float
    """Network bandwidth per GPU between nodes (one NIC per GPU), per direction."""
    host_gbps: float
    """GPU-host bandwidth (PCIe) for offloading."""
    gpus_per_node: int = 8
    matmul_efficiency: float = 0.70
    """Fraction of peak a large bf16 GEMM sustains (calibration, see docs/planner.md)."""
    hbm_efficiency: float = 0.80
    """Fraction of HBM bandwidth a memory-bound decode kernel sustains."""
    collective_latency_us: float = 10.0
    """Fixed cost of one small collective (all-reduce of a decode step), intra-node."""
    usable_mem_fraction: float = 0.92
    """Memory a process may actually use (CUDA context, allocator fragmentation)."""

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def mem_bytes(self) -> float:
        return self.mem_gb * 1e9

    def link_gbps(self, group_size: int, stride: int = 1) -> float:
        """Bandwidth of a collective over `group_size` ranks spaced `stride` GPUs apart.

        A group that fits inside one node (Megatron places TP innermost) uses NVLink;
        anything spanning nodes is limited by the network.
        """
        return self.intra_gbps if group_size * stride <= self.gpus_per_node else self.inter_gbps


# Sources (data sheets): NVIDIA A100 (2021), H100 SXM5 and H200 SXM (2024), AMD Instinct
# MI300X (2023). NVLink 3/4: 600/900 GB/s bidirectional = 300/450 per direction; network:
# one 200 Gb/s HDR (A100) or 400 Gb/s NDR (H100/H200/MI300X) NIC per GPU = 25/50 GB/s;
# PCIe 4/5 x16 ≈ 25/50 GB/s usable.
HARDWARE: dict[str, Hardware] = {
    "a100-80g": Hardware("a100-80g", 312, 80, 2039, 300, 25, 25, matmul_efficiency=0.65),
    "h100-80g": Hardware("h100-80g", 989, 80, 3350, 450, 50, 50, matmul_efficiency=0.60),
    "h200-141g": Hardware("h200-141g", 989, 141, 4800, 450, 50, 50, matmul_efficiency=0.60),
    "mi300x": Hardware("mi300x", 1307, 192, 5300, 448, 50, 50, matmul_efficiency=0.55),
    # The test machines' CPUs, for the tiny measured sweep: 2 AVX-512 cores at ~2.5 GHz
    # (2 FMA units · 16 fp32 lanes · 2 FLOP · 2.5e9 · 2 cores = 0.32 TFLOP/s fp32 peak),
    # ~20 GB/s DRAM. One "GPU" here is one rank; fixed per-step overheads, which dominate at
    # this size, are not modelled (docs/planner.md says so).
    "cpu": Hardware(
        "cpu",
        0.32,
        24,
        20,
        10,
        10,
        20,
        gpus_per_node=2,
        matmul_efficiency=0.3,
        hbm_efficiency=0.5,
        collective_latency_us=50,
        usable_mem_fraction=0.8,
    ),
}


def hardware(name: str) -> Hardware:
    """The table entry `name`, or a ConfigError listing the known ones."""
    key = name.lower()
    if key not in HARDWARE:
        raise ConfigError(f"unknown GPU {name!r}; expected one of {', '.join(HARDWARE)}")
    return HARDWARE[key]
