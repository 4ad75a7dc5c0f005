"""Plans the search writes run under pyowt.parallelize and train exactly like one process;
the ``pyowt plan`` command; the auto plan on a live group."""
import json

import pytest
import torch

from pyowt.parallel.plan import Plan, validate_plan
from pyowt.planner.auto import auto_plan, search
from pyowt.planner.capture import capture
from pyowt.planner.cli import main
from pyowt.planner.costs import CostModel
from pyowt.planner.search import plan_from
from pyowt.planner.specs import make_cluster

from ..parallel._models import make_model
from ..parallel.test_parity import _check_parity


def _searched_plans(tmp_path):
    """The DP's and the auto plan from searches whose plans mix configs (JSON files)."""
    model, size = make_model("small", 0)
    paths = []
    for link, batch in (("ethernet", 64), ("nvlink", 11)):
        graph = capture(model, (batch, 3, size, size))
        res = search(graph, CostModel(make_cluster("h100", 2, link)), 2, iters=200)
        for name, configs in (("dp", res.dp.configs), ("auto", res.best.configs)):
            plan = plan_from(graph, configs, name)
            path = tmp_path / f"{name}-{link}.json"
            plan.save(str(path))
            paths.append((str(path), configs))
    return paths


def test_searched_plans_round_trip_and_pass_the_parity_check(run_workers, tmp_path):
    plans = _searched_plans(tmp_path)
    mixed = [c for _, c in plans if len(set(c)) > 1]
    assert len(mixed) >= 2, "the searches should give mixed plans to check (layout transitions)"
    seen = set()
    for path, configs in plans:
        if configs in seen:
            continue
        seen.add(configs)
        loaded = Plan.load(path)
        validate_plan(loaded, make_model("small", 0)[0])
        losses = run_workers(2, _check_parity, "small", path, {}, 11, timeout=300)
        assert losses[0] == losses[1]


def test_searched_hybrid_plan_round_trips_and_passes_the_parity_check(run_workers, tmp_path):
    """K = 4 with split groups of 2: the DP's plan at that degree runs under parallelize
    from its JSON file exactly like one process."""
    from pyowt.planner.auto import Evaluator
    from pyowt.planner.search import dp_chain

    model, size = make_model("small", 0)
    graph = capture(model, (64, 3, size, size))
    ev = Evaluator(graph, CostModel(make_cluster("h100", 4, "ethernet")), 4, split_degree=2)
    configs, _ = dp_chain(ev.cands, ev.segment_cost)
    # (split_out x3, split_in, split_out x3, split_in): column/row pairs and a row -> column
    # transition (copy_to_group) inside the groups of 2.
    assert configs.count("split_in") >= 2 and configs.count("split_out") >= 2, configs
    path = tmp_path / "hybrid.json"
    plan_from(graph, configs, "dp s=2", split_degree=2).save(str(path))
    assert Plan.load(str(path)).split_degree == 2
    losses = run_workers(4, _check_parity, "small", str(path), {}, 11, timeout=300)
    assert all(l == losses[0] for l in losses)


def test_per_layer_degree_plan_round_trips_and_passes_the_parity_check(run_workers, tmp_path):
    """The per-layer search's DP plan at K = 4 (configs written 'split_out@2') runs under
    parallelize from its JSON file exactly like one process."""
    from pyowt.planner.auto import Evaluator
    from pyowt.planner.search import dp_chain

    model, size = make_model("small", 0)
    graph = capture(model, (64, 3, size, size))
    ev = Evaluator(graph, CostModel(make_cluster("h100", 4, "ethernet")), 4, per_layer=True)
    configs, _ = dp_chain(ev.cands, ev.segment_table())
    assert any(c.endswith("@2") for c in configs), configs
    path = tmp_path / "per_layer.json"
    plan_from(graph, configs, "dp per layer").save(str(path))
    assert Plan.load(str(path)).layers == {n.name: c for n, c in zip(graph.weight_nodes, configs)}
    losses = run_workers(4, _check_parity, "small", str(path), {}, 11, timeout=300)
    assert all(l == losses[0] for l in losses)


def test_plan_command_writes_table_plan_results_and_figure(tmp_path, capsys):
    out, results, fig = tmp_path / "plan.json", tmp_path / "results.json", tmp_path / "fig.png"
    rc = main(["plan", "--model", "small", "--workers", "4", "--device", "k20", "--interconnect", "pcie",
               "--iters", "200", "--out", str(out), "--results", str(results), "--figure", str(fig)])
    assert rc == 0
    text = capsys.readouterr().out
    for s in ("data", "model", "owt", "auto", "step time ms", "comm MB/step", "memory GB"):
        assert s in text
    plan = Plan.load(str(out))
    from pyowt.planner.cli import build_model

    validate_plan(plan, build_model("small"))
    r = json.loads(results.read_text())
    times = {row["strategy"]: row["step_time_s"] for row in r["strategies"]}
    assert times["auto"] <= min(times["data"], times["model"], times["owt"])
    assert len(r["figure"]["workers"]) == 7 and fig.read_bytes()[:4] == b"\x89PNG"


def test_plan_command_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--workers", "0"])
    assert "--workers: must be positive, got 0" in capsys.readouterr().err
    # flags that parse alone but do not fit together: an error message and status 2, no traceback
    assert main(["plan", "--model", "small", "--workers", "6", "--nodes", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyowt plan: error: nodes must be an int >= 1 dividing workers=6, got 4"), err


def test_auto_beats_every_preset_on_vgg16_at_8_gpus():
    """The configuration that matters: VGG-16, 8 x H100 NVLink, bf16, 32 per GPU."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None)
    k = 8
    graph = capture(model, (32 * k, 3, 224, 224))
    res = search(graph, CostModel(make_cluster("h100", k, "nvlink", dtype="bf16")), k, iters=500)
    best_preset = min(p.time for p in res.presets.values())
    assert res.best.time < 0.99 * best_preset
    assert res.search_time < 5.0


def _auto_on_group(size):
    model, _ = make_model("small", 0)
    plan = auto_plan(model, input_shape=(11, 3, size, size), cache_dir=False, iters=100)
    return plan.to_json()


def test_auto_plan_on_a_live_group_is_the_same_on_every_rank(run_workers):
    plans = run_workers(2, _auto_on_group, 16, timeout=300)
    assert plans[0] == plans[1]
    plan = Plan.from_json(plans[0])
    validate_plan(plan, make_model("small", 0)[0])


def _auto_hybrid_on_group():
    """K = 4: the search measures collectives on groups of 2 as well, and whatever plan it
    picks (hybrid or not) runs under parallelize."""
    import torch.distributed as dist

    from pyowt.parallel import parallelize

    model, size = make_model("small", 0)
    costs = []
    import pyowt.planner.auto as auto_mod

    real = auto_mod.search

    def spy(graph, cost, k, *a, **kw):
        costs.append(cost)
        return real(graph, cost, k, *a, **kw)

    auto_mod.search = spy
    try:
        pmodel = parallelize(model, "auto", input_shape=(11, 3, size, size))
    finally:
        auto_mod.search = real
    assert sorted(costs[0].comm_fit_by_size) == [2], costs[0].comm_fit_by_size
    assert set(costs[0].comm_fit_by_size[2]) == {"all_reduce", "all_gather", "reduce_scatter"}
    x, y = torch.randn(11, 3, size, size), torch.randint(0, 10, (11,))
    xl, yl = pmodel.local_batch(x, y)
    pmodel.loss(pmodel(xl), yl).backward()
    dist.barrier()
    return pmodel.plan.to_json()


def test_auto_plan_measures_subgroups_for_hybrids(run_workers):
    plans = run_workers(4, _auto_hybrid_on_group, timeout=300)
    assert len(set(plans)) == 1
