"""``pyowt.parallelize``: rewrite an existing model for a plan (data, model, OWT, custom).

The model is captured as a chain of layers (:mod:`pyowt.parallel.graph`); every Conv2d and
Linear becomes a :class:`~pyowt.parallel.layers.ShardedLayer` for its plan entry, a ReLU that
follows one is fused into it, every Dropout becomes a split-invariant
:class:`~pyowt.parallel.dropout.SeededDropout`, and a transition is inserted wherever the
layout an activation has differs from the one its consumer needs.

One training-step contract for every strategy::

    pmodel = pyowt.parallelize(model, "owt")          # on every rank, same model and seed
    opt = torch.optim.SGD(pmodel.parameters(), lr=0.01, momentum=0.9)
    xl, yl = pmodel.local_batch(x, y)                  # x, y: the global batch (same on all ranks)
    loss = pmodel.loss(pmodel(xl), yl)                 # == F.cross_entropy(model(x), y), every rank
    loss.backward()
    opt.step()

In real training each rank loads only what it feeds: for plans whose input is batch-sharded
(``pmodel.input_layout == Layout.SHARD_BATCH``) that is rows ``pmodel.batch_slice(B)`` of each
global batch of B samples (see :func:`pyowt.parallel.sampler.shard_indices`); labels follow
``pmodel.label_layout``.

Loss normalization, for the whole library: the loss is the mean over the *global* batch,
so the gradients of replicated (``data``) parameters are *summed* across workers.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import distributed as pdist
from ..nn.functional import parallel_cross_entropy
from .dropout import SeededDropout, _salt
from .grad_sync import GradSync
from .graph import CONV, capture_chain
from .layers import ShardedConv2d, ShardedLayer, ShardedLinear, shard_range
from .layout import DATA, Layout
from .mesh import Mesh
from .plan import Plan, resolve_plan, validate_plan
from .passes import run_head_passes
from .program import ALL_GATHER, COPY_TO_GROUP, DROP, LAYER, MODULE, SPLIT, Program, compile_plan
from .transitions import AllGather, CopyToGroup, Split


class _BatchInfo:
    """The global batch the current step works on, shared by the stages that need it."""

    def __init__(self):
        self.global_size: Optional[int] = None
        self.step = 0
        # Global row indices of the batch in the head when it runs in passes (None: all rows).
        self.head_rows: Optional[torch.Tensor] = None


class ParallelDropout(nn.Module):
    """A :class:`SeededDropout` that knows where this rank's block sits in the global tensor."""

    def __init__(self, p: float, seed: int, salt: int, layout: Layout, channels: Optional[int],
                 batch: _BatchInfo, mesh: Mesh):
        super().__init__()
        self.dropout = SeededDropout(p, seed=seed, salt=salt)
        self.layout, self.channels, self.batch, self.mesh = layout, channels, batch, mesh

    def extra_repr(self) -> str:
        return f"layout={self.layout.value}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout.p == 0.0:
            return x
        global_shape, offsets = list(x.shape), [0] * x.dim()
        b = self.batch.global_size
        global_shape[0] = b
        rows = None
        mesh = self.mesh
        if self.layout == Layout.SHARD_BATCH:
            offsets[0] = shard_range(b, mesh.k, mesh.rank)[0]
        elif self.batch.head_rows is not None:
            rows = self.batch.head_rows
        else:  # Replicate / Shard(channel) within the split group: this row's batch block
            offsets[0] = mesh.block_range(b)[0]
        if self.layout == Layout.SHARD_CHANNEL:
            global_shape[1] = self.channels
            offsets[1] = shard_range(self.channels, mesh.s, mesh.col)[0]
        return self.dropout(x, global_shape, offsets, step=self.batch.step, rows=rows)


def _head_boundary(stages: List[nn.Module], plan: Plan) -> int:
    """Index of the all-gather that brings the batch into the split head (schemes b, c)."""
    gathers = [i for i, m in enumerate(stages) if isinstance(m, AllGather) and m.dim == 0]
    if len(gathers) != 1 or stages[gathers[0]].grad != "reduce_scatter" \
            or any(isinstance(m, Split) and m.dim == 0 for m in stages[gathers[0]:]):
        raise ValueError(f"plan {plan.name!r}: scheme {plan.scheme!r} needs a data-parallel trunk followed by a "
                         "split head (exactly one batch all-gather into a split_out layer, as in the 'owt' preset)")
    return gathers[0]


def _structure_fingerprint(plan: Plan, steps) -> str:
    h = hashlib.sha256(plan.to_json().encode())
    for s in steps:
        shapes = [tuple(p.shape) for p in s.module.parameters()] if s.module is not None else []
        h.update(f"{s.name}:{s.kind}:{type(s.module).__name__}:{shapes};".encode())
    return h.hexdigest()[:16]


class ParallelModel(nn.Module):
    """A model rewritten for a plan; build it with :func:`parallelize`.

    Attributes:
        plan: the :class:`Plan` it implements.
        stages: the layers and transitions, in order (print the model to see them).
        mesh: the d x s arrangement of the workers the output lives on
            (:class:`~pyowt.parallel.mesh.Mesh`; d = 1 unless the last split layer's degree
            is below K); ``input_mesh`` the same for the input.
        input_layout: ``Shard(batch)`` or ``Replicate``: what :meth:`local_batch` returns.
        output_layout: layout of the forward's result (class-sharded logits for a split head).
        label_layout: ``Shard(batch)`` or ``Replicate``: which labels :meth:`loss` expects.
            ``Replicate`` means replicated within the split group: with d > 1 each group
            takes its batch block's labels (:meth:`label_slice`).
    """

    def __init__(self, stages: List[nn.Module], plan: Plan, group, program: Program, batch: _BatchInfo,
                 bucket_bytes: int, head_optimizer=None, meshes: Optional["_Meshes"] = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.boundary = _head_boundary(stages, plan) if plan.scheme != "a" else None
        self.head_optimizer = None
        if self.boundary is not None and head_optimizer is not None:
            self.head_optimizer = head_optimizer(list(self.head.parameters()))
        self.plan, self.group, self.program = plan, group, program
        self.k, self.rank = pdist.get_world_size(group), pdist.get_rank(group)
        meshes = meshes if meshes is not None else _Meshes(group)
        self.mesh, self.input_mesh = meshes.get(program.output_degree), meshes.get(program.input_degree)
        self.input_layout, self.output_layout = program.input_layout, program.output_layout
        self.label_layout = Layout.SHARD_BATCH if self.output_layout == Layout.SHARD_BATCH else Layout.REPLICATE
        self._batch = batch
        self._steps = 0
        replicated = [p for layer in self.sharded_layers() if layer.config == DATA for p in layer.parameters()]
        self.grad_sync = GradSync(replicated, group, bucket_bytes) if self.k > 1 and replicated else None
        # Split layers are replicated over their mesh's columns when d > 1: sum there too,
        # one GradSync per degree.
        by_degree = {}
        for layer in self.sharded_layers():
            if layer.config != DATA:
                by_degree.setdefault(layer.degree, []).extend(layer.parameters())
        self.shard_grad_syncs = [GradSync(ps, meshes.get(deg).replica_group, bucket_bytes)
                                 for deg, ps in sorted(by_degree.items(), key=lambda kv: kv[0] or self.k)
                                 if meshes.get(deg).replica_group is not None]

    @property
    def trunk(self) -> List[nn.Module]:
        """Stages before the batch is gathered into the split head (schemes b and c)."""
        return list(self.stages)[:self.boundary] if self.boundary is not None else list(self.stages)

    @property
    def head(self) -> nn.ModuleList:
        """Stages after the batch is gathered into the split head (schemes b and c)."""
        return nn.ModuleList(list(self.stages)[self.boundary + 1:]) if self.boundary is not None else nn.ModuleList()

    def sharded_layers(self) -> Iterator[ShardedLayer]:
        return (m for m in self.stages if isinstance(m, ShardedLayer))

    def trunk_parameters(self) -> List[nn.Parameter]:
        """Parameters outside the split head (all of them under scheme a)."""
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def no_sync(self):
        """Context manager: backward passes inside it do not sum replicated gradients."""
        import contextlib

        stack = contextlib.ExitStack()
        for sync in [self.grad_sync] + self.shard_grad_syncs:
            if sync is not None:
                stack.enter_context(sync.no_sync())
        return stack

    def _rows(self, global_batch: int, layout: Layout, mesh: Mesh) -> slice:
        if layout == Layout.SHARD_BATCH:
            return slice(*shard_range(global_batch, self.k, self.rank))
        return slice(*mesh.block_range(global_batch))

    def batch_slice(self, global_batch: int) -> slice:
        """The rows of a global batch whose inputs this rank feeds: its shard when the input
        is batch-sharded, else its split group's block (all rows unless d > 1)."""
        return self._rows(global_batch, self.input_layout, self.input_mesh)

    def label_slice(self, global_batch: int) -> slice:
        """The rows of a global batch whose labels :meth:`loss` expects from this rank."""
        return self._rows(global_batch, self.label_layout, self.mesh)

    @torch.no_grad()
    def full_logits(self, out: torch.Tensor) -> torch.Tensor:
        """The forward's output ``(rows, classes_shard)`` as ``(rows, classes)``: class-sharded
        logits are gathered in the split group (for metrics: no gradient flows back)."""
        if self.output_layout != Layout.SHARD_CHANNEL:
            return out
        return pdist.all_gather(out, dim=1, group=self.mesh.split_group, grad="split")

    @torch.no_grad()
    def sum_over_batch(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t``, a statistic of this rank's rows (:meth:`label_slice`), over the ranks
        holding the other rows of the global batch; every rank gets the global sum."""
        group = self.group if self.label_layout == Layout.SHARD_BATCH else self.mesh.replica_group
        if group is None or pdist.get_world_size(group) == 1:
            return t
        return pdist.all_reduce(t, group=group)

    def local_batch(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) this rank feeds, from a global batch that is the same on every rank.

        x: (B, C, H, W); y: (B,) class indices. B must be at least the number of workers.
        """
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        b = x.shape[0]
        if b < self.k:
            raise ValueError(f"global batch of {b} is smaller than the {self.k} workers")
        self._batch.global_size = b
        return x[self.batch_slice(b)], y[self.label_slice(b)]

    def forward(self, x: torch.Tensor, global_batch: Optional[int] = None) -> torch.Tensor:
        """This rank's input (see :meth:`local_batch`) -> output in ``output_layout``.

        ``global_batch``: the size B of the global batch ``x`` is part of, when ``x`` was
        loaded directly (see :mod:`pyowt.parallel.sampler`) rather than through
        :meth:`local_batch`; its rows must then be this rank's ``batch_slice(B)``.

        Under OWT schemes b and c in training mode the head runs in passes inside
        :meth:`loss`, so the forward returns the trunk's output (this rank's rows).
        """
        if global_batch is not None:
            rows = self.batch_slice(global_batch)
            if x.shape[0] != rows.stop - rows.start:
                raise ValueError(f"x has {x.shape[0]} rows but this rank's part of a global batch of "
                                 f"{global_batch} has {rows.stop - rows.start}")
            self._batch.global_size = global_batch
        if self._batch.global_size is None:
            # Fed without local_batch: assume equal shards.
            self._batch.global_size = x.shape[0] * (self.k if self.input_layout == Layout.SHARD_BATCH else self.input_mesh.d)
        if self.training:  # dropout masks are keyed by the step (see pyowt.parallel.dropout)
            self._batch.step = self._steps
            self._steps += 1
        stages = self.trunk if (self.boundary is not None and self.training) else self.stages
        for stage in stages:
            x = stage(x)
        return x

    def loss(self, out: torch.Tensor, yl: torch.Tensor) -> torch.Tensor:
        """Cross-entropy averaged over the global batch; the same value on every rank."""
        b = self._batch.global_size
        self._batch.global_size = None
        if b is None:
            raise RuntimeError("loss() must follow a forward of this model")
        if self.boundary is not None and self.training:
            self._batch.global_size = b
            try:
                return run_head_passes(self, out, yl)
            finally:
                self._batch.global_size = None
        if self.output_layout == Layout.SHARD_CHANNEL:
            local = parallel_cross_entropy(out, yl, group=self.mesh.split_group, reduction="sum") / b
        else:
            local = F.cross_entropy(out, yl, reduction="sum") / b
        # This rank's part of the global loss: its shard's, or its batch block's (d > 1).
        # The value is summed; the gradient stays this part's (each row is someone's).
        sum_over = self.group if self.output_layout == Layout.SHARD_BATCH else self.mesh.replica_group
        if sum_over is None or self.k == 1:
            return local
        with torch.no_grad():
            total = pdist.all_reduce(local.detach(), group=sum_over)
        return local + (total - local.detach())


class _Meshes:
    """The :class:`Mesh` of each split degree a program uses (``None``: all K), made once."""

    def __init__(self, group):
        self.group, self.k = group, pdist.get_world_size(group)
        self._by_degree = {}

    def get(self, degree: Optional[int]) -> Mesh:
        s = self.k if degree is None else degree
        if s not in self._by_degree:
            self._by_degree[s] = Mesh(self.group, s)
        return self._by_degree[s]


def _instantiate(program: Program, meshes: _Meshes, seed: int, batch: _BatchInfo) -> List[nn.Module]:
    """Modules for a compiled program: data layers over the whole group, split layers and
    transitions inside the split groups of their degree."""
    stages: List[nn.Module] = []
    for op in program.ops:
        mesh = meshes.get(op.degree)
        group = mesh.split_group
        if op.kind == LAYER:
            cls = ShardedConv2d if op.step.kind == CONV else ShardedLinear
            layer = cls(op.step.module, op.config, op.activation, meshes.group if op.config == DATA else group,
                        op.step.name)
            layer.degree = op.degree
            stages.append(layer)
        elif op.kind == MODULE:
            stages.append(op.step.module if op.step.module is not None else nn.Flatten(1))
        elif op.kind == DROP:
            stages.append(ParallelDropout(op.step.module.p, seed, _salt(op.step.name), op.layout,
                                          op.channels, batch, mesh))
        elif op.kind == ALL_GATHER:
            if op.gather_of == "batch":  # this split group's block
                total = (lambda m=mesh: (lambda r: r[1] - r[0])(m.block_range(batch.global_size)))
            else:
                total = (lambda c=op.channels: c)
            stages.append(AllGather(op.dim, op.grad, group, total))
        elif op.kind == SPLIT:
            stages.append(Split(op.dim, group))
        elif op.kind == COPY_TO_GROUP:
            stages.append(CopyToGroup(group))
        else:  # pragma: no cover
            raise AssertionError(op.kind)
    return stages


def parallelize(model: nn.Module, plan="owt", group=None, *, seed: int = 0, broadcast_params: bool = True,
                bucket_mb: float = 25.0, head_optimizer=None, input_shape=None, **plan_options) -> ParallelModel:
    """Rewrite ``model`` for ``plan`` over ``group`` (default: the world); call on every rank.

    Args:
        model: an ``nn.Module`` that ``torch.fx`` traces into a chain of Conv2d, ReLU,
            pooling, LocalResponseNorm, Dropout, Flatten, AdaptiveAvgPool and Linear
            (torchvision's alexnet and vgg, :class:`pyowt.models.AlexNetSmall`). It is not
            modified: the parallel model holds copies (shards) of its parameters.
        plan: a :class:`Plan`, ``"data"``, ``"model"``, ``"owt"``, ``"auto"`` (searched by
            :func:`pyowt.planner.auto.auto_plan` on the live group with measured costs;
            needs ``input_shape``), or a plan JSON path.
        group: a ProcessGroup or 1-D DeviceMesh.
        seed: dropout seed (masks are split-invariant; see :mod:`pyowt.parallel.dropout`).
        broadcast_params: start every rank from rank 0's parameters (like DDP).
        bucket_mb: gradient all-reduce bucket size for replicated parameters.
        head_optimizer: for ``fc_update="per_pass"``: a callable taking the head's
            parameters and returning the optimizer that steps them after every pass (e.g.
            ``lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)``). The head's
            parameters then never get a ``.grad`` outside the passes, so an optimizer over
            ``pmodel.parameters()`` leaves them alone; give it only the trunk if you prefer
            (``pmodel.trunk_parameters()``).
        input_shape: the global batch's input shape ``(B, C, H, W)``, for ``plan="auto"``.
        plan_options: ``scheme``, ``fc_update`` for the ``"owt"`` preset; ``split_degree``
            for ``"model"`` and ``"owt"`` (split layers in groups of that many workers,
            data-parallel across the groups; see :mod:`pyowt.parallel.mesh`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``plan`` of another type.
        ValueError: unsupported layers or plan entries (naming them), or ranks whose plans or
            model structures differ (on every rank).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize: model must be a torch.nn.Module, got {type(model).__name__}")
    group = pdist.resolve_group(group)
    steps = capture_chain(model)
    if isinstance(plan, str) and plan == "auto":
        from ..planner.auto import auto_plan  # the planner sits above parallel: import lazily

        if input_shape is None:
            raise ValueError("plan='auto' needs input_shape=(B, C, H, W), the global batch's shape")
        plan = auto_plan(model, group, input_shape=tuple(input_shape), bucket_mb=bucket_mb)
    plan = resolve_plan(model, plan, **plan_options)
    validate_plan(plan, model)
    k = pdist.get_world_size(group)
    program = compile_plan(plan, steps, k)  # also checks every degree against k
    if plan.scheme != "a" and any(op.degree is not None for op in program.ops):
        raise ValueError(f"plan {plan.name!r}: scheme {plan.scheme!r} runs the head over all {k} workers; "
                         f"split layers in groups of fewer workers (split_degree {plan.split_degree}, "
                         "or '@degree' configs) need scheme 'a'")
    fingerprint = _structure_fingerprint(plan, steps)
    if k > 1:
        everyone = [None] * k
        dist.all_gather_object(everyone, fingerprint, group=group)
        if len(set(everyone)) != 1:
            raise ValueError(f"ranks hold different plans or model structures (fingerprints by rank: {everyone}); "
                             "every rank must call parallelize with the same model and plan")
    model = copy.deepcopy(model)
    steps = capture_chain(model)
    if broadcast_params and k > 1:
        with torch.no_grad():
            src = dist.get_global_rank(group, 0) if hasattr(dist, "get_global_rank") else 0
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=src, group=group)
    batch = _BatchInfo()
    program = compile_plan(plan, steps, k)
    meshes = _Meshes(group)
    stages = _instantiate(program, meshes, seed, batch)
    pmodel = ParallelModel(stages, plan, group, program, batch, int(bucket_mb * 2**20), head_optimizer, meshes)
    if plan.fc_update == "per_pass" and pmodel.head_optimizer is None:
        raise ValueError(f"plan {plan.name!r}: fc_update='per_pass' needs head_optimizer=... (see parallelize's docstring)")
    pmodel.train(model.training)
    return pmodel
