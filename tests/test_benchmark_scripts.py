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
    for op in ("linear_bias_act", "conv2d_bias_act", "conv2d C_in 8", "bias_relu"):
        assert op in out


@pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")
def test_profile_linear_runs(capsys):
    from benchmarks import profile_linear

    assert profile_linear.main(["--device", "cpu", "--calls", "1", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("wall") == 4  # two shapes x (aten, ours)
    assert "linear_bias_act" in out


@pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")
def test_profile_conv_runs(capsys):
    from benchmarks import profile_conv

    assert profile_conv.main(["--device", "cpu", "--calls", "1", "--top", "2", "--layers", "conv3",
                              "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("wall") >= 2 and "conv3 aten" in out and "conv3 cpu" in out, out
    with pytest.raises(SystemExit):
        profile_conv.main(["--layers", "conv9"])


def test_sweep_conv_triton_runs(capsys, tmp_path):
    from pyowt.kernels import HAS_TRITON, interpreter_enabled

    if not (HAS_TRITON and interpreter_enabled()):
        pytest.skip("runs on CPU under TRITON_INTERPRET=1 (on a GPU the full sweep is the GPU check's)")
    import json

    from benchmarks import sweep_conv_triton

    path = tmp_path / "sweep.json"
    assert sweep_conv_triton.main(["--device", "cpu", "--reps", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("best") == 2  # one line per tiny layer
    rows = [r for layer in json.loads(path.read_text())["layers"] for r in layer["rows"]]
    assert rows and all(r["rel_err"] < 1e-5 for r in rows)  # every config computed the conv


def _reference_conv_op(wrong_tile=None):
    """A CPU stand-in for torch.ops.pyowt.conv2d_bias_act that reads PYOWT_CUDA_CONV_TILE
    as the CUDA op does; the tile ``wrong_tile`` returns a transposed-weight conv."""
    import os

    import torch
    import torch.nn.functional as F

    tiles = []

    def op(x, w, b, stride, padding, dilation, groups, activation):
        tile = os.environ.get("PYOWT_CUDA_CONV_TILE")
        tiles.append(tile)
        if tile == wrong_tile:
            w = w.transpose(2, 3)
        out = F.relu(F.conv2d(x.float(), w.float(), b.float(), stride, padding, dilation, groups))
        return out.to(x.dtype).contiguous(memory_format=torch.channels_last if not x.is_contiguous()
                                          else torch.contiguous_format)

    return op, tiles


def test_probe_wgmma_verdicts(capsys):
    # The GPU check decides from this probe whether the wgmma conv tiles are used at all:
    # it must pass agreeing tiles, fail a wrong one, and leave the environment as it was.
    import os

    from benchmarks import probe_wgmma

    op, tiles = _reference_conv_op()
    assert probe_wgmma.main(op=op, device="cpu") == 0
    assert set(tiles) == {"128x64x32", *probe_wgmma.TILES} and "PYOWT_CUDA_CONV_TILE" not in os.environ
    assert "all agree" in capsys.readouterr().out
    op, _ = _reference_conv_op(wrong_tile="wgmma128x128x64")
    assert probe_wgmma.main(op=op, device="cpu") == 1
    out = capsys.readouterr().out
    assert "wgmma128x128x64" in out and "MISMATCH" in out and "6 mismatches" in out


@pytest.mark.parametrize("layer", ["conv5", "rgb"])
def test_triton_launch_host_runs(layer):
    # It needs a process without TRITON_INTERPRET; a stand-in driver replaces the GPU.
    from .utils import run_without_interpreter, triton_nvidia_backend

    if not triton_nvidia_backend():
        pytest.skip("no Triton with an NVIDIA backend")
    proc = run_without_interpreter("benchmarks.triton_launch_host", "--calls", "50", "--layer", layer,
                                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if f"eager {layer} " in line and "us per call" in line]
    assert len(lines) == 8 and sum(", relaunch " in line for line in lines) == 4, proc.stdout
    assert sum("forward+backward" in line for line in lines) == 4, proc.stdout


def test_conv_benchmark_reports_ratios_against_benchmarked_cudnn():
    # The GPU table's "vs bench" column and summary: ours against cuDNN with its benchmark
    # flag on, next to the heuristic cuDNN ("vs aten"), from the same rows.
    from benchmarks.test_bench_conv import CUDNN_BENCH, format_table, summarize

    def row(layer, impl, ms, aten, bench):
        return dict(layer=layer, mode="fwd", dtype="bfloat16", device="cuda", batch=128, impl=impl,
                    ms=ms, tflops=1.0, floor_ms=0.01, speedup_vs_aten=aten / ms,
                    speedup_vs_compile=None, speedup_vs_cudnn_bench=bench / ms,
                    ours=impl.startswith("ours"), sync_ms=None, notes="")

    rows = [row("alexnet.conv2", "aten", 0.2, 0.2, 0.1), row("alexnet.conv2", CUDNN_BENCH, 0.1, 0.2, 0.1),
            row("alexnet.conv2", "ours:cuda", 0.1, 0.2, 0.1),
            row("alexnet.conv3", "aten", 0.4, 0.4, 0.4), row("alexnet.conv3", CUDNN_BENCH, 0.4, 0.4, 0.4),
            row("alexnet.conv3", "ours:cuda", 0.8, 0.4, 0.4)]
    summary = summarize(rows)
    assert set(summary) == {"cuda/bfloat16/fwd/alexnet/ours:cuda"}
    s = summary["cuda/bfloat16/fwd/alexnet/ours:cuda"]
    assert abs(s["vs_aten"] - 1.0) < 1e-12            # sqrt(2.0 * 0.5)
    assert abs(s["vs_bench"] - 0.5 ** 0.5) < 1e-12     # sqrt(1.0 * 0.5)
    table = format_table(rows, summary)
    assert "vs bench" in table.splitlines()[0]
    assert "vs aten   1.000x   vs bench   0.707x" in table
