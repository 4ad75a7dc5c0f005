"""What the Triton launchers' real calls compile to on an H100 (sm_90), without a GPU.

A launcher is called on CPU tensors with a recording ``launch`` instead of ``wrap_triton``;
the recorded arguments are specialized the way Triton's JIT does it (16-byte aligned
pointers and integers divisible by 16 get a divisibility attribute, integers equal to 1
become constants, ``do_not_specialize`` arguments stay plain) and compiled with
``triton.compile`` for sm_90 by the bundled ptxas. The report counts what decides
bandwidth in the PTX: scalar 16-bit global loads and stores, 16-byte async copies
(``cp.async.cg``, the software pipeline's loads), vector stores and Hopper tensor-core
MMAs (``wgmma``); from the SASS (nvdisasm), the main loop's instruction count and its
integer divisions. ``sass_functions``/``main_loop`` also read the CUDA extension's own
cubin (tests/ops/test_cuda_codegen.py).

It must run in a process without ``TRITON_INTERPRET`` (the interpreter replaces
``triton.jit`` when the kernel modules are imported), so the tests call it as

    python -m tests.sm90_codegen [SCENARIO ...]

which prints one JSON object: scenario -> counts.
"""
from __future__ import annotations

import json
import re
import sys

import torch

PTX_PATTERNS = {
    # ld.global[.nc][.L1::...].b16 / .u16 without .v2/.v4: one 2-byte element per load.
    "scalar_loads_16": r"ld\.global(?:\.[\w:]+)*?\.(?:b16|u16|s16)\s",
    "scalar_stores_16": r"st\.global(?:\.[\w:]+)*?\.(?:b16|u16|s16)\s",
    "cp_async_16": r"cp\.async\.cg\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(?:16|0x10)\b",
    "cp_async_8": r"cp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(?:8|0x8)\b",
    "vector_stores": r"st\.global(?:\.[\w:]+)*?\.v[248]\.",
    "wgmma": r"wgmma\.mma_async",
}
_PTR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


class RecordingLaunch:
    """Stands in for ``wrap_triton``: ``launch(kernel)[grid](*args, **kwargs)`` records."""

    def __call__(self, kernel):
        self.kernel = kernel
        return self

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return record


def compile_recorded(rec: RecordingLaunch, config_index: int = 0, arch: int = 90):
    """Compile the recorded call with the autotuner's ``config_index``-th config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = rec.kernel.configs[config_index]
    fn = rec.kernel.fn
    names = fn.arg_names
    # (names in recent Triton, indices in some older releases)
    plain = {names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    values = dict(zip(names, rec.args))
    values.update(rec.kwargs)
    values.update(config.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value = values[name]
        param = fn.params[index]
        if param.is_constexpr or value is None or isinstance(value, bool):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            if name not in plain and value == 1:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if name not in plain and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"argument {name}: cannot specialize {type(value).__name__}")
    source = ASTSource(fn, signature, constexprs, attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def ptx_counts(ptx: str) -> dict:
    return {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_PATTERNS.items()}


def nvidia_tool(name: str):
    """Path of a CUDA binary tool (nvdisasm, cuobjdump): Triton's bundled copy, else the one
    on PATH; None if neither exists."""
    import os
    import shutil

    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    return shutil.which(name)


def sass_functions(cubin: bytes) -> dict:
    """SASS of every kernel in a cubin (nvdisasm): mangled name -> instruction lines."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True,
                              text=True, check=True).stdout.splitlines()
    functions, current = {}, None
    for line in sass:
        header = re.match(r"^\.text\.(\S+):$", line)
        if header:
            current = functions[header.group(1)] = []
        elif current is not None:
            current.append(line)
    return functions


def main_loop(lines, marker: str = "MMA") -> list:
    """Instructions of a kernel's main loop: the largest backward branch whose body holds
    ``marker`` (default tensor-core MMAs, HMMA / HGMMA; "FFMA" for a SIMT kernel); [] if
    there is none."""
    labels = {line.strip()[1:-1]: i for i, line in enumerate(lines)
              if re.match(r"^\.L_x_\d+:$", line.strip())}
    best = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA `\(\.(L_x_\d+)\)", line)
        start = labels.get(target.group(1)) if target else None
        if start is not None and start < i and any(marker in s for s in lines[start:i]):
            body = [s for s in lines[start:i] if "/*" in s]
            if len(body) > len(best):
                best = body
    return best


def main_loop_counts(cubin: bytes) -> dict:
    """Size of the (single) kernel's main loop in a Triton cubin. ``loop_divisions``
    counts MUFU.RCP, the reciprocal every integer division by a runtime value starts with."""
    body = max((main_loop(lines) for lines in sass_functions(cubin).values()), key=len, default=[])
    if not body:
        return {"loop_instructions": None, "loop_divisions": None}
    return {"loop_instructions": len(body), "loop_divisions": sum("MUFU.RCP" in s for s in body)}


def _conv_shape(n, c_in, c_out, hw, k, stride, pad):
    from pyowt.ops.conv2d import conv_shape

    return conv_shape((n, c_in, hw, hw), (c_out, c_in, k, k), (stride, stride), (pad, pad), (1, 1), 1)


def _conv_tensors(shape, dtype, channels_last=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape.n, shape.c_in, shape.h, shape.w, dtype=dtype).to(memory_format=fmt)
    w = torch.randn(shape.c_out, shape.c_in, shape.r, shape.s, dtype=dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    y = torch.empty(shape.n, shape.c_out, shape.h_out, shape.w_out, dtype=dtype).to(memory_format=fmt)
    return x, w, torch.randn(shape.c_out, dtype=dtype), y


# AlexNet's conv3 (192 -> 384 channels, 3x3, 13x13) at batch 2: the blocked k walk.
CONV3 = dict(n=2, c_in=192, c_out=384, hw=13, k=3, stride=1, pad=1)


def _conv_fwd(dtype=torch.bfloat16, **geometry):
    from pyowt.kernels.conv2d import launch_conv2d_fwd
    shape = _conv_shape(**(geometry or CONV3))
    x, w, b, y = _conv_tensors(shape, dtype)
    rec = RecordingLaunch()
    launch_conv2d_fwd(rec, x, w, b, y, shape, relu=True)
    return rec


def _conv_dgrad(dtype=torch.bfloat16):
    from pyowt.kernels.conv2d_backward import launch_conv2d_dgrad
    shape = _conv_shape(**CONV3)
    x, w, _, y = _conv_tensors(shape, dtype)
    rec = RecordingLaunch()
    launch_conv2d_dgrad(rec, torch.randn_like(y), y, w, torch.empty_like(x), shape, relu=True)
    return rec


def _conv_wgrad(dtype=torch.bfloat16, dense=True):
    from pyowt.kernels.conv2d_backward import launch_conv2d_wgrad_partials
    shape = _conv_shape(**CONV3)
    x, _, _, y = _conv_tensors(shape, dtype)
    rec = RecordingLaunch()
    launch_conv2d_wgrad_partials(rec, torch.randn_like(y), y, x, shape, relu=True, has_bias=True, split=1)
    assert rec.kwargs["Y_DENSE"]
    rec.kwargs["Y_DENSE"] = dense  # False: the general pixel offsets of a strided dy
    return rec


# A GEMM large enough for the tuned configs (2**28 multiply-adds), fc-layer like.
LINEAR_MNK = (256, 1024, 1024)


def _linear(which, dtype=torch.bfloat16):
    import pyowt.kernels.linear as kl
    m, n, k = LINEAR_MNK
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    y, g = torch.empty(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    rec = RecordingLaunch()
    if which == "fwd":
        kl.launch_linear_fwd(rec, x, w, torch.randn(n, dtype=dtype), y, relu=True)
    elif which == "dx":
        kl.launch_linear_dx(rec, g, y, w, torch.empty_like(x))
    else:
        kl.launch_linear_dw(rec, g, y, x, torch.empty_like(w), torch.empty(n, dtype=dtype))
    return rec


SCENARIOS = {
    "conv2d_fwd_bf16": lambda: _conv_fwd(torch.bfloat16),
    "conv2d_fwd_fp16": lambda: _conv_fwd(torch.float16),
    # AlexNet's conv1 (RGB, 11x11 stride 4): the packed k walk over a 4-channel copy.
    "conv2d_fwd_rgb_bf16": lambda: _conv_fwd(torch.bfloat16, n=2, c_in=3, c_out=64, hw=63, k=11,
                                             stride=4, pad=2),
    "conv2d_dgrad_bf16": lambda: _conv_dgrad(torch.bfloat16),
    "conv2d_wgrad_bf16": lambda: _conv_wgrad(torch.bfloat16),
    "conv2d_wgrad_strided_bf16": lambda: _conv_wgrad(torch.bfloat16, dense=False),
    "linear_fwd_bf16": lambda: _linear("fwd"),
    "linear_dx_bf16": lambda: _linear("dx"),
    "linear_dw_bf16": lambda: _linear("dw"),
}


def main(argv) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}", file=sys.stderr)
        return 2
    report = {}
    for name in names:
        rec = SCENARIOS[name]()
        compiled = compile_recorded(rec)
        report[name] = dict(ptx_counts(compiled.asm["ptx"]), **main_loop_counts(compiled.asm["cubin"]),
                            shared_bytes=compiled.metadata.shared,
                            X_ALIGN=rec.kwargs.get("X_ALIGN"), Y_ALIGN=rec.kwargs.get("Y_ALIGN"))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
