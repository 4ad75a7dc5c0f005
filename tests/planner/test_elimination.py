"""Node/edge elimination: exact against brute force on series-parallel graphs, equal to the chain DP."""
import itertools
import random

import pytest
import torch

from pyowt.planner.elimination import eliminate, pairwise_cost
from pyowt.planner.search import dp_chain

CFG = ("data", "split_out", "split_in")


def _random_costs(nodes, edges, seed, cands=None):
    rng = random.Random(seed)
    cands = cands or {v: CFG for v in nodes}
    ntab = {(v, c): rng.uniform(0, 10) for v in nodes for c in cands[v]}
    # parallel edges get separate tables, keyed by their position in the list
    etab = [{(a, b): rng.uniform(0, 10) for a in cands[u] for b in cands[v]} for u, v in edges]
    index = {}
    for i, e in enumerate(edges):
        index.setdefault(e, []).append(i)

    def node_cost(v, c):
        return ntab[(v, c)]

    def edge_cost(u, v, a, b):
        return sum(etab[i][(a, b)] for i in index[(u, v)]) / len(index[(u, v)])

    return cands, node_cost, edge_cost


def _brute(cands, node_cost, edges, edge_cost):
    nodes = list(cands)
    best = min(itertools.product(*(cands[v] for v in nodes)),
               key=lambda combo: pairwise_cost(dict(zip(nodes, combo)), node_cost, edges, edge_cost))
    x = dict(zip(nodes, best))
    return x, pairwise_cost(x, node_cost, edges, edge_cost)


DIAMOND = (["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")])
TWO_DIAMONDS = (list("abcdefg"), [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"),
                                  ("d", "e"), ("d", "f"), ("e", "g"), ("f", "g")])
# stem -> conv1 -> conv2 -> conv3 ~ add(skip from stem) -> head, plus a downsample branch
RESIDUAL = (["stem", "c1", "c2", "c3", "down", "d1", "d2", "head"],
            [("stem", "c1"), ("c1", "c2"), ("c2", "c3"), ("stem", "c3"),             # identity skip
             ("c3", "d1"), ("d1", "d2"), ("c3", "down"), ("down", "d2"),            # downsample block
             ("d2", "head")])
PARALLEL_EDGES = (["a", "b", "c"], [("a", "b"), ("a", "b"), ("b", "c"), ("a", "c")])


@pytest.mark.parametrize("graph", [DIAMOND, TWO_DIAMONDS, RESIDUAL, PARALLEL_EDGES],
                         ids=["diamond", "two_diamonds", "residual", "parallel_edges"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force(graph, seed):
    nodes, edges = graph
    cands, nc, ec = _random_costs(nodes, edges, seed)
    x, v = eliminate(cands, nc, edges, ec)
    bx, bv = _brute(cands, nc, edges, ec)
    assert v == pytest.approx(bv, rel=1e-12)
    # the back-tracked configs achieve the reported cost
    assert pairwise_cost(x, nc, edges, ec) == pytest.approx(v, rel=1e-12)


def test_uneven_candidates_and_direction():
    """Nodes with fewer configs, and edges listed against the elimination order."""
    nodes = ["a", "b", "c", "d"]
    edges = [("b", "a"), ("a", "c"), ("d", "b"), ("c", "d")]
    cands = {"a": CFG, "b": ("data",), "c": ("data", "split_in"), "d": CFG}
    for seed in range(5):
        cands, nc, ec = _random_costs(nodes, edges, seed, cands)
        x, v = eliminate(cands, nc, edges, ec)
        assert all(x[n] in cands[n] for n in nodes)
        assert v == pytest.approx(_brute(cands, nc, edges, ec)[1], rel=1e-12)
        assert pairwise_cost(x, nc, edges, ec) == pytest.approx(v, rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_equals_chain_dp(n):
    rng = random.Random(n)
    cands = [CFG[: rng.choice((1, 2, 3))] for _ in range(n)]
    tab = {(i, p, c): rng.uniform(0, 5) for i in range(n) for p in (None,) + CFG for c in CFG}

    def seg(i, prev, cur):
        return tab[(i, prev, cur)]

    configs, v = dp_chain(cands, seg)
    # the chain as a pairwise objective: segment 0 is a node cost, segment i an edge cost
    x, ve = eliminate({i: cands[i] for i in range(n)}, lambda i, c: seg(0, None, c) if i == 0 else 0.0,
                      [(i - 1, i) for i in range(1, n)], lambda u, w, a, b: seg(w, a, b))
    assert ve == pytest.approx(v, rel=1e-12)
    chain = seg(0, None, x[0]) + sum(seg(i, x[i - 1], x[i]) for i in range(1, n))
    assert chain == pytest.approx(v, rel=1e-12)


def test_not_series_parallel_is_enumerated_or_refused():
    # K4 is the smallest graph that is not series-parallel: no node has two neighbours
    nodes = list("abcd")
    edges = list(itertools.combinations(nodes, 2))
    cands, nc, ec = _random_costs(nodes, edges, 0)
    x, v = eliminate(cands, nc, edges, ec)
    assert v == pytest.approx(_brute(cands, nc, edges, ec)[1], rel=1e-12)
    with pytest.raises(ValueError, match="not series-parallel"):
        eliminate(cands, nc, edges, ec, max_enumerate=10)


def test_bad_input():
    with pytest.raises(ValueError, match="not in cands"):
        eliminate({"a": CFG}, lambda v, c: 0.0, [("a", "z")], lambda *a: 0.0)
    with pytest.raises(ValueError, match="no candidate"):
        eliminate({"a": ()}, lambda v, c: 0.0, [], lambda *a: 0.0)


# --- on DAG plans: the serialized step time of a residual network decomposes exactly ---------

def _bottleneck_net():
    """Stem, a torchvision Bottleneck with a strided downsample branch, one without, linear head."""
    from torch import nn
    from torchvision.models.resnet import Bottleneck

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Bottleneck(8, 4, stride=2, downsample=down),
                         Bottleneck(16, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 5))


@pytest.mark.parametrize("model,k,device,link,split_degree", [
    ("tiny_resnet", 2, "h100", "nvlink", None), ("tiny_resnet", 3, "k20", "ethernet", None),
    ("bottleneck", 4, "h100", "nvlink", None), ("bottleneck", 2, "cpu", "pcie", None),
    ("tiny_resnet", 4, "h100", "nvlink", 2), ("bottleneck", 6, "k20", "ethernet", 3)])
def test_dag_serial_time_decomposes_and_elimination_is_exact(model, k, device, link, split_degree):
    from pyowt.planner.auto import Evaluator, search
    from pyowt.planner.capture import capture
    from pyowt.planner.costs import CostModel
    from pyowt.planner.specs import make_cluster

    from ._models import TinyResNet

    net = TinyResNet() if model == "tiny_resnet" else _bottleneck_net()
    graph = capture(net, (4 * k + 1, 3, 8, 8))
    assert not graph.is_chain
    cost = CostModel(make_cluster(device, k, link))
    ev = Evaluator(graph, cost, k, split_degree=split_degree)
    node_cost, edges, edge_cost = ev.pairwise()
    n = len(ev.cands)
    if model == "bottleneck":  # the downsample conv (index 4) joins the block's last conv (3)
        assert (3, 4) in edges and (0, 4) in edges
    rng = random.Random(k)
    for _ in range(25):
        configs = tuple(rng.choice(c) for c in ev.cands)
        assert pairwise_cost(dict(enumerate(configs)), node_cost, edges, edge_cost) == pytest.approx(
            ev.serial(configs), rel=1e-12)
    configs, v = ev.eliminate()
    assert v == pytest.approx(ev.serial(configs), rel=1e-12)
    if n <= 6:  # brute force over every plan, each costed from scratch
        assert v == pytest.approx(min(ev.serial(c) for c in itertools.product(*ev.cands)), rel=1e-12)
    else:  # random plans never beat it
        assert all(ev.serial(tuple(rng.choice(c) for c in ev.cands)) >= v * (1 - 1e-12) for _ in range(200))
    if split_degree is not None:
        return
    res = search(graph, cost, k, iters=100)
    assert res.dp is not None and res.dp.configs == configs  # elimination's plan seeds MCMC and joins the pool
    assert res.best.time <= min(res.dp.time, *(p.time for p in res.presets.values())) * (1 + 1e-12)
