"""Measured communication of a training step equals the plan's analytic volume, to the byte."""
import pytest

import pyowt.distributed as pdist
from pyowt.parallel import parallelize
from pyowt.parallel.comm_model import step_volume, total_sent

from ._models import global_batch, make_model

PRESETS = [("data", {}), ("model", {}), ("owt", {"scheme": "a"}), ("owt", {"scheme": "b"}), ("owt", {"scheme": "c"})]


def _measure(preset, options, batch):
    model, size = make_model("small", 0)
    pmodel = parallelize(model, preset, **options)
    x, y = global_batch(0, batch, size)
    with pdist.comm_stats() as stats:
        xl, yl = pmodel.local_batch(x, y)
        pmodel.loss(pmodel(xl), yl).backward()
    measured = {kind: {"calls": v["calls"], "sent": v["sent"], "received": v["received"]}
                for kind, v in stats.as_dict().items() if v["calls"]}
    expected = step_volume(model, preset, pdist.get_world_size(), pdist.get_rank(), tuple(x.shape), **options)
    expected = {kind: v for kind, v in expected.items() if v["calls"]}
    return measured, expected


@pytest.mark.parametrize("k", [2, 3, 4])
def test_measured_bytes_equal_formula(run_workers, k):
    for preset, options in PRESETS:
        for rank, (measured, expected) in enumerate(run_workers(k, _measure, preset, options, 11)):
            assert measured == expected, f"{preset} K={k} rank {rank}: measured {measured} != formula {expected}"


HYBRIDS = [(4, "model", 2), (4, "owt", 2), (2, "owt", 1), (3, "model", 1)]


@pytest.mark.parametrize("k,preset,split_degree", HYBRIDS, ids=[f"k{k}-{p}-s{s}" for k, p, s in HYBRIDS])
def test_hybrid_measured_bytes_equal_formula(run_workers, k, preset, split_degree):
    options = {"split_degree": split_degree}
    for rank, (measured, expected) in enumerate(run_workers(k, _measure, preset, options, 11)):
        assert measured == expected, f"{preset} s={split_degree} K={k} rank {rank}: measured {measured} != formula {expected}"


def test_per_layer_degrees_measured_bytes_equal_formula(run_workers):
    from pyowt.parallel import Plan

    from .test_parity import MIXED_DEGREES

    for name, layers in sorted(MIXED_DEGREES.items()):
        for rank, (measured, expected) in enumerate(run_workers(4, _measure, Plan(layers, name=name), {}, 11)):
            assert measured == expected, f"{name} rank {rank}: measured {measured} != formula {expected}"


def test_hybrid_head_traffic_shrinks_with_the_split_degree():
    """owt at K = 8 with the head split 4 ways: the head's activation all-reduces run in
    groups of 4 on half the batch each, and its weight gradients (1/4 each) are summed
    over pairs; torchvision AlexNet, b = 128 per worker."""
    import torchvision

    model = torchvision.models.alexnet(weights=None)
    k, b = 8, 128
    shape = (k * b, 3, 224, 224)
    full = step_volume(model, "owt", k, 0, shape)
    hybrid = step_volume(model, "owt", k, 0, shape, split_degree=4)
    p_fc = sum(p.numel() for p in model.classifier.parameters())
    # fc gradients: 1/4 of the head per rank, all-reduced over 2 ranks (2(d-1)/d = 1).
    assert hybrid["all_reduce"]["sent"] > full["all_reduce"]["sent"]
    grad_part = hybrid["all_reduce"]["sent"] - full["all_reduce"]["sent"]
    assert grad_part < p_fc / 4 * 4 * 1.01
    # The trunk all-gather covers half the batch over 4 ranks: 3 * b rows instead of 7 * b.
    assert hybrid["all_gather"]["sent"] == full["all_gather"]["sent"] * 3 // 7
    with pytest.raises(ValueError, match="split_degree must divide the 8 workers"):
        step_volume(model, "owt", k, 0, shape, split_degree=3)
    with pytest.raises(ValueError, match="scheme 'b' needs every split layer at degree 8"):
        step_volume(model, "owt", k, 0, shape, scheme="b", split_degree=4)


def test_alexnet_closed_forms_at_k8():
    """DESIGN.md's figures: torchvision AlexNet, fp32, K = 8, b = 128 per worker."""
    import torchvision

    model = torchvision.models.alexnet(weights=None)
    k, b = 8, 128
    shape = (k * b, 3, 224, 224)
    p_all = sum(p.numel() for p in model.parameters())
    p_conv = sum(p.numel() for p in model.features.parameters())
    data = step_volume(model, "data", k, 0, shape)
    grads = 2 * (k - 1) / k * p_all * 4
    # Rounding: a bucket whose size K does not divide gives rank 0 one element more (at most
    # (K-1)*4 bytes a bucket), and the loss value's all-reduce moves (K-1)*4 bytes on rank 0.
    assert abs(total_sent(data) - grads) <= 5 * (k - 1) * 4
    assert 425e6 < total_sent(data) < 430e6

    owt = step_volume(model, "owt", k, 0, shape)
    a = 9216
    analytic = (2 * (k - 1) / k * p_conv * 4          # conv gradient all-reduce
                + 2 * (k - 1) * b * a * 4              # trunk all-gather + reduce-scatter
                + 2 * 2 * (k - 1) / k * k * b * 4096 * 4)  # B x 4096 all-reduce, fwd + bwd
    loss_terms = total_sent(owt) - analytic
    assert 0 <= loss_terms < 3 * 2 * k * b * 4 + 4 * k * 4, (total_sent(owt), analytic)
    assert 140e6 < total_sent(owt) < 146e6
    assert total_sent(owt) < total_sent(data) / 2.9
