"""Gradient buckets: summed across ranks, views of persistent buffers, zero_grad either way."""
import torch
import torch.distributed as dist
from torch import nn

from pyowt.parallel.grad_sync import GradSync, bucket_indices


def test_bucket_indices_in_backward_order():
    assert bucket_indices([4, 4, 4, 4], 8) == [[3, 2], [1, 0]]
    assert bucket_indices([4, 4, 4], 100) == [[2, 1, 0]]
    assert bucket_indices([16, 1, 1], 8) == [[2, 1, 0]]


def _sync_check():
    rank, k = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 2))
    model[3].weight.requires_grad_(False)  # frozen: never synced
    sync = GradSync(list(model.parameters()), None, bucket_bytes=64)
    for set_to_none in (True, False, True):
        model.zero_grad(set_to_none=set_to_none)
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank))
        model(x).pow(2).sum().backward()
        # Every rank's gradient is the sum of each rank's own.
        local = {}
        for r in range(k):
            m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 2))
            m.load_state_dict(model.state_dict())
            m(torch.randn(4, 5, generator=torch.Generator().manual_seed(r))).pow(2).sum().backward()
            for n, p in m.named_parameters():
                if p.grad is not None:
                    local[n] = local.get(n, 0) + p.grad
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, local[n], rtol=1e-6, atol=1e-6)
            else:
                assert p.grad is None
    # Gradients are views of the buckets' buffers (no copies on the next step).
    slot = next(b.slots[id(model[0].weight)] for b in sync.buckets if id(model[0].weight) in b.slots)
    assert model[0].weight.grad.data_ptr() == slot.data_ptr()
    with sync.no_sync():
        model(torch.randn(4, 5)).sum().backward()
    return True


def test_sums_across_ranks(run_workers):
    assert run_workers(3, _sync_check) == [True] * 3
