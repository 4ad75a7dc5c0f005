"""torch.compile(fullgraph=True) of a module chaining every transition (Gloo, K = 2).

Compiled loss and gradients must equal eager ones. ``aot_eager`` runs Dynamo and AOTAutograd
(the parts that must trace the autograd functions and functional collectives, forward and
backward) and is fast; an Inductor run (marked slow) checks the code it generates on CPU too.
"""
import pytest
import torch
import torch.distributed as dist

import pyowt.distributed as pd

from ._reference import pieces


class _Chain(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        torch.manual_seed(0)  # same weights on every rank
        self.k = k
        self.inp = torch.nn.Linear(6, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        r = dist.get_rank()
        h = self.inp(x)                                          # Shard(batch), 3 rows per rank
        h = pd.all_gather(h, 0, grad="split")                    # Replicate (consumer grad Replicate)
        h = pd.split(h, 1)                                       # Shard(features), even: 8 / K
        h = pd.all_gather(h, 1, grad="reduce_scatter")           # Replicate again
        h = pd.copy_to_group(h) * (r + 1)                        # ranks diverge -> Partial
        h = pd.reduce_scatter(h, 0, None)                        # Shard(batch), uneven for K = 4
        h = pd.all_gather(h, 0, sizes=pieces(3 * self.k, self.k))  # uneven gather: sizes known
        h = pd.all_reduce(h) / self.k
        h = pd.broadcast(h, self.k - 1)
        h = pd.reduce_to(h, 0)                                   # only rank 0's value is defined
        y = self.out(h)
        return (y * y).sum() * (r == 0)


def _compile_matches_eager(backend):
    k, r = dist.get_world_size(), dist.get_rank()
    torch._dynamo.reset()
    model = _Chain(k)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(r))
    loss = model(x)
    loss.backward()
    ref = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for _ in range(2):  # the second call runs the cached graph
        model.zero_grad()
        loss = compiled(x)
        loss.backward()
    got = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for name, a, b in zip(["loss", "w_in", "b_in", "w_out", "b_out"], got, ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{backend} {name}: {a} vs {b}"
    return float(ref[0])


# Inductor adds ~30 s of C++ compilation on a 2-core machine without a warm cache.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(run_workers, backend):
    losses = run_workers(2, _compile_matches_eager, backend, timeout=300)
    assert losses[0] > 0 and losses[1] == 0.0
