"""The simulator on hand-computed task graphs and a tiny model with a hand-computed cost."""

import pytest
import torch
from torch import nn

from pyowt.parallel.plan import make_plan
from pyowt.planner.capture import capture
from pyowt.planner.costs import CostModel
from pyowt.planner.simulator import COMM, COMPUTE, Simulator, Task, simulate
from pyowt.planner.specs import ClusterSpec, DeviceSpec, LinkSpec
from pyowt.planner.tasks import chain_tasks


def _diamond():
    # A (compute 2) -> B (comm 3) -> D (compute 1); A -> C (compute 1), independent of B.
    return [Task("A", COMPUTE, 2.0), Task("B", COMM, 3.0, (0,)), Task("C", COMPUTE, 1.0, (0,)),
            Task("D", COMPUTE, 1.0, (1,))]


def test_overlap_hides_communication_behind_independent_compute():
    res = simulate(_diamond())
    # A 0-2; B 2-5 on the comm stream while C runs 2-3; D waits for B: 5-6.
    assert res.timeline() == [("A", COMPUTE, 0.0, 2.0), ("B", COMM, 2.0, 5.0), ("C", COMPUTE, 2.0, 3.0),
                              ("D", COMPUTE, 5.0, 6.0)]
    assert res.time == 6.0


def test_without_overlap_the_step_is_the_sum_of_durations():
    res = simulate(_diamond(), overlap=False)
    assert res.time == 7.0
    assert [s for _, _, s, _ in res.timeline()] == [0.0, 2.0, 5.0, 6.0]


def test_streams_are_fifo_in_issue_order():
    # The second comm task is ready at 0 but queues behind the first (ready at 1, 4 long).
    tasks = [Task("c", COMPUTE, 1.0), Task("x", COMM, 4.0, (0,)), Task("y", COMM, 1.0)]
    assert simulate(tasks).timeline()[2] == ("y", COMM, 5.0, 6.0)


def test_collectives_synchronize_devices():
    lane0 = [Task("f", COMPUTE, 1.0), Task("ar", COMM, 2.0, (0,)), Task("g", COMPUTE, 1.0, (1,))]
    lane1 = [Task("f", COMPUTE, 3.0), Task("ar", COMM, 2.0, (0,)), Task("g", COMPUTE, 0.5, (1,))]
    res = simulate([lane0, lane1])
    assert res.starts[0][1] == res.starts[1][1] == 3.0  # waits for the slower device
    assert res.ends[0][2] == 6.0 and res.ends[1][2] == 5.5
    assert res.time == 6.0


def test_bad_tasks_are_refused():
    with pytest.raises(ValueError, match="earlier tasks"):
        simulate([Task("a", COMPUTE, 1.0, (0,))])
    with pytest.raises(ValueError, match="stream"):
        simulate([Task("a", "gpu", 1.0)])


def test_incremental_resimulation_equals_full_and_reschedules_only_the_suffix():
    tasks = [Task(f"t{i}", COMPUTE if i % 3 else COMM, 1.0 + i % 4, (i - 1,) if i else ()) for i in range(30)]
    sim = Simulator()
    sim.run(tasks)
    changed = list(tasks)
    changed[20] = Task("t20", COMPUTE, 9.0, (19,))
    res = sim.run(changed)
    full = simulate(changed)
    assert res.starts == full.starts and res.ends == full.ends and res.time == full.time
    assert sim.rescheduled == 30 + 10


def _toy_cost(k):
    # 1 MFLOP/s, no memory term, no kernel overhead; a link with 1 ms latency and 1 MB/s.
    dev = DeviceSpec("toy", {"fp32": 1e6}, mem_bw=1e30, memory=1e12, eff=1.0, eff_bw=1.0, overhead=0.0)
    return CostModel(ClusterSpec(dev, k, LinkSpec("toy", 1e-3, 1e6)))


def test_data_parallel_step_of_a_two_layer_mlp_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    k, batch = 2, 4
    graph = capture(model, (batch, 4))
    st = chain_tasks(graph, make_plan(model, "data"), _toy_cost(k), k)
    b = batch // k
    f1, f2 = 2 * b * 4 * 6, 2 * b * 6 * 2       # forward FLOPs (ReLU fused into the first)
    bwd1, bwd2 = f1, 2 * f2                      # no input gradient for the first layer
    loss_f, loss_b = 4 * b * 2, 2 * b * 2        # cross-entropy on (b, 2) logits
    ar = lambda nbytes: 2 * (k - 1) * (1e-3 + nbytes / k / 1e6)  # ring all-reduce
    params = 4 * 6 + 6 + 6 * 2 + 2
    opt = 2 * params
    names = [t.name for t in st.tasks]
    assert names == ["fwd 0", "fwd 2", "fwd loss", "all_reduce loss", "bwd loss", "bwd 2", "bwd 0",
                     "grad all_reduce bucket 0", "optimizer"]
    expected = [f1, f2, loss_f, None, loss_b, bwd2, bwd1, None, opt]
    for t, e in zip(st.tasks, expected):
        if e is not None:
            assert t.duration == pytest.approx(e / 1e6, rel=1e-12), t.name
    assert st.tasks[3].duration == pytest.approx(ar(4))
    assert st.tasks[7].duration == pytest.approx(ar(4 * params))
    # Nothing can overlap the one bucket (it closes with the last gradient): the step is serial.
    total = (f1 + f2 + loss_f + loss_b + bwd2 + bwd1 + opt) / 1e6 + ar(4) + ar(4 * params)
    assert simulate(st.tasks).time == pytest.approx(total, rel=1e-12)
    # Memory: parameters, gradients and momentum, plus the activations of this rank's rows.
    acts = b * 4 + b * 6 + b * 2 + b
    assert st.memory == 4 * (3 * params + acts) + 4 * params
