"""OWT with fc_update="per_pass" (cuda-convnet2's variable batch size) against a
single-process replay of the same schedule: K head passes, each stepping the head on its
pass's mean loss with the weights the previous pass left, the trunk stepping once on the
sum of what the passes sent back."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pyowt.parallel import SeededDropout, full_state_dict, parallelize, seeded_dropout_copy
from pyowt.parallel.passes import _pass_rows

from ..utils import rel_err
from ._models import global_batch, make_model

STEPS, LR, MOMENTUM = 3, 0.05, 0.9


def _replay(model, scheme, k, seed, batch, size):
    ref = seeded_dropout_copy(copy.deepcopy(model), seed=seed)
    # The parallel trunk ends where the batch is gathered: before the first split layer
    # (classifier.1); classifier.0 (dropout) runs batch-sharded, in the trunk.
    head = ref.classifier[1:]
    head_ids = {id(p) for p in head.parameters()}
    trunk_params = [p for p in ref.parameters() if id(p) not in head_ids]
    trunk_opt = torch.optim.SGD(trunk_params, lr=LR, momentum=MOMENTUM)
    head_opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM)
    losses = []
    for step in range(STEPS):
        x, y = global_batch(step, batch, size)
        t = ref.classifier[0](torch.flatten(ref.avgpool(ref.features(x)), 1))
        t_det = t.detach().requires_grad_(True)
        total = 0.0
        for pieces in _pass_rows(scheme, k, batch):
            rows = torch.cat([torch.arange(s, e) for _, s, e in pieces])
            if rows.numel() == 0:
                continue
            h = t_det[rows]
            for m in head:
                h = m(h, global_shape=(batch, h.shape[1]), rows=rows, step=step) if isinstance(m, SeededDropout) else m(h)
            loss = F.cross_entropy(h, y[rows])
            head_opt.zero_grad()
            loss.backward()
            head_opt.step()
            total += loss.item()
        trunk_opt.zero_grad()
        t.backward(t_det.grad)
        trunk_opt.step()
        losses.append(total)
    return losses, ref.state_dict()


def _check(scheme, batch, seed=0):
    torch.manual_seed(seed)
    model, size = make_model("small", seed)
    k = dist.get_world_size()
    ref_losses, ref_params = _replay(model, scheme, k, seed, batch, size)
    pmodel = parallelize(model, "owt", scheme=scheme, fc_update="per_pass", seed=seed,
                         head_optimizer=lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM))
    opt = torch.optim.SGD(pmodel.trunk_parameters(), lr=LR, momentum=MOMENTUM)
    report, losses = [], []
    for step in range(STEPS):
        x, y = global_batch(step, batch, size)
        xl, yl = pmodel.local_batch(x, y)
        loss = pmodel.loss(pmodel(xl), yl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if abs(loss.item() - ref_losses[step]) > 1e-5 * abs(ref_losses[step]):
            report.append(f"step {step}: loss {loss.item()!r} != replay {ref_losses[step]!r}")
    for name, value in full_state_dict(pmodel).items():
        err = rel_err(value, ref_params[name])
        if err > 1e-5:
            report.append(f"{name}: relative error {err:.3g}")
    assert not report, f"rank {dist.get_rank()} scheme {scheme}: " + "; ".join(report)
    return losses


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("scheme", ["b", "c"])
def test_per_pass_matches_replay(run_workers, k, scheme):
    losses = run_workers(k, _check, scheme, 11, timeout=300)
    assert all(l == losses[0] for l in losses)


def _needs_head_optimizer():
    model, _ = make_model("small", 0)
    with pytest.raises(ValueError, match="per_pass' needs head_optimizer"):
        parallelize(model, "owt", scheme="b", fc_update="per_pass")
    return True


def test_per_pass_without_head_optimizer_is_an_error(run_workers):
    assert run_workers(2, _needs_head_optimizer) == [True, True]
