"""Plans, presets, model capture and the errors users can cause."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

from pyowt.parallel import Plan, UnsupportedModelError, capture_chain, make_plan, parallelize
from pyowt.parallel.layout import Layout
from pyowt.parallel.program import ALL_GATHER, COPY_TO_GROUP, SPLIT, compile_plan

from ._models import make_model, small_alexnet


def test_presets_on_small_alexnet():
    model = small_alexnet()
    convs = ["features.0", "features.3", "features.6", "features.8", "features.10"]
    fcs = ["classifier.1", "classifier.4", "classifier.6"]
    assert make_plan(model, "data").layers == {n: "data" for n in convs + fcs}
    owt = make_plan(model, "owt")
    assert [owt.layers[n] for n in convs] == ["data"] * 5
    assert [owt.layers[n] for n in fcs] == ["split_out", "split_in", "split_out"]
    mp = make_plan(model, "model")
    assert [mp.layers[n] for n in convs] == ["split_out", "split_in", "split_out", "split_in", "split_out"]


def test_owt_program_has_the_papers_transitions():
    model = small_alexnet()
    prog = compile_plan(make_plan(model, "owt"), capture_chain(model))
    kinds = [(op.kind, op.grad) for op in prog.ops if op.kind in (ALL_GATHER, SPLIT, COPY_TO_GROUP)]
    # One gather of the trunk's batch (reduce-scatter backward), one copy_to_group before the
    # last column-parallel layer (its input comes from an all-reduce).
    assert kinds == [(ALL_GATHER, "reduce_scatter"), (COPY_TO_GROUP, None)]
    assert prog.input_layout == Layout.SHARD_BATCH and prog.output_layout == Layout.SHARD_CHANNEL


def test_plan_json_round_trip(tmp_path):
    plan = make_plan(small_alexnet(), "owt", scheme="c", fc_update="per_pass")
    path = tmp_path / "plan.json"
    plan.save(str(path))
    assert Plan.load(str(path)) == plan
    assert plan.name == "owt(c, per_pass)"
    hybrid = make_plan(small_alexnet(), "model", split_degree=2)
    assert Plan.from_json(hybrid.to_json()) == hybrid and hybrid.split_degree == 2
    assert hybrid.name == "model split 2"
    # Plans written before split_degree existed still load (all K).
    old = '{"layers": {"fc": "split_out"}, "scheme": "a", "fc_update": "accumulate", "name": "x", "version": 1}'
    assert Plan.from_json(old).split_degree is None


@pytest.mark.parametrize("kwargs,match", [
    ({"layers": {"a": "diagonal"}}, "config 'diagonal' is not one of"),
    ({"layers": {}, "scheme": "d"}, "scheme must be one of"),
    ({"layers": {}, "fc_update": "sometimes"}, "fc_update must be one of"),
    ({"layers": {}, "fc_update": "per_pass"}, "needs scheme 'b' or 'c'"),
    ({"layers": {}, "split_degree": 0}, "split_degree must be a positive int or None, got 0"),
    ({"layers": {}, "split_degree": "2"}, "split_degree must be a positive int or None, got '2'"),
    ({"layers": {}, "split_degree": True}, "split_degree must be a positive int or None, got True"),
])
def test_bad_plans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Plan(**kwargs)


def test_bad_plan_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json("{nope")
    with pytest.raises(ValueError, match="unknown keys"):
        Plan.from_json('{"layers": {}, "colour": "red"}')


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(UnsupportedModelError, match="layer '1' of type BatchNorm2d is not supported"):
        capture_chain(model)


def test_model_that_is_not_a_module_is_refused():
    # Before the process-group lookup: the wrong argument is named, initialized or not.
    with pytest.raises(TypeError, match="parallelize: model must be a torch.nn.Module, got int"):
        parallelize(3, "owt")


def test_branching_model_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    with pytest.raises(UnsupportedModelError, match="branch"):
        capture_chain(Residual())


def _plan_entry_errors():
    model, _ = make_model("small", 0)
    with pytest.raises(ValueError, match="has no entry for layer 'classifier.6'"):
        layers = make_plan(model, "data").layers
        del layers["classifier.6"]
        parallelize(model, Plan(layers))
    with pytest.raises(ValueError, match="entry 'features.99' is not a Conv2d/Linear"):
        parallelize(model, Plan({**make_plan(model, "data").layers, "features.99": "data"}))
    return True


def _mismatched_plans():
    model, _ = make_model("small", 0)
    preset = "owt" if dist.get_rank() == 0 else "data"
    with pytest.raises(ValueError, match="ranks hold different plans or model structures"):
        parallelize(model, preset)
    return True


def _too_many_workers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"layer '3': cannot split 3 output channels over 4 workers"):
        parallelize(model, Plan({"1": "data", "3": "split_out"}))
    return True


def test_plan_entry_errors(run_workers):
    assert run_workers(2, _plan_entry_errors) == [True, True]


def test_mismatched_plans_fail_on_every_rank(run_workers):
    assert run_workers(2, _mismatched_plans) == [True, True]


def test_more_workers_than_channels(run_workers):
    assert run_workers(4, _too_many_workers) == [True] * 4


def _hybrid_errors_and_rows():
    model, _ = make_model("small", 0)
    with pytest.raises(ValueError, match=r"split_degree must divide the 4 workers \(one of \[1, 2, 4\]\), got 3"):
        parallelize(model, "owt", split_degree=3)
    with pytest.raises(ValueError, match=r"scheme 'c' runs the head over all 4 workers; split layers in groups of fewer workers \(split_degree 2"):
        parallelize(model, "owt", scheme="c", split_degree=2)
    pmodel = parallelize(model, "model", split_degree=2)
    m = pmodel.mesh
    assert (m.k, m.d, m.s, m.row, m.col) == (4, 2, 2, dist.get_rank() // 2, dist.get_rank() % 2)
    # Batch 11: shards 3, 3, 3, 2; blocks rows 0..5 and 6..10. The model's input is
    # replicated in the split group, so each rank feeds (and labels) its group's block.
    block = [slice(0, 6), slice(0, 6), slice(6, 11), slice(6, 11)][dist.get_rank()]
    assert pmodel.batch_slice(11) == block and pmodel.label_slice(11) == block
    owt = parallelize(model, "owt", split_degree=2)
    shard = [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 11)][dist.get_rank()]
    assert owt.batch_slice(11) == shard and owt.label_slice(11) == block
    return True


def test_hybrid_errors_and_rows(run_workers):
    assert run_workers(4, _hybrid_errors_and_rows) == [True] * 4


def _batch_smaller_than_k():
    pmodel = parallelize(make_model("small", 0)[0], "data")
    with pytest.raises(ValueError, match="global batch of 2 is smaller than the 3 workers"):
        pmodel.local_batch(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    return True


def test_batch_smaller_than_workers(run_workers):
    assert run_workers(3, _batch_smaller_than_k) == [True] * 3


def test_vgg11_presets_compile():
    """torchvision's vgg11 is captured and every preset compiles into a program."""
    import torchvision

    model = torchvision.models.vgg11(weights=None, num_classes=10)
    steps = capture_chain(model)
    assert sum(s.kind == "conv" for s in steps) == 8 and sum(s.kind == "linear" for s in steps) == 3
    for preset in ("data", "model", "owt"):
        prog = compile_plan(make_plan(model, preset), steps)
        assert prog.ops
    owt = make_plan(model, "owt")
    assert [owt.layers[n] for n in ("classifier.0", "classifier.3", "classifier.6")] == ["split_out", "split_in", "split_out"]
