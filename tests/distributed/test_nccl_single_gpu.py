"""NCCL on a one-GPU machine: the primitives under pyowt's collectives, for real.

NCCL refuses two ranks on one device, and at K = 1 the autograd wrappers skip the wire,
so what one GPU can check is the layer they call (pyowt.distributed._compat): the
collective names bound for this torch, output buffers on the input's device, async
handles, every dtype, run through a one-rank NCCL group in a child process (so no
default group leaks into the test process).
"""
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def nccl_single_rank_body():
    import torch.distributed as dist

    from pyowt import distributed as pdist
    from pyowt.distributed import _compat as c

    pdist.init(backend="nccl", timeout=timedelta(seconds=60))
    assert pdist.get_backend() == "nccl", pdist.get_backend()
    group = pdist.resolve_group(None)
    device = torch.device("cuda", torch.cuda.current_device())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(6, 5, device=device).to(dtype)
        for async_op in (False, True):
            out, work = c.all_gather(x, group, 1, async_op=async_op)
            if async_op:
                work.wait()
            assert out.device == device and out.dtype == dtype and torch.equal(out, x)
            rs, work = c.reduce_scatter(x, group, 1, 0, async_op=async_op)
            if async_op:
                work.wait()
            assert rs.device == device and torch.equal(rs, x)
        buf = x.clone()
        c.all_reduce_(buf, group)
        c.broadcast_(buf, 0, group)
        c.reduce_(buf, 0, group)
        assert torch.equal(buf, x)
    # The public API over NCCL: values, gradients and accounting at K = 1.
    x = torch.randn(4, 3, device=device, requires_grad=True)
    with pdist.comm_stats() as stats:
        y = pdist.all_gather(x, dim=1, grad="reduce_scatter")
        z = pdist.reduce_scatter(y * 2, dim=0)
        pending = pdist.all_reduce_async(z)
        z = pending.wait()
    z.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    assert {k: stats[k].calls for k in ("all_gather", "reduce_scatter", "all_reduce")} == \
        {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 1}, stats
    dist.destroy_process_group()
    print("NCCL_OK", torch.cuda.get_device_name(), torch.cuda.nccl.version())


@pytest.mark.gpu
def test_nccl_primitives_on_one_gpu():
    code = "from tests.distributed.test_nccl_single_gpu import nccl_single_rank_body as f; f()"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and "NCCL_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
