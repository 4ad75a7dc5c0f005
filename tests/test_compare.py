"""``pyowt compare`` (the README's main job, ``make demo``): every strategy on Gloo workers
against the single-process run, and its refusals of bad arguments before anything runs."""
import pytest

from pyowt import cli
from pyowt import compare as compare_mod


@pytest.mark.parametrize("argv,message", [
    (["--steps", "1"], "--steps: must be >= 2 (the first is a warm-up), got 1"),
    (["--workers", "0"], "--workers: must be >= 1, got 0"),
    (["--batch-size", "1"], "--batch-size: must be at least the number of workers (2), got 1"),
    (["--size", "5"], "--size: must be >= 8 for the 8x8 digits, got 5"),
    (["--lr", "0"], "--lr: must be > 0, got 0.0"),
    (["--strategies", "data,bogus"], "--strategies: 'bogus': plan must be a Plan, one of"),
    (["--strategies", " , "], "--strategies: name at least one strategy"),
    (["--strategies", "missing_plan.json"], "--strategies: 'missing_plan.json': [Errno 2] No such file"),
    (["--model", "alexnet", "--data", "synthetic", "--size", "32"],
     "--size: model 'alexnet' cannot run on 32x32 images"),
])
def test_cli_refuses_bad_arguments_before_running(monkeypatch, capsys, argv, message):
    def no_run(*args, **kwargs):
        raise AssertionError("a worker or the reference run started")

    monkeypatch.setattr(compare_mod, "spawn", no_run)
    monkeypatch.setattr(compare_mod, "_single_process", no_run)
    assert cli.main(["compare", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyowt compare: error: ") and message in err, err


def test_compare_api_refuses_with_the_parameter_name():
    with pytest.raises(compare_mod.CompareArgumentError, match="steps: must be >= 2") as info:
        compare_mod.compare(steps=0, out=lambda *a: None)
    assert info.value.param == "steps" and isinstance(info.value, ValueError)


def test_compare_runs_every_strategy_like_one_process(tmp_path):
    lines = []
    results = compare_mod.compare(model="small", strategies=["data", "owt"], workers=2, steps=3, batch=8,
                                  size=16, json_path=str(tmp_path / "c.json"), out=lines.append)
    assert [r.strategy for r in results][0] == "single" and len(results) == 3
    assert results[1].strategy == "data" and results[2].strategy.startswith("owt")
    for r in results[1:]:
        assert r.workers == 2 and len(r.losses) == 3 and r.comm_bytes_per_iter > 0
        assert r.max_loss_diff < 1e-4, (r.strategy, r.max_loss_diff)
        assert r.steps_agreeing == 3
    assert (tmp_path / "c.json").exists() and any("results written to" in line for line in lines)


def test_leading_steps_within_tolerance():
    assert compare_mod._leading_within([1.0, 2.0, 3.0], [1.0, 2.00005, 3.5], 1e-4) == 2
    assert compare_mod._leading_within([1.0, 2.0], [1.0, 2.0], 1e-4) == 2
    assert compare_mod._leading_within([1.0], [1.1], 1e-4) == 0


def test_cli_interrupted_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_mod, "compare", interrupted)
    assert cli.main(["compare"]) == 130
    assert capsys.readouterr().err == "pyowt compare: interrupted\n"
