"""Compile one C++/CUDA source of csrc/ on its own (syntax and template check, no link).

    python .ci/compile_check.py csrc/cuda/conv2d.cu [more files]

Uses the include paths and flags setup.py uses, writes objects to a temporary folder and
touches nothing in build/, so a broken file can be checked before it joins the extension.
"""
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")

from torch.utils import cpp_extension  # noqa: E402


def _std() -> str:
    """The C++ standard torch's own cpp_extension would pick: C++20 from torch 2.13 on,
    C++17 before (PYOWT_CXX_STD overrides), so a check against an older torch's headers
    (PYTHONPATH=<unpacked wheel>) sees what that torch's build would see."""
    if os.environ.get("PYOWT_CXX_STD"):
        return os.environ["PYOWT_CXX_STD"]
    import torch
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 13) else "c++17"


def main(paths):
    incs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "build", "pyowt_include")]
    incs += cpp_extension.include_paths(device_type="cuda") if hasattr(cpp_extension, "include_paths") else []
    import sysconfig
    incs.append(sysconfig.get_paths()["include"])
    flags = [f"-I{p}" for p in incs] + ["-DPYOWT_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H",
                                         "-DTORCH_EXTENSION_NAME=_C", f"-std={_std()}", "-O1"]
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            obj = os.path.join(tmp, os.path.basename(path) + ".o")
            if path.endswith(".cu"):
                cmd = [os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"), "-c", path, "-o", obj,
                       "-gencode=arch=compute_90,code=sm_90", *cpp_extension.COMMON_NVCC_FLAGS,
                       "-Xcompiler", "-fPIC"] + flags
            else:
                cmd = ["c++", "-c", path, "-o", obj, "-fPIC", "-Wall"] + flags
            print("compiling", path, flush=True)
            r = subprocess.run(cmd)
            rc = rc or r.returncode
    import torch
    print(("OK" if rc == 0 else "FAILED") + f" (torch {torch.__version__}, -std={_std()})")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
