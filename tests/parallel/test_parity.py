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

from pyowt.parallel import full_state_dict, parallelize, seeded_dropout_copy
from pyowt.parallel.checkpoint import _named_shards
from pyowt.parallel.layers import unshard

from ..utils import rel_err
from ._models import global_batch, make_model

STEPS = 3
LR, MOMENTUM = 0.05, 0.9
PLANS = [("data", {}), ("model", {}), ("owt", {"scheme": "a"}), ("owt", {"scheme": "b"}), ("owt", {"scheme": "c"})]
PLAN_IDS = ["data", "model", "owt-a", "owt-b", "owt-c"]


def _full_grads(pmodel):
    return {name: unshard(layer, p.grad, which) for name, layer, which, p in _named_shards(pmodel)}


def _check_parity(model_name, preset, options, batch, seed=0):
    """Lockstep: the parallel model and the single-process reference take the same steps;
    after every backward the gathered gradients, and at the end the parameters, must agree."""
    torch.manual_seed(seed)
    model, size = make_model(model_name, seed)
    ref = seeded_dropout_copy(copy.deepcopy(model), seed=seed)
    pmodel = parallelize(model, preset, seed=seed, **options)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM)
    opt = torch.optim.SGD(pmodel.parameters(), lr=LR, momentum=MOMENTUM)
    report, losses = [], []
    for step in range(STEPS):
        x, y = global_batch(step, batch, size)
        ref_loss = F.cross_entropy(ref(x), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        xl, yl = pmodel.local_batch(x, y)
        loss = pmodel.loss(pmodel(xl), yl)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        if abs(loss.item() - ref_loss.item()) > 1e-5 * abs(ref_loss.item()):
            report.append(f"step {step}: loss {loss.item()!r} != reference {ref_loss.item()!r}")
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        for name, g in _full_grads(pmodel).items():
            err = rel_err(g, ref_grads[name])
            if err > 1e-5:
                report.append(f"step {step}: grad {name}: relative error {err:.3g}")
        ref_opt.step()
        opt.step()
    params = full_state_dict(pmodel)
    ref_params = ref.state_dict()
    assert set(params) == set(ref_params), (sorted(params), sorted(ref_params))
    for name in ref_params:
        err = rel_err(params[name], ref_params[name])
        if err > 1e-5:
            report.append(f"{name}: relative error {err:.3g}")
    assert not report, f"rank {dist.get_rank()} {preset}{options}: " + "; ".join(report)
    return losses


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("preset,options", PLANS, ids=PLAN_IDS)
def test_parity_small_alexnet(run_workers, k, preset, options):
    # Batch 11: uneven shards for K = 2, 3, 4.
    losses = run_workers(k, _check_parity, "small", preset, options, 11, timeout=300)
    assert all(l == losses[0] for l in losses), f"ranks report different losses: {losses}"


def test_parity_torchvision_alexnet_owt(run_workers):
    """torchvision's AlexNet itself (61M parameters, 63x63 input): the default suite runs
    owt(a) at K = 2; the whole grid (K = 1..4) is marked slow (15-50 s a case here)."""
    losses = run_workers(2, _check_parity, "torchvision", "owt", {"scheme": "a"}, 5, timeout=600)
    assert losses[0] == losses[1]


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("preset,options", PLANS, ids=PLAN_IDS)
def test_parity_torchvision_alexnet(run_workers, k, preset, options):
    losses = run_workers(k, _check_parity, "torchvision", preset, options, 5, timeout=600)
    assert all(l == losses[0] for l in losses)


# Hybrids (pyowt.parallel.mesh): split layers over s workers, data-parallel over K / s groups.
# Batch 11 at K = 4, s = 2 gives blocks of 6 and 5 rows, each split 3 + 3 and 3 + 2.
HYBRIDS = [(4, 2, "model"), (4, 2, "owt"), (2, 1, "owt"), (3, 1, "model")]


@pytest.mark.parametrize("k,split_degree,preset", HYBRIDS, ids=[f"k{k}-s{s}-{p}" for k, s, p in HYBRIDS])
def test_parity_hybrid(run_workers, k, split_degree, preset):
    losses = run_workers(k, _check_parity, "small", preset, {"split_degree": split_degree}, 11, timeout=300)
    assert all(l == losses[0] for l in losses), f"ranks report different losses: {losses}"


def _eval_metrics(preset, options, batch):
    """Eval-mode logits gathered with full_logits and a correct-count summed with
    sum_over_batch equal the single-process model's (what ``pyowt train`` validates with)."""
    model, size = make_model("small", 0)
    model.eval()
    pmodel = parallelize(model, preset, **options)
    pmodel.eval()
    x, y = global_batch(0, batch, size)
    xl, yl = pmodel.local_batch(x, y)
    logits = pmodel.full_logits(pmodel(xl))
    with torch.no_grad():
        ref = model(x)[pmodel.label_slice(batch)]
    assert rel_err(logits, ref) < 1e-5, rel_err(logits, ref)
    correct = pmodel.sum_over_batch((logits.argmax(1) == yl).sum().double().reshape(1))
    assert int(correct) == int((model(x).argmax(1) == y).sum())
    return int(correct)


@pytest.mark.parametrize("k,preset,options", [(4, "owt", {"split_degree": 2}), (4, "model", {"split_degree": 2}),
                                              (3, "owt", {}), (2, "data", {})],
                         ids=["k4-owt-s2", "k4-model-s2", "k3-owt", "k2-data"])
def test_eval_metrics_over_the_global_batch(run_workers, k, preset, options):
    counts = run_workers(k, _eval_metrics, preset, options, 11)
    assert len(set(counts)) == 1


# Per-layer split degrees: layers in groups of 2 next to layers over all 4, in every order
# (a degree change goes through Shard(batch); see pyowt.parallel.program).
MIXED_DEGREES = {
    "trunk-pair-then-head": {"features.0": "data", "features.3": "data", "features.6": "data",
                             "features.8": "split_out@2", "features.10": "split_in@2",
                             "classifier.1": "split_out", "classifier.4": "split_in", "classifier.6": "split_out@2"},
    # A channel-split conv trunk whose last layer's degree differs from the first FC's: the
    # flatten's channel gather must not sum a gradient the degree change already made exact.
    "flatten-across-degrees": {"features.0": "data", "features.3": "data", "features.6": "split_out",
                               "features.8": "split_in", "features.10": "split_out@2",
                               "classifier.1": "split_out", "classifier.4": "split_in@2",
                               "classifier.6": "split_out@2"},
    "flatten-across-degrees-2": {"features.0": "data", "features.3": "data", "features.6": "data",
                                 "features.8": "split_out@2", "features.10": "split_out",
                                 "classifier.1": "split_out@2", "classifier.4": "split_in",
                                 "classifier.6": "split_out"},
    "alternating": {"features.0": "split_out@2", "features.3": "split_in@2", "features.6": "split_out",
                    "features.8": "split_in", "features.10": "split_out@2", "classifier.1": "split_out@2",
                    "classifier.4": "split_in@4", "classifier.6": "split_out@2"},
}


@pytest.mark.parametrize("k", [4, 2])
@pytest.mark.parametrize("name", sorted(MIXED_DEGREES))
def test_parity_per_layer_degrees(run_workers, k, name):
    from pyowt.parallel import Plan

    layers = MIXED_DEGREES[name]
    if k == 2:  # '@4' does not divide 2: the same plan with every degree capped at K
        layers = {n: c.replace("@4", "@2") for n, c in layers.items()}
    losses = run_workers(k, _check_parity, "small", Plan(layers, name=name), {}, 11, timeout=300)
    assert all(l == losses[0] for l in losses), f"ranks report different losses: {losses}"


@pytest.mark.slow
def test_parity_torchvision_alexnet_mixed_degrees(run_workers):
    """torchvision's AlexNet at K = 4: conv5 split in groups of 2, the head column/row over
    groups of 2 then the last layer over all 4 (degree changes at the flatten and in the head)."""
    from pyowt.parallel import Plan, make_plan

    model, _ = make_model("torchvision", 0)
    layers = make_plan(model, "data").layers
    layers.update({"features.10": "split_out@2", "classifier.1": "split_out@2", "classifier.4": "split_in@2",
                   "classifier.6": "split_out"})
    losses = run_workers(4, _check_parity, "torchvision", Plan(layers, name="tv-mixed"), {}, 5, timeout=600)
    assert all(l == losses[0] for l in losses)
