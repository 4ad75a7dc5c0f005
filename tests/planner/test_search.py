"""Search: the chain DP is exact (brute force), MCMC reaches it, auto never loses to a preset."""
import itertools
import math
import random

import pytest
import torch

from pyowt.parallel.plan import make_plan
from pyowt.planner.auto import Evaluator, preset_configs, search
from pyowt.planner.capture import capture
from pyowt.planner.costs import CostModel
from pyowt.planner.search import brute_force, candidates, dp_chain, mcmc
from pyowt.planner.specs import make_cluster

from ..parallel._models import small_alexnet
from ._models import tiny_chain

CLUSTERS = [("h100", "nvlink"), ("k20", "ethernet"), ("cpu", "pcie")]


def test_dp_equals_brute_force_on_random_tables():
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(1, 6)
        cands = [rng.sample(["a", "b", "c"], rng.randint(1, 3)) for _ in range(n)]
        table = {(i, p, c): rng.random() for i in range(n) for p in [None, "a", "b", "c"] for c in "abc"}
        seg = lambda i, p, c: table[(i, p, c)]
        total = lambda cs: sum(seg(i, cs[i - 1] if i else None, c) for i, c in enumerate(cs))
        path, v = dp_chain(cands, seg)
        bf_path, bf_v = brute_force(cands, total)
        assert v == pytest.approx(bf_v, rel=1e-12) and total(path) == pytest.approx(v, rel=1e-12)


@pytest.mark.parametrize("device,link", CLUSTERS)
@pytest.mark.parametrize("k,batch", [(2, 16), (3, 11), (4, 64)])
def test_dp_equals_brute_force_on_plans(device, link, k, batch):
    """The DP's plan has the least serialized step time of all plans (every combination
    costed from scratch by compiling it), so the segment decomposition is exact."""
    torch.manual_seed(0)
    model = tiny_chain()
    graph = capture(model, (batch, 3, 8, 8))
    ev = Evaluator(graph, CostModel(make_cluster(device, k, link)), k)
    path, v = dp_chain(ev.cands, ev.segment_cost)
    bf_path, bf_v = brute_force(ev.cands, ev.serial)
    assert len(list(itertools.product(*ev.cands))) > 20
    assert v == pytest.approx(bf_v, rel=1e-9)
    assert ev.serial(path) == pytest.approx(bf_v, rel=1e-9)


@pytest.mark.parametrize("device,link", CLUSTERS)
@pytest.mark.parametrize("k,split_degree", [(4, 2), (6, 3), (6, 2)])
def test_dp_equals_brute_force_on_hybrid_plans(device, link, k, split_degree):
    """The segment decomposition stays exact with split groups and replica groups."""
    torch.manual_seed(0)
    graph = capture(tiny_chain(), (4 * k + 3, 3, 8, 8))
    ev = Evaluator(graph, CostModel(make_cluster(device, k, link)), k, split_degree=split_degree)
    path, v = dp_chain(ev.cands, ev.segment_cost)
    _, bf_v = brute_force(ev.cands, ev.serial)
    assert v == pytest.approx(bf_v, rel=1e-9) and ev.serial(path) == pytest.approx(bf_v, rel=1e-9)


@pytest.mark.parametrize("device,link", CLUSTERS)
def test_per_layer_degrees_dp_equals_brute_force_and_the_table_equals_segment_cost(device, link):
    torch.manual_seed(0)
    k = 4
    graph = capture(tiny_chain(), (4 * k + 3, 3, 8, 8))
    ev = Evaluator(graph, CostModel(make_cluster(device, k, link)), k, per_layer=True)
    assert any("@2" in c for cs in ev.cands for c in cs)
    table = ev.segment_table()
    for i, cs in enumerate(ev.cands):
        for prev in (ev.cands[i - 1] if i else [None]):
            for cur in cs:
                assert table(i, prev, cur) == pytest.approx(ev.segment_cost(i, prev, cur), rel=1e-12), (i, prev, cur)
    path, v = dp_chain(ev.cands, table)
    _, bf_v = brute_force(ev.cands, ev.serial)
    assert v == pytest.approx(bf_v, rel=1e-9) and ev.serial(path) == pytest.approx(bf_v, rel=1e-9)


def test_predict_plan_costs_per_layer_degrees():
    from pyowt.parallel import Plan

    from ..parallel.test_parity import MIXED_DEGREES

    torch.manual_seed(0)
    model = small_alexnet()
    graph = capture(model, (23, 3, 16, 16))
    cost = CostModel(make_cluster("h100", 4, "nvlink"))
    ev = Evaluator(graph, cost, 4)
    full = Evaluator(graph, cost, 4, per_layer=True)
    for layers in MIXED_DEGREES.values():
        configs = tuple(layers[n.name].replace("@4", "") for n in graph.weight_nodes)
        got = ev.predict_plan(Plan(layers))
        assert math.isfinite(got.time) and got.time == pytest.approx(full.predict(configs).time, rel=1e-12)
    # a plan-wide degree fills in the split layers without their own
    mixed = make_plan(model, "owt", split_degree=2)
    mixed.layers["classifier.6"] = "split_out@4"
    want = tuple(c if c in ("data", "split_out@4") else c + "@2" for c in (mixed.layers[n.name] for n in graph.weight_nodes))
    want = tuple(c.replace("@4", "") for c in want)
    assert ev.predict_plan(mixed).time == pytest.approx(full.predict(want).time, rel=1e-12)


def test_auto_with_per_layer_degrees_beats_every_plan_wide_degree():
    """2 nodes x 8 H100 (NVLink + IB), AlexNet bf16: the searched plan is at least as fast
    as the best plan of every single split degree (each degree's own DP optimum and OWT)."""
    import torchvision

    from pyowt.planner.auto import split_degrees

    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    k = 16
    graph = capture(model, (128 * k, 3, 224, 224))
    cost = CostModel(make_cluster("h100", k, "nvlink", nodes=2, dtype="bf16"))
    res = search(graph, cost, k, iters=300)
    ev = Evaluator(graph, cost, k)
    for s in split_degrees(k):
        sub = ev.for_split(s)
        dp, _ = dp_chain(sub.cands, sub.segment_table())
        for configs in (dp, preset_configs(graph, "owt")):
            assert res.best.time <= sub.predict(configs).time * (1 + 1e-12), (s, configs)
    assert res.best.time < res.presets["data"].time * 0.95  # hybrids pay across nodes
    assert any("@" in c for c in res.plan.layers.values()), res.plan.layers


@pytest.mark.parametrize("device,link", [("h100", "nvlink"), ("k20", "ethernet")])
def test_auto_is_never_worse_than_a_hybrid_preset_and_names_its_degree(device, link):
    import torchvision

    from pyowt.parallel.mesh import check_split_degree
    from pyowt.planner.auto import split_degrees

    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    k = 8
    graph = capture(model, (64 * k, 3, 224, 224))
    cost = CostModel(make_cluster(device, k, link, dtype="bf16"))
    res = search(graph, cost, k, iters=200)
    ev = Evaluator(graph, cost, k)
    hybrid_presets = [ev.predict_plan(make_plan(model, p, split_degree=s)) for p in ("model", "owt") for s in split_degrees(k)]
    assert res.best.time <= min(p.time for p in hybrid_presets) * (1 + 1e-12)
    assert res.plan.split_degree == res.best.split_degree
    check_split_degree(res.plan.split_degree, k)
    if res.plan.split_degree is not None:  # a hybrid plan splits something
        assert any(c != "data" for c in res.best.configs)
    plain = search(graph, cost, k, iters=200, hybrids=False)
    assert plain.best.split_degree is None and res.best.time <= plain.best.time * (1 + 1e-12)


@pytest.mark.parametrize("device,link", CLUSTERS)
def test_mcmc_reaches_the_dp_optimum_on_chains(device, link):
    torch.manual_seed(0)
    model = small_alexnet()
    k = 3
    graph = capture(model, (11, 3, 16, 16))
    ev = Evaluator(graph, CostModel(make_cluster(device, k, link)), k)
    _, dp_v = dp_chain(ev.cands, ev.segment_cost)
    res = mcmc(ev.cands, ev.serial, [preset_configs(graph, "data")], iters=3000, seed=1)
    assert res.cost == pytest.approx(dp_v, rel=1e-9)


def test_candidates_respect_what_layers_can_split():
    model = tiny_chain(c=(3, 8, 12), hidden=10, classes=5)
    graph = capture(model, (8, 3, 8, 8))
    cands = candidates(graph, 6)
    assert cands[0] == ["data", "split_out"]          # 3 input channels < 6 workers
    assert cands[3] == ["data", "split_in"]           # 5 classes < 6 workers
    assert candidates(graph, 1) == [["data"]] * 4
    ev = Evaluator(graph, CostModel(make_cluster("h100", 12, "nvlink")), 12, split_degree=4)
    assert ev.cands[0] == ["data", "split_out"]              # 3 input channels < 4
    assert ev.cands[3] == ["data", "split_out", "split_in"]  # 5 classes: enough for groups of 4
    with pytest.raises(ValueError, match="split_degree must divide the 12 workers"):
        Evaluator(graph, CostModel(make_cluster("h100", 12, "nvlink")), 12, split_degree=5)


@pytest.mark.parametrize("name,k", [("small", 2), ("small", 4), ("alexnet", 4), ("alexnet", 8)])
@pytest.mark.parametrize("device,link", [("h100", "nvlink"), ("v100", "pcie"), ("k20", "ethernet")])
def test_auto_is_never_worse_than_a_preset(name, k, device, link):
    import torchvision

    torch.manual_seed(0)
    model = small_alexnet() if name == "small" else torchvision.models.alexnet(weights=None)
    size = 16 if name == "small" else 224
    graph = capture(model, (32 * k, 3, size, size))
    res = search(graph, CostModel(make_cluster(device, k, link)), k, iters=300)
    assert res.best.time <= min(p.time for p in res.presets.values())
    for preset, pred in res.presets.items():  # the presets are pyowt's own
        plan = make_plan(model, preset)
        assert pred.configs == tuple(plan.layers[n.name] for n in graph.weight_nodes)


def test_memory_limit_excludes_plans():
    torch.manual_seed(0)
    model = small_alexnet()
    k = 4
    graph = capture(model, (64, 3, 16, 16))
    cost = CostModel(make_cluster("h100", k, "nvlink"))
    free = search(graph, cost, k, iters=200)
    preds = {p.name: p for p in free.candidates}
    limit = min(p.memory for p in preds.values()) * 1.0001
    tight = search(graph, cost, k, memory_limit=limit, iters=400)
    assert tight.best.feasible and tight.best.memory <= limit
