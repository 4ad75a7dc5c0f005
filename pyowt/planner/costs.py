"""Cost model: seconds for a compute op on local shapes and for a collective over K workers.

Compute (:class:`OpSig` -> forward and backward seconds):

* ``roofline``: ``max(flops / rate, bytes / bandwidth) + overhead`` per kernel from a
  :class:`~pyowt.planner.specs.DeviceSpec` (hardware we do not have);
* ``measured``: run the op pyowt itself runs (``conv2d_bias_act``, ``linear_bias_act``,
  the module, split-invariant dropout) on the local shapes on this device, forward and
  backward, median of a few repeats; cached on disk (``$PYOWT_CACHE`` or ``~/.cache/pyowt``)
  keyed by op, shapes, dtype, device, thread count, concurrent workers, cores and torch/pyowt
  versions. On a CPU shared by K worker processes (T intra-op threads each, P cores), an
  op's time is ``max(wall, cpu / min(T, P / K))``: the median wall time alone misses the time
  slicing of an oversubscribed host (a short op usually runs inside one scheduler slice, so
  its median is the uncontended time, while over a whole step each process gets only P/K
  cores), and the process's CPU seconds divided by the cores it can get bound it from below.

Communication: alpha-beta per link for ring collectives (hierarchical across nodes), or
per-kind lines ``t = a + b * bytes`` fitted on the live group (:func:`measure_comm`).
Every cost is memoized by its signature, so re-costing a plan after one layer's config
changes recomputes only the ops whose local shapes changed.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .specs import ClusterSpec, LinkSpec, itemsize, torch_dtype

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce")


@dataclass(frozen=True)
class OpSig:
    """A compute op on local shapes.

    kind: ``conv``, ``linear`` (with ``params``: (out channels, kernel, stride, padding,
    dilation, has bias, activation, needs input grad) / (out features, has bias, activation,
    needs input grad)), ``bias_act`` (bias + activation after a split_in sum), ``module``
    (``params`` = (repr of the module,)), ``dropout``, ``batchnorm``, ``add``, ``loss``
    (``params`` = (class-parallel,)), ``optimizer`` (``shape`` = (local parameters,)).
    """

    kind: str
    shape: Tuple[int, ...]
    out: Tuple[int, ...]
    params: Tuple = ()


def _numel(shape) -> int:
    return math.prod(shape) if shape else 0


def flops_bytes(sig: OpSig, isz: int) -> Tuple[float, float, float, float]:
    """(forward FLOPs, backward FLOPs, forward bytes, backward bytes) of an op."""
    n_in, n_out = _numel(sig.shape), _numel(sig.out)
    if sig.kind == "conv":
        cout, (kh, kw), _, _, _, bias, _, dgrad = sig.params
        cin = sig.shape[1]
        macs = n_out * cin * kh * kw
        w = cout * cin * kh * kw
        f = 2.0 * macs
        return f, f * (2 if dgrad else 1), (n_in + n_out + w) * isz, (2 * n_out + n_in * (2 if dgrad else 1) + 2 * w) * isz
    if sig.kind == "linear":
        out_f, bias, _, dgrad = sig.params
        w = out_f * sig.shape[-1]
        f = 2.0 * _numel(sig.shape[:-1]) * w
        return f, f * (2 if dgrad else 1), (n_in + n_out + w) * isz, (2 * n_out + n_in * (2 if dgrad else 1) + 2 * w) * isz
    if sig.kind == "optimizer":  # SGD with momentum: read param, grad, buffer; write param, buffer
        return 2.0 * n_in, 0.0, 5.0 * n_in * isz, 0.0
    if sig.kind == "loss":
        return 4.0 * n_in, 2.0 * n_in, 2.0 * n_in * isz, 2.0 * n_in * isz
    # Elementwise/pooling/normalization: memory-bound.
    return float(n_out), float(n_in), (n_in + n_out) * isz, (n_in + 2 * n_out) * isz


class Profiler:
    """Measures (forward, backward) seconds of an op on this device, with a disk cache.

    Args:
        device: where to run (``"cpu"``, ``"cuda"``).
        dtype: ``fp32``/``fp16``/``bf16``.
        reps: timed repeats (median) after 2 warm-ups.
        cache_dir: default ``$PYOWT_CACHE`` or ``~/.cache/pyowt``; ``False`` disables the cache.
        context: extra key material, e.g. ``{"concurrent": K}`` when K processes share the host.
    """

    def __init__(self, device="cpu", dtype: str = "fp32", reps: int = 5, cache_dir=None, context=None):
        self.device = torch.device(device)
        self.dtype_name, self.dtype = dtype, torch_dtype(dtype)
        self.reps = reps
        if cache_dir is None:
            cache_dir = os.environ.get("PYOWT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyowt")
        self.path = os.path.join(cache_dir, "profiles.json") if cache_dir else None
        import pyowt

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.threads = torch.get_num_threads()
        try:
            self.cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            self.cores = os.cpu_count() or 1
        self.concurrent = int((context or {}).get("concurrent", 1))
        # Cores' worth of CPU this process gets when all workers run: the time-sharing bound.
        self.cpu_share = min(self.threads, self.cores / max(1, self.concurrent))
        self._base = {"device": name, "dtype": dtype, "torch": torch.__version__, "pyowt": pyowt.__version__,
                      "threads": self.threads, "cores": self.cores, "clock": "wall|cpu-share", **(context or {})}
        self._cache: Dict[str, list] = self._load()
        self.measured = 0

    def _load(self) -> Dict[str, list]:
        if not self.path or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def save(self) -> None:
        """Merge this profiler's measurements into the cache file (atomic replace)."""
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        merged = {**self._load(), **self._cache}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, self.path)

    def key(self, sig: OpSig) -> str:
        return json.dumps({**self._base, "kind": sig.kind, "shape": sig.shape, "out": sig.out,
                           "params": [str(p) for p in sig.params]}, sort_keys=True)

    def __call__(self, sig: OpSig, module: Optional[nn.Module] = None) -> Tuple[float, float]:
        k = self.key(sig)
        if k not in self._cache:
            self._cache[k] = list(self._measure(sig, module))
            self.measured += 1
        return tuple(self._cache[k])

    def _timed(self, make: Callable[[], Tuple[torch.Tensor, Callable]]) -> Tuple[float, float]:
        on_cpu = self.device.type == "cpu"
        sync = (lambda: None) if on_cpu else torch.cuda.synchronize
        fwd, bwd, cfwd, cbwd = [], [], [], []
        for i in range(self.reps + 2):
            inputs, run = make()
            sync()
            c0, t0 = time.process_time(), time.perf_counter()
            y = run(*inputs)
            sync()
            c1, t1 = time.process_time(), time.perf_counter()
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            sync()
            c2, t2 = time.process_time(), time.perf_counter()
            if i >= 2:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
                cfwd.append(c1 - c0)
                cbwd.append(c2 - c1)
        f, b = statistics.median(fwd), statistics.median(bwd)
        if on_cpu:  # see the module docstring: time slicing among the concurrent workers
            f = max(f, statistics.median(cfwd) / self.cpu_share)
            b = max(b, statistics.median(cbwd) / self.cpu_share)
        return f, b

    def _rand(self, shape, grad=True):
        return torch.randn(shape, device=self.device, dtype=self.dtype).requires_grad_(grad)

    def _measure(self, sig: OpSig, module) -> Tuple[float, float]:
        from ..ops import bias_relu, conv2d_bias_act, linear_bias_act
        from ..parallel.dropout import SeededDropout

        if sig.kind == "conv":
            cout, kernel, stride, padding, dilation, bias, act, dgrad = sig.params
            w = self._rand((cout, sig.shape[1]) + tuple(kernel))
            b = self._rand((cout,)) if bias else None
            return self._timed(lambda: ((self._rand(sig.shape, dgrad),), lambda x: conv2d_bias_act(
                x, w, b, stride=stride, padding=padding, dilation=dilation, activation=act)))
        if sig.kind == "linear":
            out_f, bias, act, dgrad = sig.params
            w = self._rand((out_f, sig.shape[-1]))
            b = self._rand((out_f,)) if bias else None
            return self._timed(lambda: ((self._rand(sig.shape, dgrad),), lambda x: linear_bias_act(x, w, b, activation=act)))
        if sig.kind == "bias_act":
            (act, dim) = sig.params
            b = self._rand((sig.shape[dim],))
            if act == "relu":
                return self._timed(lambda: ((self._rand(sig.shape),), lambda x: bias_relu(x, b, dim=dim)))
            shape = [1] * len(sig.shape)
            shape[dim] = -1
            return self._timed(lambda: ((self._rand(sig.shape),), lambda x: x + b.view(shape)))
        if sig.kind == "dropout":
            drop = SeededDropout(0.5)
            return self._timed(lambda: ((self._rand(sig.shape),), lambda x: drop(x, step=0)))
        if sig.kind == "add":
            return self._timed(lambda: ((self._rand(sig.shape), self._rand(sig.shape)), lambda a, b: a + b))
        if sig.kind == "loss":
            return self._timed(lambda: ((self._rand(sig.shape),), lambda x: F.cross_entropy(
                x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), reduction="sum")))
        if sig.kind == "optimizer":
            n = sig.shape[0]
            p = torch.randn(n, device=self.device, dtype=self.dtype)
            g, buf = torch.randn_like(p), torch.zeros_like(p)

            def step(x):
                buf.mul_(0.9).add_(g)
                p.add_(buf, alpha=-0.01)
                return x
            return self._timed(lambda: ((torch.zeros(1),), step))
        if module is None:
            return 0.0, 0.0
        mod = module.to(self.device)
        # Reshapes (flatten) and identity cost a dispatch, not a kernel: still measured.
        return self._timed(lambda: ((self._rand(sig.shape),), lambda x: mod(x)))


class CostModel:
    """Seconds per compute op and per collective for a :class:`ClusterSpec`.

    Args:
        cluster: the hardware (device spec for rooflines, links for alpha-beta).
        profiler: a :class:`Profiler` to measure compute instead of estimating it.
        comm_fit: per collective kind, ``(a, b)`` seconds and seconds/byte (of the full
            tensor) fitted on the live group (:func:`measure_comm`); overrides the links.
        comm_fit_by_size: the same per group size, for subgroups (a hybrid plan's split and
            replica groups); a size missing here falls back to ``comm_fit``.
    """

    def __init__(self, cluster: ClusterSpec, profiler: Optional[Profiler] = None,
                 comm_fit: Optional[Dict[str, Tuple[float, float]]] = None,
                 comm_fit_by_size: Optional[Dict[int, Dict[str, Tuple[float, float]]]] = None):
        self.cluster = cluster
        self.profiler = profiler
        self.comm_fit = comm_fit
        self.comm_fit_by_size = dict(comm_fit_by_size or {})
        self.itemsize = itemsize(cluster.dtype)
        self._compute: Dict[OpSig, Tuple[float, float]] = {}
        self.misses = 0

    def compute(self, sig: OpSig, module: Optional[nn.Module] = None) -> Tuple[float, float]:
        """(forward, backward) seconds of ``sig`` on one device."""
        hit = self._compute.get(sig)
        if hit is not None:
            return hit
        self.misses += 1
        if self.profiler is not None and sig.kind == "optimizer":
            # Linear in the parameter count: measure a fixed size once, scale.
            f, _ = self.compute(OpSig("optimizer", (1 << 20,), ()), module) if sig.shape != (1 << 20,) \
                else self.profiler(sig, module)
            cost = (f * sig.shape[0] / (1 << 20), 0.0)
        elif self.profiler is not None:
            cost = self.profiler(sig, module)
        else:
            cost = self.roofline(sig)
        self._compute[sig] = cost
        return cost

    def roofline(self, sig: OpSig) -> Tuple[float, float]:
        dev = self.cluster.device
        ff, fb, bf, bb = flops_bytes(sig, self.itemsize)
        rate = dev.flops_rate(self.cluster.dtype) if sig.kind in ("conv", "linear") else dev.peak_flops["fp32"] * dev.eff
        bw = dev.mem_bw * dev.eff_bw
        kernels_b = 2 if sig.kind in ("conv", "linear") else 1
        fwd = max(ff / rate, bf / bw) + dev.overhead
        bwd = max(fb / rate, bb / bw) + kernels_b * dev.overhead if (fb or bb) else 0.0
        return fwd, bwd

    def collective(self, kind: str, nbytes: float, k: int, nodes: Optional[int] = None) -> float:
        """Seconds for a collective over ``k`` workers on a tensor of ``nbytes`` in all
        (the gathered/reduced tensor; for broadcast/reduce the message). ``nodes``: how many
        nodes the k workers span, evenly (default: the cluster's for all its workers, else
        spread over as many nodes as possible)."""
        if kind not in COLLECTIVES:
            raise ValueError(f"kind must be one of {COLLECTIVES}, got {kind!r}")
        if k <= 1 or nbytes <= 0:
            return 0.0
        fit = self.comm_fit_by_size.get(k, self.comm_fit)
        if fit is not None:
            a, b = fit.get(kind, fit["all_reduce"])
            return a + b * nbytes
        c = self.cluster
        if nodes is not None:
            m = max(1, min(nodes, k))
            g = max(1, k // m)
        else:
            g, m = (c.per_node, c.nodes) if c.nodes > 1 and k == c.workers else (k, 1)
            if k != c.workers and c.nodes > 1:  # a subgroup: assume it spans the nodes evenly
                m = min(c.nodes, k)
                g = max(1, k // m)
        if m > 1 and c.inter is None:
            raise ValueError(f"a collective over {m} nodes needs a cluster with an inter-node link")
        return _ring(kind, nbytes, g, c.intra) + (_ring(kind, nbytes / g, m, c.inter) if m > 1 else 0.0)


def _ring(kind: str, nbytes: float, k: int, link: LinkSpec) -> float:
    """Ring algorithm on one link: all-reduce 2(k-1) steps of n/k bytes, gather/scatter k-1,
    broadcast/reduce pipelined (k-1 latencies + n bytes once)."""
    if k <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (k - 1) * (link.alpha + nbytes / k * link.beta)
    if kind in ("all_gather", "reduce_scatter"):
        return (k - 1) * (link.alpha + nbytes / k * link.beta)
    return (k - 1) * link.alpha + nbytes * link.beta


def fit_line(points) -> Tuple[float, float]:
    """Least-squares ``t = a + b * n`` over (n, t) points, clamped to a, b >= 0."""
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx if sxx else 0.0
    b = max(b, 0.0)
    return max(my - b * mx, 0.0), b


def measure_comm(group=None, sizes=(1 << 10, 1 << 16, 1 << 20, 1 << 22), reps: int = 5,
                 dtype: torch.dtype = torch.float32, device=None) -> Dict[str, Tuple[float, float]]:
    """Fit ``t = a + b * bytes`` for all-reduce, all-gather and reduce-scatter on ``group``.

    Every rank must call it; all get the same fit (the slowest rank's median times).
    ``sizes``: bytes of the full tensor.
    """
    import torch.distributed as dist

    from .. import distributed as pdist

    pg = pdist.resolve_group(group)
    k = pdist.get_world_size(pg)
    if device is None:
        device = "cuda" if pdist.get_backend(pg) == "nccl" else "cpu"
    esz = torch.tensor([], dtype=dtype).element_size()
    fits = {}
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        pts = []
        for nbytes in sizes:
            numel = max(k, nbytes // esz // k * k)
            full = torch.randn(numel, dtype=dtype, device=device)
            piece = full[: numel // k].clone()
            times = []
            for i in range(reps + 1):
                dist.barrier(group=pg)
                t0 = time.perf_counter()
                with torch.no_grad():
                    if kind == "all_reduce":
                        pdist.all_reduce(full, group=pg)
                    elif kind == "all_gather":
                        pdist.all_gather(piece, dim=0, group=pg, grad="split")
                    else:
                        pdist.reduce_scatter(full, dim=0, group=pg)
                if device != "cpu":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
            t = torch.tensor([statistics.median(times)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
            pts.append((numel * esz, float(t)))
        fits[kind] = fit_line(pts)
    return fits


__all__ = ["COLLECTIVES", "CostModel", "OpSig", "Profiler", "fit_line", "flops_bytes", "measure_comm"]
