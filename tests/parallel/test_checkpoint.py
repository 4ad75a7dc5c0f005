"""Checkpoints independent of K: save at one K, load at another, bit-exactly."""
import os

import pytest
import torch
import torch.distributed as dist

from pyowt.parallel import (full_optimizer_state_dict, full_state_dict, load_full_optimizer_state_dict,
                            load_full_state_dict, parallelize)

from ._models import global_batch, make_model


def _train(pmodel, opt, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        x, y = global_batch(step, 11, 16)
        xl, yl = pmodel.local_batch(x, y)
        loss = pmodel.loss(pmodel(xl), yl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _save(preset, path, **options):
    model, _ = make_model("small", 0)
    pmodel = parallelize(model, preset, **options)
    opt = torch.optim.SGD(pmodel.parameters(), lr=0.05, momentum=0.9)
    _train(pmodel, opt, 2)
    state, optim = full_state_dict(pmodel), full_optimizer_state_dict(pmodel, opt)
    if dist.get_rank() == 0:
        torch.save({"model": state, "optim": optim, "steps": pmodel._steps}, path)
    dist.barrier()
    # The run continued without interruption, for comparison.
    return _train(pmodel, opt, 2, start=2), {k: v.clone() for k, v in full_state_dict(pmodel).items()}


def _load(preset, path, **options):
    ckpt = torch.load(path, weights_only=True)
    model, _ = make_model("small", 123)  # different init: everything must come from the file
    model.load_state_dict(ckpt["model"])  # the full state dict loads into the original model
    pmodel = parallelize(make_model("small", 7)[0], preset, **options)
    load_full_state_dict(pmodel, ckpt["model"])
    for name, value in full_state_dict(pmodel).items():
        assert torch.equal(value, ckpt["model"][name]), f"{name} did not round-trip"
    opt = torch.optim.SGD(pmodel.parameters(), lr=0.05, momentum=0.9)
    load_full_optimizer_state_dict(pmodel, opt, ckpt["optim"])
    again = full_optimizer_state_dict(pmodel, opt)
    for name, s in ckpt["optim"]["state"].items():
        assert torch.equal(again["state"][name]["momentum_buffer"], s["momentum_buffer"]), name
    pmodel._steps = ckpt["steps"]  # dropout masks continue from the saved step
    return _train(pmodel, opt, 2, start=2), full_state_dict(pmodel)


@pytest.mark.parametrize("preset", ["model", "owt"])
def test_save_at_k2_resume_at_k3_and_k1(run_workers, tmp_path, preset):
    path = os.path.join(tmp_path, "ckpt.pt")
    (cont_losses, cont_params), _ = run_workers(2, _save, preset, path)
    for k in (3, 1):
        losses, params = run_workers(k, _load, preset, path)[0]
        # Resumed training continues like the uninterrupted run, to fp32 rounding (the
        # reductions run over different splits).
        for a, b in zip(losses, cont_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (k, losses, cont_losses)
        for name, value in params.items():
            torch.testing.assert_close(value, cont_params[name], rtol=1e-4, atol=1e-6)


def test_hybrid_save_at_k4_resume_at_k2_and_k4_split_2(run_workers, tmp_path):
    """owt with the head split 2 ways over 2 groups (K = 4): the checkpoint is the plain
    model's; it resumes under plain owt at K = 2 and under the same hybrid."""
    path = os.path.join(tmp_path, "ckpt.pt")
    (cont_losses, cont_params), *_ = run_workers(4, _save, "owt", path, split_degree=2)
    for k, options in ((2, {}), (4, {"split_degree": 2})):
        losses, params = run_workers(k, _load, "owt", path, **options)[0]
        for a, b in zip(losses, cont_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (k, options, losses, cont_losses)
        for name, value in params.items():
            torch.testing.assert_close(value, cont_params[name], rtol=1e-4, atol=1e-6)


def _bad_state_dict():
    pmodel = parallelize(make_model("small", 0)[0], "owt")
    state = full_state_dict(pmodel)
    state["classifier.1.weight"] = state["classifier.1.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"state_dict\['classifier.1.weight'\] has shape"):
        load_full_state_dict(pmodel, state)
    del state["classifier.1.weight"]
    with pytest.raises(ValueError, match="missing \\['classifier.1.weight'\\]"):
        load_full_state_dict(pmodel, state)
    return True


def test_bad_state_dict_errors(run_workers):
    assert run_workers(2, _bad_state_dict) == [True, True]
