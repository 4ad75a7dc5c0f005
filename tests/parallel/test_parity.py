"""The heart of the suite: every strategy trains exactly like the single-process model.

For each plan and K, three SGD-with-momentum steps of the parallelized model on a global
batch give the loss and (gathered) parameters of the single-process model on the same
batch, within fp32 rounding; dropout is on (split-invariant masks, see
pyowt.parallel.dropout) so the masks' placement under every split is checked too.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pyowt
from pyowt.parallel import full_state_dict, parallelize, seeded_dropout_copy

from ..utils import rel_err
from ._models import global_batch, make_model

STEPS = 3
LR, MOMENTUM = 0.05, 0.9
PLANS = [("data", {}), ("model", {}), ("owt", {"scheme": "a"})]


def _reference(model_name, seed, batch):
    model, size = make_model(model_name, seed)
    ref = seeded_dropout_copy(copy.deepcopy(model), seed=seed)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        x, y = global_batch(step, batch, size)
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in ref.state_dict().items()}


def _parallel(model_name, seed, batch, preset, options):
    torch.manual_seed(seed)
    model, size = make_model(model_name, seed)
    pmodel = parallelize(model, preset, seed=seed, **options)
    opt = torch.optim.SGD(pmodel.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        x, y = global_batch(step, batch, size)
        xl, yl = pmodel.local_batch(x, y)
        loss = pmodel.loss(pmodel(xl), yl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, full_state_dict(pmodel)


def _check_parity(model_name, preset, options, batch, seed=0):
    losses, params = _parallel(model_name, seed, batch, preset, options)
    ref_losses, ref_params = _reference(model_name, seed, batch)
    report = []
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        if abs(a - b) > 1e-5 * abs(b):
            report.append(f"step {step}: loss {a!r} != reference {b!r}")
    assert set(params) == set(ref_params), (sorted(params), sorted(ref_params))
    for name in ref_params:
        err = rel_err(params[name], ref_params[name])
        if err > 1e-5:
            report.append(f"{name}: relative error {err:.3g}")
    assert not report, f"rank {dist.get_rank()} {preset}{options}: " + "; ".join(report)
    return losses


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("preset,options", PLANS, ids=[p for p, _ in PLANS])
def test_parity_small_alexnet(run_workers, k, preset, options):
    # Batch 11: uneven shards for K = 2, 3, 4.
    losses = run_workers(k, _check_parity, "small", preset, options, 11, timeout=300)
    assert all(l == losses[0] for l in losses), f"ranks report different losses: {losses}"


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("preset,options", PLANS, ids=[p for p, _ in PLANS])
def test_parity_torchvision_alexnet(run_workers, k, preset, options):
    losses = run_workers(k, _check_parity, "torchvision", preset, options, 5, timeout=600)
    assert all(l == losses[0] for l in losses)
