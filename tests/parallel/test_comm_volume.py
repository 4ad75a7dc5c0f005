"""Measured communication of a training step equals the plan's analytic volume, to the byte."""
import pytest
import torch

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
