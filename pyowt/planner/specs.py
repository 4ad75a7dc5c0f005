"""Hardware descriptions for the cost model: devices (compute) and links (communication).

A :class:`DeviceSpec` gives peak arithmetic rates per dtype, memory bandwidth and capacity,
the fraction of those peaks real kernels reach and a fixed per-kernel overhead: the roofline
estimate of an op is ``max(flops / (peak * eff), bytes / (bw * eff_bw)) + overhead``.
A :class:`LinkSpec` is an alpha-beta model of one link: a collective step costs ``alpha``
seconds of latency and each byte ``1 / bandwidth`` seconds. A :class:`ClusterSpec` puts
``workers`` devices on ``nodes`` nodes with one link inside a node and one between nodes.

Figures are public datasheet numbers (dense, no sparsity) and the usual fractions of them
that libraries reach; they are estimates for hardware we cannot measure here. On the device
at hand, :mod:`pyowt.planner.costs` measures instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional

import torch

DTYPES = ("fp32", "tf32", "fp16", "bf16")
_ITEMSIZE = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}


def itemsize(dtype: str) -> int:
    """Bytes per element of activations for a dtype name (tf32 computes in fp32 storage)."""
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return _ITEMSIZE[dtype]


def torch_dtype(dtype: str) -> torch.dtype:
    itemsize(dtype)
    return {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or CPU) for roofline estimates.

    Attributes:
        name: label.
        peak_flops: dtype name -> peak FLOP/s (multiply and add count as 2).
        mem_bw: memory bandwidth, bytes/s.
        memory: capacity, bytes.
        eff: fraction of ``peak_flops`` that GEMM/convolution kernels reach.
        eff_bw: fraction of ``mem_bw`` that elementwise kernels reach.
        overhead: seconds added to every kernel (launch, framework dispatch).
    """

    name: str
    peak_flops: Dict[str, float]
    mem_bw: float
    memory: float
    eff: float = 0.6
    eff_bw: float = 0.8
    overhead: float = 5e-6

    def flops_rate(self, dtype: str) -> float:
        """Sustained FLOP/s for ``dtype`` (falls back to fp32 where the device has no faster path)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        return self.peak_flops.get(dtype, self.peak_flops["fp32"]) * self.eff


T, G = 1e12, 1e9
DEVICES: Dict[str, DeviceSpec] = {
    # H100 SXM5: 67 TFLOP/s fp32, 495 tf32, 989 bf16/fp16 dense; 3.35 TB/s HBM3; 80 GB.
    "h100": DeviceSpec("h100", {"fp32": 67 * T, "tf32": 495 * T, "fp16": 989 * T, "bf16": 989 * T}, 3.35e12, 80e9,
                       eff=0.6, overhead=6e-6),
    # H200 SXM: the H100's rates with 4.8 TB/s HBM3e and 141 GB. Measured on one here
    # (2026-11-26, benchmarks/RESULTS.md): bf16 GEMM 758 TFLOP/s (0.77 of peak), device
    # copy 3.89 TB/s (0.81); cuDNN ran AlexNet's convs 2-5 at batch 128 at 194-271 TFLOP/s
    # (0.20-0.27), conv1 at 24. eff stays the H100's 0.6 between the two until the planner
    # profiles a GPU.
    "h200": DeviceSpec("h200", {"fp32": 67 * T, "tf32": 495 * T, "fp16": 989 * T, "bf16": 989 * T}, 4.8e12, 141e9,
                       eff=0.6, eff_bw=0.8, overhead=6e-6),
    # A100 SXM4 80 GB: 19.5 fp32, 156 tf32, 312 bf16/fp16; 2.04 TB/s.
    "a100": DeviceSpec("a100", {"fp32": 19.5 * T, "tf32": 156 * T, "fp16": 312 * T, "bf16": 312 * T}, 2.04e12, 80e9,
                       eff=0.6, overhead=6e-6),
    # V100 SXM2 32 GB: 15.7 fp32, 125 fp16 (tensor cores), no bf16; 900 GB/s.
    "v100": DeviceSpec("v100", {"fp32": 15.7 * T, "fp16": 125 * T}, 0.9e12, 32e9, eff=0.6, overhead=8e-6),
    # K20 (the OWT paper's GPU): 3.52 TFLOP/s fp32, no tensor cores; 208 GB/s; 5 GB.
    "k20": DeviceSpec("k20", {"fp32": 3.52 * T}, 208e9, 5e9, eff=0.5, overhead=10e-6),
    # A generic CPU socket for estimates (the validation measures instead): 1 TFLOP/s fp32,
    # 100 GB/s, 256 GB, framework dispatch dominates small ops.
    "cpu": DeviceSpec("cpu", {"fp32": 1 * T, "bf16": 2 * T}, 100e9, 256e9, eff=0.5, eff_bw=0.6, overhead=20e-6),
}


@dataclass(frozen=True)
class LinkSpec:
    """Alpha-beta model of a link: a message of n bytes in one step costs ``alpha + n / bandwidth``.

    ``bandwidth`` is the per-device bus bandwidth a ring collective reaches (bytes/s), as
    nccl-tests report it.
    """

    name: str
    alpha: float
    bandwidth: float

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth


LINKS: Dict[str, LinkSpec] = {
    # NVLink 4 (H100 SXM, 8 GPUs via NVSwitch): ~360-370 GB/s measured busbw.
    "nvlink": LinkSpec("nvlink", 8e-6, 360e9),
    # PCIe Gen4 x16 through the host: ~22 GB/s.
    "pcie": LinkSpec("pcie", 12e-6, 22e9),
    # InfiniBand NDR 400 Gb/s, one NIC per GPU: ~45 GB/s; latency including NCCL's proxy.
    "ib": LinkSpec("ib", 15e-6, 45e9),
    # 10 Gb Ethernet (TCP): ~1.1 GB/s, tens of microseconds per message.
    "ethernet": LinkSpec("ethernet", 60e-6, 1.1e9),
}


@dataclass(frozen=True)
class ClusterSpec:
    """``workers`` devices, spread evenly over ``nodes`` nodes.

    Collectives on one node use ``intra``; across nodes they run hierarchically (reduce
    inside each node, exchange 1/g of the data across nodes, spread inside the node again),
    so the inter-node link carries 1/g of the bytes (g = workers per node).
    """

    device: DeviceSpec
    workers: int
    intra: LinkSpec
    inter: Optional[LinkSpec] = None
    nodes: int = 1
    overlap: bool = True  # communication runs on its own stream, concurrently with compute
    dtype: str = "fp32"

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if not isinstance(self.nodes, int) or self.nodes < 1 or self.workers % self.nodes:
            raise ValueError(f"nodes must be an int >= 1 dividing workers={self.workers}, got {self.nodes!r}")
        if self.nodes > 1 and self.inter is None:
            raise ValueError("a cluster of several nodes needs an inter-node link (inter=...)")
        itemsize(self.dtype)

    @property
    def per_node(self) -> int:
        return self.workers // self.nodes

    def with_workers(self, workers: int, nodes: Optional[int] = None) -> "ClusterSpec":
        """The same hardware with another number of workers (nodes recomputed if not given)."""
        if nodes is None:
            g = self.per_node if self.nodes > 1 else max(self.workers, 8)
            nodes = max(1, math.ceil(workers / g)) if self.inter is not None else 1
            while workers % nodes:
                nodes += 1
        return replace(self, workers=workers, nodes=nodes)


def make_cluster(device: str = "h100", workers: int = 8, interconnect: str = "nvlink", nodes: int = 1,
                 network: Optional[str] = None, dtype: str = "fp32") -> ClusterSpec:
    """A :class:`ClusterSpec` from names (as ``pyowt plan`` takes them).

    Args:
        device: one of :data:`DEVICES`.
        workers: devices in all.
        interconnect: the link between the devices of a node (``nvlink``, ``pcie``), or, with
            ``ib``/``ethernet``, the network between nodes (the devices of a node then share
            NVLink).
        nodes: number of nodes (must divide ``workers``).
        network: the inter-node link when ``interconnect`` names an intra-node link
            (default ``ib``).
        dtype: compute dtype (``fp32``, ``tf32``, ``fp16``, ``bf16``).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
    if interconnect not in LINKS:
        raise ValueError(f"interconnect must be one of {sorted(LINKS)}, got {interconnect!r}")
    if network is not None and network not in ("ib", "ethernet"):
        raise ValueError(f"network must be 'ib' or 'ethernet', got {network!r}")
    if interconnect in ("ib", "ethernet"):
        intra = LINKS[interconnect] if nodes == 1 else LINKS["nvlink"]
        inter = LINKS[interconnect]
    else:
        intra, inter = LINKS[interconnect], LINKS[network or "ib"]
    return ClusterSpec(DEVICES[device], workers, intra, inter, nodes, dtype=dtype)


__all__ = ["DEVICES", "LINKS", "DTYPES", "ClusterSpec", "DeviceSpec", "LinkSpec", "itemsize", "make_cluster",
           "torch_dtype"]
