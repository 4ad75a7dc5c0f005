"""Communication costs agree with comm_model to the byte; cost model pieces; DAG capture."""
from collections import defaultdict

import time

import pytest
import torch

from pyowt.distributed.accounting import all_reduce_bytes
from pyowt.parallel.comm_model import step_volume
from pyowt.parallel.plan import make_plan
from pyowt.planner.auto import Evaluator, preset_configs, search
from pyowt.planner.capture import capture
from pyowt.planner.costs import CostModel, OpSig, Profiler, fit_line, measure_comm
from pyowt.planner.dag import dag_tasks
from pyowt.planner.search import plan_from
from pyowt.planner.specs import LINKS, make_cluster
from pyowt.planner.tasks import chain_tasks

from ..parallel._models import small_alexnet
from ._models import TinyResNet

PLANS = [("data", {}), ("model", {}), ("owt", {}), ("owt", {"scheme": "b"}), ("owt", {"scheme": "c"}),
         ("owt", {"scheme": "b", "fc_update": "per_pass"}), ("owt", {"scheme": "c", "fc_update": "per_pass"})]
PLAN_IDS = ["-".join([p] + list(o.values())) for p, o in PLANS]


def _volume(tasks):
    vol = defaultdict(lambda: {"calls": 0, "sent": 0, "received": 0})
    for t in tasks:
        if t.stream == "comm":
            v = vol[t.kind]
            v["calls"] += 1
            v["sent"] += t.sent
            v["received"] += t.received
    return dict(vol)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("preset,options", PLANS, ids=PLAN_IDS)
def test_comm_bytes_equal_step_volume(k, preset, options):
    torch.manual_seed(0)
    model = small_alexnet()
    shape = (11, 3, 16, 16)  # uneven shards
    graph = capture(model, shape)
    cost = CostModel(make_cluster("h100", k, "nvlink"))
    for rank in range(k):
        st = chain_tasks(graph, make_plan(model, preset, **options), cost, k, rank)
        assert _volume(st.tasks) == step_volume(model, preset, k, rank, shape, **options), (preset, k, rank)


HYBRIDS = [(4, "model", 2), (4, "owt", 2), (2, "owt", 1), (8, "owt", 4), (6, "model", 3)]


@pytest.mark.parametrize("k,preset,split_degree", HYBRIDS, ids=[f"k{k}-{p}-s{s}" for k, p, s in HYBRIDS])
def test_hybrid_comm_bytes_equal_step_volume(k, preset, split_degree):
    torch.manual_seed(0)
    model = small_alexnet()
    shape = (23, 3, 16, 16)  # uneven blocks and shards
    graph = capture(model, shape)
    cost = CostModel(make_cluster("h100", k, "nvlink"))
    plan = make_plan(model, preset, split_degree=split_degree)
    for rank in range(k):
        for granular in (False, True):
            st = chain_tasks(graph, plan, cost, k, rank, granular=granular)
            if not granular:
                assert _volume(st.tasks) == step_volume(model, plan, k, rank, shape), (preset, k, rank)
    # split_degree = K is the plain plan, task for task.
    full = chain_tasks(graph, make_plan(model, preset), cost, k, 0)
    same = chain_tasks(graph, make_plan(model, preset, split_degree=k), cost, k, 0)
    assert [(t.name, t.duration, t.sent) for t in full.tasks] == [(t.name, t.duration, t.sent) for t in same.tasks]


def test_per_layer_degrees_comm_bytes_equal_step_volume():
    from pyowt.parallel import Plan

    from ..parallel.test_parity import MIXED_DEGREES

    torch.manual_seed(0)
    model = small_alexnet()
    shape = (23, 3, 16, 16)
    graph = capture(model, shape)
    eight = {n: c.replace("@4", "@8").replace("@2", "@4") if i % 3 else c for i, (n, c) in
             enumerate(MIXED_DEGREES["alternating"].items())}  # degrees 2, 4 and 8 together
    for k, layers in [(4, MIXED_DEGREES["trunk-pair-then-head"]), (4, MIXED_DEGREES["alternating"]), (8, eight)]:
        plan = Plan(layers)
        cost = CostModel(make_cluster("h100", k, "nvlink"))
        for rank in range(k):
            st = chain_tasks(graph, plan, cost, k, rank)
            assert _volume(st.tasks) == step_volume(model, plan, k, rank, shape), (layers, k, rank)


def test_hybrid_groups_span_the_nodes_they_sit_on():
    """2 nodes x 4 H100: a split group of 4 consecutive ranks stays on NVLink; its replica
    group (ranks r and r + 4) crosses the network."""
    model = small_alexnet()
    shape = (64, 3, 16, 16)
    graph = capture(model, shape)
    cost = CostModel(make_cluster("h100", 8, "nvlink", nodes=2))
    st = chain_tasks(graph, make_plan(model, "owt", split_degree=4), cost, 8, 5)
    nv, ib = LINKS["nvlink"], LINKS["ib"]
    ag = next(t for t in st.tasks if t.kind == "all_gather")
    n = 32 * model.classifier[1].in_features * 4  # the block's 32 rows of the trunk output, fp32
    assert ag.duration == pytest.approx(3 * (nv.alpha + n / 4 / nv.bandwidth))
    rep = [t for t in st.tasks if t.name.startswith("grad all_reduce replica")]
    assert rep and all(t.duration > 2 * ib.alpha for t in rep)


def test_comm_bytes_equal_step_volume_for_searched_plans():
    torch.manual_seed(0)
    model = small_alexnet()
    shape, k = (13, 3, 16, 16), 3
    graph = capture(model, shape)
    for link in ("nvlink", "ethernet"):
        cost = CostModel(make_cluster("h100", k, link))
        res = search(graph, cost, k, iters=200)
        for pred in res.candidates:
            plan = plan_from(graph, pred.configs)
            st = chain_tasks(graph, plan, cost, k, 1)
            assert _volume(st.tasks) == step_volume(model, plan, k, 1, shape), pred.configs


def test_alpha_beta_ring_and_hierarchical_by_hand():
    nv, ib = LINKS["nvlink"], LINKS["ib"]
    cost = CostModel(make_cluster("h100", 8, "nvlink"))
    n = 1e8
    assert cost.collective("all_reduce", n, 8) == pytest.approx(14 * (nv.alpha + n / 8 / nv.bandwidth))
    assert cost.collective("all_gather", n, 8) == pytest.approx(7 * (nv.alpha + n / 8 / nv.bandwidth))
    assert cost.collective("all_reduce", n, 1) == 0.0
    two = CostModel(make_cluster("h100", 16, "nvlink", nodes=2))
    inside = 14 * (nv.alpha + n / 8 / nv.bandwidth)
    across = 2 * (ib.alpha + n / 8 / 2 / ib.bandwidth)
    assert two.collective("all_reduce", n, 16) == pytest.approx(inside + across)
    with pytest.raises(ValueError, match="kind"):
        cost.collective("alltoall", n, 8)


def test_roofline_grows_with_work_and_uses_the_dtype():
    fp32 = CostModel(make_cluster("h100", 8, "nvlink"))
    bf16 = CostModel(make_cluster("h100", 8, "nvlink", dtype="bf16"))
    sig = lambda n: OpSig("linear", (n, 4096), (n, 4096), (4096, True, "relu", True))
    assert fp32.compute(sig(4096))[0] > 10 * fp32.compute(sig(64))[0]
    assert bf16.compute(sig(4096))[0] < fp32.compute(sig(4096))[0] / 5
    f, b = fp32.compute(sig(4096))
    assert b == pytest.approx(2 * f, rel=0.05)  # input and weight gradients


def test_profiles_are_measured_once_and_cached_on_disk(tmp_path):
    sig = OpSig("conv", (2, 3, 8, 8), (2, 4, 8, 8), (4, (3, 3), (1, 1), (1, 1), (1, 1), True, "relu", False))
    prof = Profiler("cpu", reps=2, cache_dir=str(tmp_path))
    f, b = prof(sig)
    assert f > 0 and b > 0 and prof.measured == 1
    prof(sig)
    assert prof.measured == 1
    prof.save()
    again = Profiler("cpu", reps=2, cache_dir=str(tmp_path))
    assert again(sig) == (f, b) and again.measured == 0
    other = Profiler("cpu", reps=2, cache_dir=str(tmp_path), context={"concurrent": 4})
    other(sig)
    assert other.measured == 1  # contention is part of the key
    key = again.key(sig)
    for field in ("torch", "pyowt", "device", "dtype", "threads", "cores"):
        assert f'"{field}"' in key


def _spin(seconds):
    t0 = time.thread_time()  # this thread's CPU: wall and process CPU time are both at least this
    while time.thread_time() - t0 < seconds:
        pass
    return torch.zeros(1)


def test_cpu_profiles_model_time_slicing_among_concurrent_workers():
    """An op needing 3 ms of CPU, profiled for a process that shares the cores with 4x as many
    workers as there are cores, costs at least 4 x 3 ms (each worker gets 1/4 of a core over
    a step), whatever its median wall time; alone it costs its wall time (>= its CPU time)."""
    alone = Profiler("cpu", reps=3, cache_dir=False)
    crowded = Profiler("cpu", reps=3, cache_dir=False, context={"concurrent": 4 * alone.cores})
    assert crowded.cpu_share == pytest.approx(min(torch.get_num_threads(), 0.25))
    make = lambda: ((), lambda: _spin(3e-3))
    f_alone, _ = alone._timed(make)
    f_crowded, _ = crowded._timed(make)
    assert f_alone >= 3e-3
    assert f_crowded >= 3e-3 / crowded.cpu_share * 0.999


def test_fit_line():
    a, b = fit_line([(0, 1.0), (10, 21.0), (20, 41.0)])
    assert a == pytest.approx(1.0) and b == pytest.approx(2.0)


def _fit_on_group():
    return measure_comm(sizes=(1 << 10, 1 << 16), reps=2)


def test_measure_comm_on_a_live_group(run_workers):
    fits = run_workers(2, _fit_on_group)
    assert fits[0] == fits[1]  # max over ranks: the same fit everywhere
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        a, b = fits[0][kind]
        assert a >= 0 and b >= 0 and a + b * 65536 > 0


def test_dag_capture_and_prediction():
    torch.manual_seed(0)
    model = TinyResNet()
    graph = capture(model, (8, 3, 8, 8))
    assert not graph.is_chain
    adds = [n for n in graph.nodes if n.kind == "add"]
    assert len(adds) == 2 and len(adds[0].inputs) == 2
    k = 4
    cost = CostModel(make_cluster("h100", k, "nvlink"))
    data = preset_configs(graph, "data")
    st = dag_tasks(graph, data, cost, k, rank=0)
    # Data parallel: only the gradient all-reduce (every parameter, BatchNorm's too) and the loss value.
    n_params = sum(p.numel() for p in model.parameters())
    vol = _volume(st.tasks)
    assert set(vol) == {"all_reduce"} and vol["all_reduce"]["calls"] == 2  # one bucket + the loss
    assert vol["all_reduce"]["sent"] == all_reduce_bytes(n_params, k, 0, 4)[0] + all_reduce_bytes(1, k, 0, 4)[0]
    res = search(graph, cost, k, iters=200)
    assert res.best.time <= min(p.time for p in res.presets.values())
    model_cfg = preset_configs(graph, "model")
    assert Evaluator(graph, cost, k).predict(model_cfg).comm_bytes > 0


@pytest.mark.parametrize("scheme", ["b", "c"])
def test_owt_passes_overlap_the_next_transfer_and_step_per_pass(scheme):
    """Schemes b/c: K passes of the head; pass j+1's rows move while pass j computes, and
    per_pass adds a head optimizer step after every pass."""
    from pyowt.planner.simulator import simulate

    torch.manual_seed(0)
    model = small_alexnet()
    k, shape = 3, (12, 3, 16, 16)
    graph = capture(model, shape)
    cost = CostModel(make_cluster("k20", k, "ethernet"))
    move = "broadcast" if scheme == "b" else "all_gather"
    acc = chain_tasks(graph, make_plan(model, "owt", scheme=scheme), cost, k, 0).tasks
    per = chain_tasks(graph, make_plan(model, "owt", scheme=scheme, fc_update="per_pass"), cost, k, 0).tasks
    moves = [i for i, t in enumerate(acc) if t.name.startswith(f"{move} pass")]
    assert len(moves) == k
    res = simulate([acc], overlap=True)
    for j in range(k - 1):  # the transfer of pass j+1 starts before pass j's last head task ends
        head_j = [i for i in range(moves[j + 1] + 1, moves[j + 2] if j + 2 < k else len(acc))
                  if acc[i].stream == "compute" and acc[i].phase in ("fwd", "bwd")]
        assert res.starts[0][moves[j + 1]] < max(res.ends[0][i] for i in head_j)
    split_layers = sum(c != "data" for c in make_plan(model, "owt").layers.values())
    assert split_layers > 0 and sum(t.name == "head optimizer" for t in per) == k * split_layers
    assert sum(t.name == "optimizer" for t in per) == 1 and sum(t.name == "head optimizer" for t in acc) == 0


def test_predict_plan_models_the_plan_scheme():
    """predict_plan equals predict for scheme a, simulates the plan's own tasks for b/c."""
    from pyowt.planner.simulator import simulate

    torch.manual_seed(0)
    model = small_alexnet()
    k, shape = 3, (12, 3, 16, 16)
    graph = capture(model, shape)
    cost = CostModel(make_cluster("k20", k, "ethernet"))
    ev = Evaluator(graph, cost, k)
    owt_a = ev.predict_plan(make_plan(model, "owt"))
    assert owt_a.time == ev.predict(preset_configs(graph, "owt")).time
    for scheme in ("b", "c"):
        plan = make_plan(model, "owt", scheme=scheme)
        got = ev.predict_plan(plan)
        want = simulate([chain_tasks(graph, plan, cost, k, 0).tasks], overlap=True).time
        assert got.time == pytest.approx(want) and got.name == plan.name
        assert got.time != owt_a.time  # the passes change the schedule


def test_capture_names_each_use_of_a_reused_module():
    """ResBlock applies one ReLU twice: two nodes, two names, each with its own shape."""
    graph = capture(TinyResNet(), (2, 3, 8, 8))
    names = [n.name for n in graph.nodes]
    assert len(names) == len(set(names)), names
    relus = [n for n in graph.nodes if n.name.split("#")[0].endswith("relu")]
    assert any("#" in n.name for n in relus)
    known = set()
    for n in graph.nodes:
        assert all(i in known for i in n.inputs), (n.name, n.inputs)  # inputs name earlier nodes
        assert graph.node(n.name) is n and graph.shapes[n.name] == n.shape
        known.add(n.name)
    assert [n.name for n in graph.weight_nodes] == [n for n, m in TinyResNet().named_modules()
                                                      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
