"""Bad input: a clear message, exit status 2, no traceback; checkpoints cannot run code."""
from __future__ import annotations

import os
import pytest
import torch

from pyowt.train import cli
from pyowt.train.checkpoint import load_checkpoint, load_plain_state_dict
from pyowt.train.errors import UserError

from ._helpers import make_folder, small_config


def _empty_class(tmp_path):
    root = make_folder(str(tmp_path / "imgs"), per_class=1)
    os.makedirs(os.path.join(root, "zebra"))
    return root


def _no_classes(tmp_path):
    (tmp_path / "flat").mkdir()
    return str(tmp_path / "flat")


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return str(path)


def _under_a_file(tmp_path):
    return os.path.join(_a_file(tmp_path), "sub")


def _json_under_a_file(tmp_path):
    return os.path.join(_a_file(tmp_path), "r.json")


def _a_folder(tmp_path):
    return str(tmp_path)


CASES = [
    (["--data", "/no/such/folder"], "is neither 'digits', 'synthetic' nor an existing folder"),
    (["--data", _empty_class], "has no image files"),
    (["--data", _no_classes], "has no class folders"),
    (["--model", "resnet9000"], "--model: unknown model 'resnet9000'"),
    (["--strategy", "fastest"], "--strategy: unknown strategy 'fastest'"),
    (["--strategy", "/no/plan.json"], "plan file '/no/plan.json' does not exist"),
    (["--workers", "4", "--batch-size", "3"], "--batch-size 3 is smaller than the 4 workers"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--momentum", "1.5"], "--momentum must be < 1"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
    (["--image-size", "4"], "--image-size must be >= 8"),
    (["--checkpoint-every", "5"], "--checkpoint-every needs --checkpoint-dir"),
    (["--checkpoint-on-sigterm"], "--checkpoint-on-sigterm needs --checkpoint-dir"),
    (["--resume", "/no/ckpt.pt"], "--resume: '/no/ckpt.pt' does not exist"),
    (["--scheme", "a", "--fc-update", "per_pass"], "--fc-update per_pass needs --scheme b or c"),
    (["--workers", "4", "--split-degree", "3"], "--split-degree must divide the 4 workers, got 3"),
    (["--strategy", "data", "--split-degree", "2"], "--split-degree applies to --strategy model or owt"),
    (["--split-degree", "0"], "--split-degree must be >= 1, got 0"),
    (["--checkpoint-dir", _under_a_file], "--checkpoint-dir: cannot write to"),
    (["--checkpoint-dir", _a_file], "--checkpoint-dir: cannot write to"),
    (["--json", _json_under_a_file], "--json: cannot write to"),
    (["--json", _a_folder], "is a folder; name the file to write"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a if isinstance(a, str) else a.__name__ for a in c[0])
                                                      for c in CASES])
def test_bad_input_exits_2_with_a_message(argv, message, tmp_path, capsys):
    argv = [a(tmp_path) if callable(a) else a for a in argv]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("pyowt train: error: ") and message in err, err
    assert "Traceback" not in err


def test_unparsable_numbers_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--epochs", "many"])
    assert e.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


def test_interrupted_says_so_in_one_line(monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_train", interrupted)
    assert cli.main(["--data", "digits"]) == 130
    assert capsys.readouterr().err == "pyowt train: interrupted\n"


def _spawned_entry(cfg):
    from dataclasses import replace

    return cli._spawned(replace(cfg))


def test_error_found_inside_the_workers_reaches_every_rank(run_workers, tmp_path):
    # A plan that passes the launcher's checks but not parallelize (it lacks most layers):
    # every rank must report the same message (none may be left waiting in a collective),
    # which the launcher prints before exiting with status 2.
    from pyowt.train.config import validate

    plan = tmp_path / "plan.json"
    plan.write_text('{"layers": {"features.0": "data"}, "name": "mine"}')
    cfg = validate(small_config(strategy=str(plan)), 2)
    outs = run_workers(2, _spawned_entry, cfg)
    assert [set(o) for o in outs] == [{"user_error"}, {"user_error"}]
    assert outs[0] == outs[1]
    assert outs[0]["user_error"].startswith(f"--strategy {plan}: plan 'mine' has no entry for layer")


def _folder_replaced_by_a_file(cfg, folder):
    import shutil

    import torch.distributed as dist

    from pyowt.train.config import validate

    cfg = validate(cfg, dist.get_world_size())  # creates the folder, writes in it: fine now
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(folder)
        open(folder, "w").close()
    dist.barrier()
    return cli._spawned(cfg)


def test_a_checkpoint_that_cannot_be_written_stops_every_rank_with_a_message(run_workers, tmp_path):
    ck = str(tmp_path / "ck")
    outs = run_workers(2, _folder_replaced_by_a_file,
                       small_config(epochs=1, checkpoint_dir=ck, checkpoint_every=4), ck)
    assert outs[0] == outs[1] and set(outs[0]) == {"user_error"}, outs
    assert outs[0]["user_error"] == (
        f"--checkpoint-dir: could not write {ck}/step_00000004.pt (File exists); the run stopped after "
        f"global step 4; the newest checkpoint is none")


def test_results_that_cannot_be_written_stop_every_rank_with_a_message(run_workers, tmp_path):
    out_dir = str(tmp_path / "out")
    outs = run_workers(2, _folder_replaced_by_a_file,
                       small_config(epochs=2, json=os.path.join(out_dir, "r.json")), out_dir)
    assert outs[0] == outs[1] and set(outs[0]) == {"user_error"}, outs
    assert outs[0]["user_error"] == f"--json: could not write {out_dir}/r.json (File exists)"


def test_without_matplotlib_no_default_figure_and_plot_is_refused(monkeypatch, tmp_path):
    import importlib.util

    from pyowt.train import config

    real = importlib.util.find_spec
    monkeypatch.setattr(config.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    cfg = config.validate(small_config(json=str(tmp_path / "r.json")), 1)
    assert cfg.plot is None  # the run still writes its JSON, and does not fail at its end
    with pytest.raises(UserError, match="--plot .*needs matplotlib"):
        config.validate(small_config(plot=str(tmp_path / "r.png")), 1)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_checkpoints_load_weights_only(tmp_path):
    marker = str(tmp_path / "code-ran")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "pyowt.train.checkpoint/1", "model": _RunsCode(marker)}, evil)
    with pytest.raises(UserError, match="not a loadable weights-only torch file"):
        load_checkpoint(str(evil))
    with pytest.raises(UserError, match="not a loadable weights-only torch file"):
        load_plain_state_dict(str(evil))
    assert not os.path.exists(marker)
    other = tmp_path / "other.pt"
    torch.save({"weights": [1, 2]}, other)
    with pytest.raises(UserError, match="is not a pyowt training checkpoint"):
        load_checkpoint(str(other))
    with pytest.raises(UserError, match="does not hold a state_dict"):
        load_plain_state_dict(str(other))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pt"):
        load_checkpoint(str(junk))


def test_register_adds_the_subcommand():
    import argparse

    p = argparse.ArgumentParser(prog="pyowt")
    sub = p.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = p.parse_args(["train", "--strategy", "data", "--workers", "3", "--resume"])
    cfg = cli.config_from_args(args)
    assert (cfg.strategy, cfg.workers, cfg.resume) == ("data", 3, "auto")
    assert args.func is cli._cmd_train
