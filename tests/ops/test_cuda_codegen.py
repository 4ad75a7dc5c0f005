"""The CUDA extension's tensor-core conv kernels as compiled for sm_90, checked without a GPU.

The built extension carries sm_90a SASS (the dev/CI build compiles for 9.0a); the test pulls
the conv2d cubin out with cuobjdump and reads the main loop of every conv2d_tc_kernel
instantiation (fp16/bf16 x WMMA 128x64x32/128x128x32/128x128x64/128x96x64 and wgmma 128x64x64/
128x96x64/128x128x64 tiles x vector/scalar A loader x NHWC/NCHW output; none may touch local memory;
the wgmma ones must issue Hopper's HGMMA, with no HMMA fallback). Two defects it pins down,
both found this way and invisible to the CPU emulation in conv2d_cuda_emulation.py:

* nvcc compiled WMMA's bf16 fragment loads as generic 32-bit loads (48 ``LD.E`` per K step)
  where its fp16 loads became 12 ``LDSM`` (ldmatrix); the bf16 loads are now PTX with the
  .shared state space (csrc/cuda/conv2d_tc.cuh, load_fragment).
* the vector A loader divided twice per K step to decode (r, s, c); it now steps them.
The vector path's loop is also pinned to its three-stage shape (one barrier per K step).
"""
import glob
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from pyowt import _extension

from ..sm90_codegen import nvidia_tool, main_loop, sass_functions

KERNEL = re.compile(r"conv2d_tc_kernelIN3c10(?:8(BFloat16)|4(Half))ENS\d+_9TileShapeILi(\d+)ELi(\d+)ELb([01])EEE"
                    r"Lb([01])ELb([01])E")


def _opcode(line: str) -> str:
    tokens = line.split("*/", 1)[-1].strip().split()
    return tokens[1] if tokens and tokens[0].startswith("@") and len(tokens) > 1 else (tokens or [""])[0]


def _extension_sass(stem: str) -> dict:
    """SASS of every kernel in the extension's sm_90 cubin of csrc/cuda/<stem>.cu: mangled
    name -> instruction lines; skips when the extension or the tools are missing."""
    if not _extension.STATUS.with_cuda:
        pytest.skip("the extension was built without CUDA")
    import pyowt._C as ext

    if nvidia_tool("cuobjdump") is None or nvidia_tool("nvdisasm") is None:
        pytest.skip("no cuobjdump/nvdisasm (neither bundled with Triton nor on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([nvidia_tool("cuobjdump"), "-xelf", "all", ext.__file__], cwd=tmp,
                              capture_output=True, text=True)
        cubins = glob.glob(str(Path(tmp) / f"{stem}.sm_90*.cubin"))
        if proc.returncode != 0 or not cubins:
            pytest.skip(f"no sm_90 {stem} code in the extension ({proc.stderr.strip()[:200]})")
        return sass_functions(Path(cubins[0]).read_bytes())


def _local_memory(lines) -> list:
    """The local-memory accesses (register spills, dynamically indexed arrays) of a kernel."""
    return [_opcode(s) for s in lines if re.search(r"\b(LDL|STL)\b", s)]


@pytest.fixture(scope="module")
def tc_loops():
    functions = _extension_sass("conv2d")
    loops = {}
    for name, lines in functions.items():
        match = KERNEL.search(name)
        if match:
            bf16, _, bn, bk, wgmma, vec_a, nhwc = match.groups()
            key = ("bf16" if bf16 else "fp16", int(bn), int(bk), vec_a == "1", nhwc == "1", wgmma == "1")
            # 128x128 holds 64 fp32 accumulators per thread near the 255-register cap.
            local = _local_memory(lines)
            assert not local, f"{key}: local memory (spills?) {local[:4]}"
            loops[key] = [_opcode(s) for s in main_loop(lines)]
    # WMMA (64, 32) and (128, 32) with both loaders, (128, 64) and (96, 64) with the vector
    # loader only; wgmma (64, 64), (96, 64) and (128, 64), vector loader only
    assert len(loops) == 36, f"expected 36 conv2d_tc_kernel instantiations, found {sorted(loops)}"
    return loops


def _wmma(loops):
    return {key[:5]: ops for key, ops in loops.items() if not key[5]}


def test_tc_fragments_load_with_ldmatrix(tc_loops):
    # Per warp and K step (bk / 16 k16 slices): a 64 x bn/2 warp tile is 4 x bn/32 WMMA
    # fragments, each two HMMA.16816; its fragment loads are 4 A + bn/32 B LDSM.x4 per slice.
    for key, ops in _wmma(tc_loops).items():
        bn, bk = key[1], key[2]
        mma = sum(op.startswith("HMMA") for op in ops)
        ldsm = sum(op.startswith("LDSM") for op in ops)
        generic = [op for op in ops if op == "LD" or op.startswith("LD.")]
        assert mma == (bk // 16) * 4 * (bn // 32) * 2, f"{key}: {mma} HMMA per K step"
        assert ldsm == (bk // 16) * (4 + bn // 32) and not generic, \
            f"{key}: {ldsm} LDSM and {len(generic)} generic loads per K step"


def test_wgmma_tiles_issue_hgmma(tc_loops):
    # Per K step of 64: 4 k16 slices x 2 m64 halves = 8 HGMMA 64 x bn x 16 of the warpgroup,
    # one arrive (wgmma.fence) and one wait, the async-proxy fence before the barrier, no
    # WMMA/ldmatrix left, the same pipeline shape (one barrier per K step) and no division;
    # 256-278 instructions per K step (nvcc 13.0).
    wgmma = {key: ops for key, ops in tc_loops.items() if key[5]}
    assert len(wgmma) == 12, sorted(wgmma)
    for (dtype, bn, bk, vec_a, nhwc, _), ops in wgmma.items():
        tile = f"{dtype} wgmma128x{bn}x{bk} nhwc={nhwc}"
        hgmma = [op for op in ops if op.startswith("HGMMA")]
        kind = ".BF16" if dtype == "bf16" else ""  # nvdisasm leaves fp16 inputs unsuffixed
        assert len(hgmma) == 8 and all(op == f"HGMMA.64x{bn}x16.F32{kind}" for op in hgmma), f"{tile}: {hgmma}"
        assert not [op for op in ops if op.startswith(("HMMA", "LDSM"))], tile
        assert ops.count("WARPGROUP.ARRIVE") == 1 and sum(op.startswith("WARPGROUP.DEPBAR") for op in ops) == 1, tile
        assert sum(op.startswith("FENCE.VIEW.ASYNC.S") for op in ops) == 1, tile
        assert sum(op.startswith("BAR") for op in ops) == 1 and "MUFU.RCP" not in ops, tile
        # the tensor cores run while the warpgroup issues the next tile's copies
        last_mma = max(i for i, op in enumerate(ops) if op.startswith("HGMMA"))
        copies = [i for i, op in enumerate(ops) if op.startswith("LDGSTS")]
        wait = next(i for i, op in enumerate(ops) if op.startswith("WARPGROUP.DEPBAR"))
        assert last_mma < copies[0] and copies[-1] < wait, f"{tile}: MMA / copy / wait order"


def test_tc_vector_path_loop(tc_loops):
    for (dtype, bn, bk, vec_a, nhwc), ops in _wmma(tc_loops).items():
        tile = f"{dtype} 128x{bn}x{bk} nhwc={nhwc}"
        if vec_a:
            assert "MUFU.RCP" not in ops, f"{tile}: integer division in the main loop"
            # the three-stage pipeline: one barrier and one wait per K step
            barriers = sum(op.startswith("BAR") for op in ops)
            assert barriers == 1, f"{tile}: {barriers} barriers per K step"
            # The loop is issue-bound before it is MMA-bound: an SM sub-partition issues one
            # instruction per clock and needs an HMMA about every fourth to keep its tensor
            # core busy. Sharing each tap's offset across a thread's rows took the loop from
            # 212 / 257 instructions (128x64x32 / 128x128x32) to 176-180 / 219-226 (nvcc 13.0);
            # 128x128x64: 432-442; 128x96x64: 379-393 (96 HMMA, 28 LDSM).
            limit = {(64, 32): 195, (128, 32): 240, (128, 64): 480, (96, 64): 420}[(bn, bk)]
            assert len(ops) <= limit, f"{tile}: {len(ops)} instructions per K step"


@pytest.fixture(scope="module")
def simt_backward_sass():
    """SASS of the fp32 backward kernels (conv2d_backward.cu): name -> instruction lines."""
    functions = _extension_sass("conv2d_backward")
    kernels = {}
    for name, lines in functions.items():
        if "conv2d_wgrad_simt_kernel" in name:
            kernels["wgrad"] = lines
        match = re.search(r"conv2d_simt_kernelILb([01])ELb1E", name)
        if match:
            kernels[f"dgrad nhwc={match.group(1)}"] = lines
    assert sorted(kernels) == ["dgrad nhwc=0", "dgrad nhwc=1", "wgrad"], sorted(kernels)
    return kernels


def test_simt_backward_kernels_loop_and_registers(simt_backward_sass):
    # Each K step (16 reduction rows) is 16 x 16 FMAs per thread on its 4x4 block, from
    # registers: no local memory (spills or a dynamically indexed array) anywhere.
    for key, lines in simt_backward_sass.items():
        ops = [_opcode(s) for s in main_loop(lines, marker="FFMA")]
        ffma = sum(op.startswith("FFMA") for op in ops)
        assert ffma == 256, f"{key}: {ffma} FFMA per K step, expected 256"
        local = _local_memory(lines)
        assert not local, f"{key}: local memory {local[:4]}"
