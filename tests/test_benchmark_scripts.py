"""The GPU check's profiling scripts run (on CPU here), so they do not rot between GPU sessions."""
import pytest

from pyowt import _extension


@pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")
def test_host_overhead_runs(capsys):
    import torch

    from benchmarks import host_overhead

    threads = torch.get_num_threads()
    try:
        host_overhead.main(["--device", "cpu", "--calls", "20"])  # sets one thread
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for op in ("linear_bias_act", "conv2d_bias_act", "bias_relu"):
        assert op in out


@pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")
def test_profile_linear_runs(capsys):
    from benchmarks import profile_linear

    assert profile_linear.main(["--device", "cpu", "--calls", "1", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("wall") == 4  # two shapes x (aten, ours)
    assert "linear_bias_act" in out
