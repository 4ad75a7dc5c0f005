"""Figures, results JSON, progress output and the learning-rate schedule."""
from __future__ import annotations

import io
import json
import math

import pytest
from PIL import Image

from pyowt import plots
from pyowt.train.config import TrainConfig
from pyowt.train.loop import learning_rate
from pyowt.train.progress import Progress
from pyowt.train.results import write_results

pytest.importorskip("matplotlib")


def _is_png(path, min_w=800, min_h=300):
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert w >= min_w and h >= min_h, (w, h)


def test_compare_figure(tmp_path):
    data = {"model": "small", "data": "digits", "batch": 64, "workers": 2, "steps": 20,
            "results": [{"strategy": "single", "images_per_s": 100.0, "comm_bytes_per_iter": 0},
                        {"strategy": "data", "images_per_s": 180.0, "comm_bytes_per_iter": 3_735_000},
                        {"strategy": "owt(a)", "images_per_s": 190.0, "comm_bytes_per_iter": 1_090_000}]}
    _is_png(plots.plot_compare(data, str(tmp_path / "c.png")))


def test_scaling_figure_and_bad_input(tmp_path):
    res = {s: {d: t / d ** e for d in (1, 2, 4, 8, 16, 32, 64)}
           for s, t, e in (("data", 0.1, 0.7), ("model", 0.12, 0.4), ("owt", 0.1, 0.85))}
    _is_png(plots.plot_scaling(res, str(tmp_path / "s.png")))
    back = plots.scaling_from_json(json.loads(json.dumps(res)))
    assert back == {s: {int(d): t for d, t in v.items()} for s, v in res.items()}
    with pytest.raises(ValueError, match="positive finite times"):
        plots.plot_scaling({"data": {1: 0.0}}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="empty"):
        plots.plot_scaling({}, str(tmp_path / "x.png"))


def test_training_results_json_and_figure(tmp_path):
    hist = {"loss": [2.3 * math.exp(-i / 30) for i in range(120)], "lr": [1e-3] * 120,
            "epochs": [{"epoch": e, "global_step": 40 * e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
                        "val_acc": 0.5 + 0.1 * e, "images_per_s": float("nan") if e == 2 else 900.0}
                       for e in (1, 2, 3)]}
    results = {"config": TrainConfig().to_dict(), "meta": {"plan": "owt(a)", "world_size": 2, "device": "cpu"},
               "history": hist}
    js, png = write_results(results, str(tmp_path / "r.json"), str(tmp_path / "r.png"))
    with open(js) as f:
        back = json.load(f)  # strict JSON: the NaN became null
    assert back["history"]["epochs"][1]["images_per_s"] is None
    assert back["history"]["loss"] == hist["loss"]
    _is_png(png)


def test_progress_lines_and_bar():
    out = io.StringIO()
    p = Progress(total_steps=20, steps_per_epoch=10, epochs=2, batch_size=8, mode="lines", every=5, stream=out)
    p.start(0)
    for s in range(1, 11):
        p.step(0, s, s, 2.5 - 0.1 * s)
    p.message("epoch 1/2: done")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1] == "epoch 1/2: done"
    assert lines[0].startswith("epoch 1/2  step 5/10  (global 5/20)  loss 2.0000")
    assert "img/s" in lines[1] and "ETA" in lines[1]
    bar = io.StringIO()
    p = Progress(total_steps=10, steps_per_epoch=10, epochs=1, batch_size=8, mode="bar", stream=bar)
    p.start(0)
    p.step(0, 10, 10, 0.5)
    assert bar.getvalue().startswith("\repoch 1/1 [########################] 10/10  loss 0.5000")
    quiet = io.StringIO()
    p = Progress(10, 10, 1, 8, enabled=False, stream=quiet)
    p.start(0)
    p.step(0, 10, 10, 0.5)
    p.message("x")
    assert quiet.getvalue() == ""


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(lr=0.1, warmup_epochs=1.0)
    lrs = [learning_rate(cfg, s, total_steps=100, steps_per_epoch=10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3
    cfg.lr_schedule = "constant"
    assert learning_rate(cfg, 50, 100, 10) == 0.1
