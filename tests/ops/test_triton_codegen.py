"""The Triton kernels' sm_90 code, checked without a GPU (see tests/sm90_codegen.py).

The launchers' alignment hints decide whether a kernel's channel gathers compile to 16-byte
async copies that Triton software-pipelines in front of the tensor-core MMAs, or to scalar
2-byte loads with no pipelining. Until this test existed every conv launcher passed hints
of 1 (the channel stride was counted among the pixel strides), and the H200 run measured
the Triton conv forward at 16-54 TFLOP/s; nothing on a CPU could see it. The main loops'
SASS is checked for integer divisions the same way, and the RGB first layer for the packed
walk's 8-byte copies.
"""
import json

import pytest
import torch

from pyowt.kernels.conv2d import channel_align

from ..sm90_codegen import nvidia_tool
from ..utils import run_without_interpreter, triton_nvidia_backend
CONV = ["conv2d_fwd_bf16", "conv2d_fwd_fp16", "conv2d_dgrad_bf16", "conv2d_wgrad_bf16"]
RGB = "conv2d_fwd_rgb_bf16"
LINEAR = ["linear_fwd_bf16", "linear_dx_bf16", "linear_dw_bf16"]
WGRAD_STRIDED = "conv2d_wgrad_strided_bf16"


@pytest.fixture(scope="module")
def sm90_report():
    if not triton_nvidia_backend():
        pytest.skip("this Triton has no NVIDIA backend to compile for sm_90")
    if nvidia_tool("nvdisasm") is None:
        pytest.skip("no nvdisasm (neither bundled with Triton nor on PATH)")
    proc = run_without_interpreter("tests.sm90_codegen", *CONV, RGB, *LINEAR, WGRAD_STRIDED)
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("scenario", CONV)
def test_conv_gathers_are_pipelined_16_byte_copies(sm90_report, scenario):
    counts = sm90_report[scenario]
    assert counts["X_ALIGN"] == 16 and counts["Y_ALIGN"] == 16, counts
    assert counts["scalar_loads_16"] == 0, f"{scenario}: scalar 2-byte global loads: {counts}"
    assert counts["scalar_stores_16"] == 0, f"{scenario}: scalar 2-byte global stores: {counts}"
    assert counts["cp_async_16"] > 0, f"{scenario}: no 16-byte async copies: {counts}"
    assert counts["wgmma"] > 0, f"{scenario}: no Hopper tensor-core MMA: {counts}"
    assert counts["vector_stores"] > 0, counts
    # Dividing by runtime sizes inside the loop (decoding the iteration's tap and channel
    # block, or the pixels) cost a quarter to a third of the forward's and input
    # gradient's loop instructions; the loops advance counters instead.
    assert counts["loop_divisions"] == 0, f"{scenario}: integer divisions in the main loop: {counts}"


def test_wgrad_dense_dy_skips_the_pixel_decode(sm90_report):
    # The weight gradient's loop walks pixels; with dense NHWC dy/out (what the op passes)
    # pixel m's offset is m * stride, so the loop need not decode m for them (Y_DENSE):
    # 705 -> 631 instructions per iteration under Triton 3.8.
    dense = sm90_report["conv2d_wgrad_bf16"]["loop_instructions"]
    strided = sm90_report[WGRAD_STRIDED]["loop_instructions"]
    assert dense < 0.95 * strided, (dense, strided)


def test_rgb_first_layer_gathers_are_pipelined_8_byte_copies(sm90_report):
    # Three channels cannot be gathered 16 bytes at a time: the flat walk compiled to scalar
    # 2-byte loads without a pipeline. The packed walk reads a 4-channel copy, one aligned
    # 8-byte run per pixel: 8-byte cp.async for x, 16-byte for the weight.
    counts = sm90_report[RGB]
    assert counts["scalar_loads_16"] == 0, counts
    assert counts["cp_async_8"] > 0 and counts["cp_async_16"] > 0, counts
    assert counts["wgmma"] > 0 and counts["loop_divisions"] == 0, counts


@pytest.mark.parametrize("scenario", LINEAR)
def test_linear_tiles_are_pipelined_16_byte_copies(sm90_report, scenario):
    counts = sm90_report[scenario]
    assert counts["cp_async_16"] > 0, f"{scenario}: no 16-byte async copies: {counts}"
    assert counts["wgmma"] > 0, f"{scenario}: no Hopper tensor-core MMA: {counts}"
    # The epilogue's bias load / bias-gradient store may be scalar; the tiles may not.
    assert counts["scalar_loads_16"] <= 1 and counts["scalar_stores_16"] <= 1, counts


@pytest.mark.parametrize("memory_format, channels, expected", [
    (torch.channels_last, 64, 16), (torch.channels_last, 24, 8), (torch.channels_last, 3, 1),
    (torch.contiguous_format, 64, 1),
])
def test_channel_align(memory_format, channels, expected):
    t = torch.empty(2, channels, 5, 7).to(memory_format=memory_format)
    assert channel_align(channels, t) == expected


def test_channel_align_of_a_channel_slice():
    # Channels 0..47 of a 64-channel channels_last tensor: runs of 48, pixel strides of 64.
    t = torch.empty(2, 64, 5, 7).to(memory_format=torch.channels_last)[:, :48]
    assert channel_align(48, t) == 16
    # 36 of 40 channels: the channel count allows aligned runs of 4 only.
    odd = torch.empty(2, 40, 3, 3).to(memory_format=torch.channels_last)[:, :36]
    assert channel_align(36, odd) == 4
