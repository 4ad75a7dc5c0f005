"""Ctrl-C during `pyowt train`: every rank stops after the same step, a checkpoint is written,
the resumed run continues bit-identically; a second Ctrl-C quits at once; SIGTERM does the
same with --checkpoint-on-sigterm."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyowt.train import interrupt
from pyowt.train.checkpoint import list_checkpoints
from pyowt.train.interrupt import StopRequest, TrainingInterrupted

from ._helpers import make_folder, run_config, small_config
from .test_resume import CLI_FLAGS, REPO

MODEL = "tests.train._helpers:small_model_that_interrupts"


def _cli(workers, *extra):
    flags = list(CLI_FLAGS)
    flags[flags.index("--model") + 1] = MODEL
    return [sys.executable, "-m", "pyowt.train.cli", "--workers", str(workers), *flags, *extra]


def _run(argv, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOWT_TEST_SIGINT")}
    env.update(env_extra or {})
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def _history(path):
    with open(path) as f:
        return json.load(f)["history"]


@pytest.mark.parametrize("signalled_rank", [0, 1])
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step_and_resumes_exactly(
        run_workers, tmp_path, signalled_rank):
    reference = run_workers(2, run_config, small_config())[0]["history"]["loss"]
    ck = tmp_path / "ck"
    # A SIGINT to one worker only, during step 10: that rank's flag travels with the next
    # polling step's reduction (steps are ~20 ms here, polls ~0.25 s apart), and both ranks
    # stop after that step. A rank stopping alone would leave the other in a collective.
    stopped = _run(_cli(2, "--checkpoint-dir", str(ck), "--progress", "none"),
                   {"PYOWT_TEST_SIGINT_AT": "10", "PYOWT_TEST_SIGINT_RANK": str(signalled_rank)})
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 130, out
    assert "Traceback" not in out and "failed" not in out, out
    saved = [s for s, _ in list_checkpoints(str(ck))]
    assert len(saved) == 1 and 10 <= saved[0] < len(reference), (saved, out)
    step = saved[0]
    assert (f"pyowt train: interrupted after global step {step}; checkpoint written to "
            f"{ck / f'step_{step:08d}.pt'} (continue with --resume)") in stopped.stderr, out
    assert _history(ck / "results.json")["loss"] == reference[:step]

    resumed = _run(_cli(2, "--checkpoint-dir", str(ck), "--resume", "--progress", "none"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"global step {step}" in resumed.stdout
    assert _history(ck / "results.json")["loss"] == reference  # bit-exact across the interruption


def test_ctrl_c_at_an_epochs_last_step_resumes_with_that_epochs_validation(run_workers, tmp_path):
    reference = run_workers(1, run_config, small_config())[0]["history"]
    steps_per_epoch = len(reference["loss"]) // 2
    ck = tmp_path / "ck"
    # One process: no other rank to agree with, so it stops after the step it was signalled in.
    stopped = _run(_cli(1, "--checkpoint-dir", str(ck), "--progress", "none"),
                   {"PYOWT_TEST_SIGINT_AT": str(steps_per_epoch)})
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert f"interrupted after global step {steps_per_epoch};" in stopped.stderr
    assert _history(ck / "results.json")["epochs"] == []  # stopped before the epoch's validation

    resumed = _run(_cli(1, "--checkpoint-dir", str(ck), "--resume", "--progress", "none"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    history = _history(ck / "results.json")
    assert history["loss"] == reference["loss"]
    keys = ("epoch", "global_step", "train_loss", "val_loss", "val_acc", "val_samples")
    assert [{k: e[k] for k in keys} for e in history["epochs"]] == \
        [{k: e[k] for k in keys} for e in reference["epochs"]]


def test_a_terminals_ctrl_c_during_validation_with_loader_processes(tmp_path):
    # The whole process group gets it, the DataLoader's worker processes included, while
    # the first validation has most of its batches still to load (2 images each, 4 prefetched).
    root = make_folder(str(tmp_path / "imgs"), per_class=12)  # 12 train / 12 val images
    ck = tmp_path / "ck"
    argv = _cli(1, "--checkpoint-dir", str(ck), "--progress", "none", "--val-batch-size", "2")
    argv[argv.index("--data") + 1] = root
    argv[argv.index("--loader-workers") + 1] = "1"
    argv[argv.index("--batch-size") + 1] = "4"
    stopped = _run(argv, {"PYOWT_TEST_SIGINT_AT": "1", "PYOWT_TEST_SIGINT_IN": "val",
                          "PYOWT_TEST_SIGINT_GROUP": "1"})
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 130, out
    assert "Traceback" not in out, out
    # One announcement: the loader processes (forked from the trainer) do not act on it.
    assert stopped.stderr.count("Ctrl-C: finishing this step") == 1, out
    # The validation finished, its epoch-end checkpoint was written, and the run stopped
    # after the next step.
    assert len(_history(ck / "results.json")["epochs"]) == 1
    assert "interrupted after global step 4; checkpoint written to" in stopped.stderr, out
    assert [s for s, _ in list_checkpoints(str(ck))] == [3, 4]


def test_sigterm_with_checkpoint_on_sigterm_checkpoints_and_exits_143(tmp_path):
    ck = tmp_path / "ck"
    # `kill <launcher pid>` during step 10: the launcher passes it on, the ranks agree.
    stopped = _run(_cli(2, "--checkpoint-dir", str(ck), "--progress", "none", "--checkpoint-on-sigterm"),
                   {"PYOWT_TEST_SIGINT_AT": "10", "PYOWT_TEST_SIGINT_SIGNAL": "SIGTERM"})
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 143, out
    assert "Traceback" not in out, out
    saved = [s for s, _ in list_checkpoints(str(ck))]
    assert len(saved) == 1 and saved[0] >= 10, (saved, out)
    assert (f"pyowt train: stopped by SIGTERM after global step {saved[0]}; checkpoint written to "
            f"{ck / f'step_{saved[0]:08d}.pt'} (continue with --resume)") in stopped.stderr, out
    assert "SIGTERM: finishing this step to write a checkpoint\n" in stopped.stderr, out


def test_sigterm_without_the_flag_ends_the_run_where_it_is(tmp_path):
    ck = tmp_path / "ck"
    stopped = _run(_cli(2, "--checkpoint-dir", str(ck), "--progress", "none"),
                   {"PYOWT_TEST_SIGINT_AT": "10", "PYOWT_TEST_SIGINT_SIGNAL": "SIGTERM"})
    assert stopped.returncode == -signal.SIGTERM, stopped.stdout + stopped.stderr
    assert list_checkpoints(str(ck)) == []


def test_stop_request_sigterm_only_when_asked(monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest():
        assert signal.getsignal(signal.SIGTERM) is before
    with StopRequest(on_sigterm=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # repeats change nothing; Ctrl-C still quits
        time.sleep(0.1)
        assert stop.poll() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert TrainingInterrupted(3, "x.pt", signal.SIGTERM).exit_status == 143


def test_stop_request_first_ctrl_c_asks_repeats_are_absorbed_a_later_one_quits(monkeypatch, capfd):
    monkeypatch.setattr(interrupt, "REPEAT_WINDOW_S", 0.3)
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(announce=True, saving=True) as stop:
        assert not stop.poll()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher's copy of the same press
        assert stop.requested and stop.poll()
        time.sleep(0.4)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode
    assert signal.getsignal(signal.SIGINT) is before
    err = capfd.readouterr().err
    assert err.count("Ctrl-C: finishing this step to write a checkpoint") == 1, err


def _steps_until_stopped(request_at_step, sleep_s, as_if_nccl):
    """A loop of ``sleep_s``-long steps polling a StopRequest; this rank asks to stop at step
    ``request_at_step[rank]`` (0: never). Returns the step at which poll() said stop.
    ``as_if_nccl``: the world's backend reads as NCCL, so the flags take their own Gloo group."""
    from unittest import mock

    import torch.distributed as dist

    rank = dist.get_rank()
    with mock.patch.object(interrupt.dist, "get_backend", return_value="nccl" if as_if_nccl else "gloo"):
        stop = StopRequest()
    assert (stop._group is not None) == as_if_nccl
    with stop:
        for step in range(1, 2000):
            time.sleep(sleep_s[rank])
            if step == request_at_step[rank]:
                stop.request()
            if stop.poll():
                return step
    return None


@pytest.mark.parametrize("as_if_nccl", [False, True])
def test_ranks_with_different_step_times_stop_at_the_same_step(run_workers, as_if_nccl):
    # Rank 1 alone asks, and is the slow one: the polling schedule follows the slowest rank.
    got = run_workers(2, _steps_until_stopped, (0, 5), (0.001, 0.004), as_if_nccl)
    assert got[0] == got[1] and got[0] is not None and got[0] >= 5, got
    # The polls are ~POLL_PERIOD_S apart: 0.25 s of 4 ms steps is about 60 steps.
    assert got[0] <= 5 + interrupt.MAX_POLL_INTERVAL, got


def test_training_interrupted_message():
    assert TrainingInterrupted(7, None).describe() == \
        "pyowt train: interrupted after global step 7; nothing saved (no --checkpoint-dir)"


def _interrupted_with_results_unwritable(cfg, folder):
    os.environ["PYOWT_TEST_SIGINT_AT"] = "5"  # this pool worker's own SIGINT, during step 5
    try:
        from .test_cli import _folder_replaced_by_a_file
        return _folder_replaced_by_a_file(cfg, folder)
    finally:
        del os.environ["PYOWT_TEST_SIGINT_AT"]


def test_interrupted_run_whose_results_cannot_be_written_stops_every_rank_with_a_message(run_workers, tmp_path):
    # Rank 0 writes the results so far when a Ctrl-C stops the run; when that fails (the
    # folder became a file), every rank reports the same error, which still names the step
    # the run stopped after and its checkpoint (was: rank 0 alone raised the JSON error).
    out_dir, ck = str(tmp_path / "out"), str(tmp_path / "ck")
    cfg = small_config(model=MODEL, json=os.path.join(out_dir, "r.json"), checkpoint_dir=ck)
    outs = run_workers(2, _interrupted_with_results_unwritable, cfg, out_dir)
    assert outs[0] == outs[1] and set(outs[0]) == {"user_error"}, outs
    (step, path), = list_checkpoints(ck)
    assert step >= 5
    assert outs[0]["user_error"] == (
        f"--json: could not write {out_dir}/r.json (File exists); the run was interrupted after global "
        f"step {step}; checkpoint written to {path} (continue with --resume)")


def test_ctrl_c_during_the_last_validation_lets_the_run_finish_and_says_so(tmp_path):
    # Training is over when the final validation runs: there is no step left to stop after,
    # so the run completes (status 0, every result written) and says why it did not stop.
    ck = tmp_path / "ck"
    done = _run(_cli(1, "--checkpoint-dir", str(ck), "--progress", "none", "--epochs", "1"),
                {"PYOWT_TEST_SIGINT_AT": "1", "PYOWT_TEST_SIGINT_IN": "val"})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Ctrl-C: finishing this step" in done.stderr, out
    steps = _history(ck / "results.json")["epochs"][0]["global_step"]
    assert (f"pyowt train: the stop request came after the last training step (global step {steps}); "
            f"the run finishes as usual") in done.stderr, out
    assert "interrupted" not in out, out
