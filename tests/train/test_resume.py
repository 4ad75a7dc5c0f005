"""Checkpoints and resume: a SIGKILLed run resumed is bit-identical; other K; plain state_dicts."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import torch.nn.functional as F

from pyowt.train.checkpoint import list_checkpoints
from pyowt.train.models import build_model

from ._helpers import run_config, small_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The same run as small_config(), on the command line.
CLI_FLAGS = ["--model", "small", "--strategy", "owt", "--data", "digits", "--epochs", "2", "--batch-size", "32",
             "--image-size", "16", "--val-fraction", "0.5", "--seed", "3", "--loader-workers", "0",
             "--warmup-epochs", "0.2", "--threads", "1"]


def _cli(*extra):
    return [sys.executable, "-m", "pyowt.train.cli", "--workers", "2", *CLI_FLAGS, *extra]


def test_sigkill_mid_run_then_resume_reproduces_the_loss_curve_exactly(run_workers, tmp_path):
    reference = run_workers(2, run_config, small_config())[0]["history"]["loss"]
    total = len(reference)
    assert total == 2 * (899 // 32)
    ckdir = str(tmp_path / "ck")
    # The run is killed with SIGKILL (its whole process group: the launcher and both workers)
    # once it reports step 10: no chance to clean up or write anything on the way out.
    proc = subprocess.Popen(_cli("--checkpoint-dir", ckdir, "--checkpoint-every", "4", "--progress", "lines",
                                 "--log-every", "1"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if f"(global 10/{total})" in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    done = [step for step, _ in list_checkpoints(ckdir)]
    assert done and 8 <= done[-1] < total, (done, "".join(seen))

    resumed = subprocess.run(_cli("--checkpoint-dir", ckdir, "--resume", "auto", "--progress", "none",
                                  "--json", str(tmp_path / "r.json")),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"global step {done[-1]}" in resumed.stdout, resumed.stdout
    import json

    with open(tmp_path / "r.json") as f:
        losses = json.load(f)["history"]["loss"]
    assert losses == reference  # bit-exact, every step before and after the kill
    assert os.path.isfile(tmp_path / "r.png")


def test_resume_at_another_k_continues_to_fp32_rounding(run_workers, tmp_path):
    ckdir = tmp_path / "ck"
    full = run_workers(2, run_config, small_config(epochs=1, checkpoint_dir=str(ckdir), checkpoint_every=20,
                                                   keep_checkpoints=0))[0]
    ref = full["history"]["loss"]
    path = ckdir / "step_00000020.pt"
    ckpt = torch.load(path, weights_only=True)  # nothing but tensors and plain containers
    assert ckpt["progress"]["global_step"] == 20 and ckpt["progress"]["batch_in_epoch"] == 20
    # The model part is the plain single-process state_dict.
    plain = build_model("small", 10, 1, seed=0)
    plain.load_state_dict(ckpt["model"])
    for _, p in list_checkpoints(str(ckdir)):
        torch.load(p, weights_only=True)
    for k in (3,):  # an uneven split of the batch and of the head
        res = run_workers(k, run_config, small_config(epochs=1, resume=str(path)))[0]
        losses = res["history"]["loss"]
        assert len(losses) == len(ref) and losses[:20] == ref[:20]
        for i in range(20, len(ref)):
            assert abs(losses[i] - ref[i]) <= 1e-5 * abs(ref[i]), (k, i, losses[20:], ref[20:])
        assert res["meta"]["world_size"] == k


def test_plain_state_dict_seeds_the_run(run_workers, tmp_path):
    from pyowt.data import digits_dataset

    model = build_model("small", 10, 1, seed=123)
    model.eval()
    with torch.no_grad():  # confident, so its loss is far from a fresh model's ln(10)
        model.classifier[-1].weight.mul_(30.0)
        model.classifier[-1].bias.copy_(torch.linspace(-1.0, 1.0, 10))
    path = tmp_path / "plain.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)  # as DDP saves it
    cfg = small_config(epochs=0, evaluate=True, init_state_dict=str(path))
    got = run_workers(2, run_config, cfg)[0]["history"]["evaluation"]
    _, val = digits_dataset(size=16, val_fraction=0.5, seed=3)
    x, y = val.tensors
    with torch.no_grad():
        logits = model(x)
    ref_loss = F.cross_entropy(logits, y).item()
    ref_acc = (logits.argmax(1) == y).double().mean().item()
    assert abs(got["val_loss"] - ref_loss) <= 1e-5 * ref_loss
    assert abs(got["val_acc"] - ref_acc) <= 1.0 / len(y)
    # Without it the run starts from its own initialization, which evaluates differently.
    fresh = run_workers(2, run_config, small_config(epochs=0, evaluate=True))[0]["history"]["evaluation"]
    assert abs(fresh["val_loss"] - ref_loss) > 0.1, (fresh, ref_loss)
