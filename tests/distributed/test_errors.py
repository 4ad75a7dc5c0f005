"""Bad input raises ValueError/TypeError naming the value; ranks that disagree on shape all
raise, promptly, instead of hanging; init() is idempotent and works unlaunched."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import pyowt.distributed as pd


def _expect(exc, pattern, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as err:
        assert re.search(pattern, str(err)), f"{exc.__name__} message {str(err)!r} lacks {pattern!r}"
        return str(err)
    raise AssertionError(f"{fn.__name__}{args} did not raise {exc.__name__}")


def _local_errors():
    """Errors found before any communication (identical on every rank, so nobody hangs)."""
    k = dist.get_world_size()
    x = torch.randn(4, 3)
    msgs = [
        _expect(ValueError, r"dim must be in \[-2, 1\].*got 2", pd.all_gather, x, 2),
        _expect(ValueError, r"dim must be in.*got -3", pd.reduce_scatter, x, -3),
        _expect(ValueError, r"dim must be in.*got 5", pd.split, x, 5),
        _expect(ValueError, r"0-d", pd.split, torch.tensor(1.0), 0),
        _expect(TypeError, r"dim must be an int, got float", pd.all_gather, x, 0.0),
        _expect(ValueError, r"grad must be one of .*got 'sum'", pd.all_gather, x, 0, None, "sum"),
        _expect(TypeError, r"backend 'gloo' cannot sum-reduce dtype torch.complex64", pd.all_reduce, torch.randn(3, dtype=torch.complex64)),
        _expect(TypeError, r"backend 'gloo' cannot sum-reduce dtype torch.bool", pd.reduce_scatter,
                torch.ones(2 * k, dtype=torch.bool)),
        _expect(TypeError, r"dtype torch.complex64", pd.reduce_to, torch.ones(2, dtype=torch.complex64), 0),
        _expect(TypeError, r"x must be a torch.Tensor, got list", pd.all_reduce, [1.0]),
        _expect(ValueError, rf"src must be a rank in the group, 0..{k - 1}, got {k}", pd.broadcast, x, k),
        _expect(ValueError, r"dst must be a rank in the group.*got -1", pd.reduce_to, x, -1),
        _expect(TypeError, r"group must be None, a torch.distributed.ProcessGroup or a 1-D DeviceMesh, got list",
                pd.all_reduce, x, [0, 1]),
        _expect(ValueError, rf"sizes must be {k} non-negative ints", pd.all_gather, x, 0, sizes=[4]),
        _expect(ValueError, r"sizes\[\d\] = 5 but this rank's x has 4", pd.all_gather, x, 0,
                sizes=[5] * k),
        _expect(ValueError, r"shape check mode must be one of .*got 'sometimes'", pd.set_shape_check, "sometimes"),
    ]
    from torch.distributed.device_mesh import init_device_mesh

    mesh2d = init_device_mesh("cpu", (1, k))
    msgs.append(_expect(ValueError, r"only a 1-D DeviceMesh.*2-D", pd.all_reduce, x, mesh2d))
    # Gradients of integer data never flow, so moving them is fine; summing bools is not.
    labels = pd.broadcast(torch.arange(4) * (dist.get_rank() == 0), 0)
    assert labels.tolist() == [0, 1, 2, 3]
    return msgs


def test_bad_input_raises_naming_the_value(run_workers):
    results = run_workers(2, _local_errors)
    assert results[0] and all(m for m in results[0])


def _mismatch(case):
    """Ranks deliberately disagree; every rank must raise ValueError (returns the message)."""
    r = dist.get_rank()
    old = pd.set_shape_check("always" if case.endswith("always") else "auto")
    t0 = time.monotonic()
    try:
        if case == "gather other dim":
            x = torch.randn(2, 3 + r)
            fn = lambda: pd.all_gather(x, 0)  # noqa: E731
        elif case == "gather dtype":
            x = torch.randn(2, 3, dtype=torch.float32 if r == 0 else torch.bfloat16)
            fn = lambda: pd.all_gather(x, 0)  # noqa: E731
        elif case == "gather sizes always":
            # Each rank's own entry is right, the others' are wrong: only the exchange knows.
            x = torch.randn(2 + r, 3)
            sizes = [2] * dist.get_world_size()
            sizes[r] = 2 + r
            msg = _expect(ValueError, re.escape(f"sizes={sizes} but the ranks hold [2, 3, 4]"),
                          pd.all_gather, x, 0, sizes=sizes)
            return msg, time.monotonic() - t0
        elif case == "all_reduce always":
            x = torch.randn(4 + r)
            fn = lambda: pd.all_reduce(x)  # noqa: E731
        elif case == "reduce_scatter always":
            x = torch.randn(6, 2 + r)
            fn = lambda: pd.reduce_scatter(x, 0)  # noqa: E731
        elif case == "broadcast always":
            x = torch.randn(3 if r else 4)
            fn = lambda: pd.broadcast(x, 0)  # noqa: E731
        elif case == "different collectives always":
            x = torch.randn(4)
            fn = (lambda: pd.all_reduce(x)) if r == 0 else (lambda: pd.broadcast(x, 0))  # noqa: E731
        msg = _expect(ValueError, r"ranks disagree", fn)
        assert f"rank {r}:" in msg, msg
        return msg, time.monotonic() - t0
    finally:
        pd.set_shape_check(old)


@pytest.mark.parametrize("case", ["gather other dim", "gather dtype", "all_reduce always",
                                  "reduce_scatter always", "broadcast always",
                                  "different collectives always"])
def test_shape_mismatch_errors_on_every_rank(run_workers, case):
    results = run_workers(3, _mismatch, case, timeout=60)
    assert len(results) == 3
    for msg, seconds in results:
        assert "ranks disagree" in msg and seconds < 10, (msg, seconds)


def test_given_sizes_are_checked_against_the_ranks(run_workers):
    results = run_workers(3, _mismatch, "gather sizes always", timeout=60)
    assert [msg.split(" but ")[0].strip() for msg, _ in results] == [
        "pyowt.distributed.all_gather: sizes=[2, 2, 2]", "pyowt.distributed.all_gather: sizes=[2, 3, 2]",
        "pyowt.distributed.all_gather: sizes=[2, 2, 4]"]


def _init_is_noop():
    before = dist.group.WORLD
    pd.init()
    assert dist.group.WORLD is before and pd.get_world_size() == dist.get_world_size()
    return pd.get_backend()


def test_init_keeps_an_existing_group(run_workers):
    assert run_workers(2, _init_is_noop) == ["gloo", "gloo"]


def test_init_without_launcher_makes_a_group_of_one():
    code = (
        "import datetime, torch, pyowt.distributed as pd\n"
        "pd.init(timeout=datetime.timedelta(seconds=30))\n"
        "x = torch.randn(3, 2, requires_grad=True)\n"
        "y = pd.all_gather(x, 1)\n"
        "y.sum().backward()\n"
        "assert torch.equal(y, x) and torch.equal(x.grad, torch.ones(3, 2))\n"
        "print(pd.get_backend(), pd.get_world_size(), pd.get_rank())\n"
    )
    env = {key: v for key, v in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["gloo", "1", "0"]


def test_init_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout must be positive"):
        import datetime

        pd.init(timeout=datetime.timedelta(seconds=0))


