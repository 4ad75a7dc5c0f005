"""Build pyowt and its compiled extension ``pyowt._C``.

The extension must be compiled against the torch the user already has (its C++ ABI and
its CUDA version), so install with ``pip install --no-build-isolation .``.

Environment knobs:
    FORCE_CUDA=1          build the CUDA sources even without a visible GPU, and fail if
                          that is impossible (no toolkit, or a CPU-only torch)
    PYOWT_SKIP_CUDA=1     build only the C++ CPU sources
    TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0a": 9.0a is Hopper's own
                          instruction set, which the conv's wgmma tiles need; a "9.0" build
                          runs on Hopper without them)
    MAX_JOBS              parallel compile jobs (ninja)
    CUDA_HOME             the CUDA toolkit (default: found from /usr/local/cuda or nvcc)
"""
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _locate_cuda_home():
    """CUDA_HOME for torch.utils.cpp_extension, which must be set before it is imported.

    torch guesses it from ``which nvcc``; a wrapper script on the PATH (as on our machines)
    makes that guess point at a folder without headers, so look for the real toolkit.
    """
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(key):
            return os.environ[key]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


cuda_home = _locate_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _missing_header_dir():
    """A private include folder for the headers the system toolkit lacks.

    cuBLAS, cuSPARSE, cuSOLVER (included by ATen/cuda/CUDAContext.h) and NCCL headers ship
    in torch's ``nvidia`` wheels, next to a full copy of the CUDA runtime headers that may
    be another minor version than nvcc's. Putting those folders on the include path would
    shadow the toolkit's own headers, so link only the missing entries into
    build/pyowt_include.
    """
    toolkit_inc = os.path.join(cpp_extension.CUDA_HOME or "", "include")
    out = os.path.join(ROOT, "build", "pyowt_include")
    os.makedirs(out, exist_ok=True)
    for site in sys.path:
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            for name in sorted(os.listdir(inc)):
                link = os.path.join(out, name)
                if os.path.exists(os.path.join(toolkit_inc, name)) or os.path.lexists(link):
                    continue
                os.symlink(os.path.join(inc, name), link)
    return out


def _cublaslt_link():
    """(library_dirs, libraries) that link cuBLASLt, which csrc/cuda/linear.cu calls.

    CUDAExtension links the CUDA runtime but not cuBLAS. Look in the toolkit first
    (CUDA_HOME/lib64), then in torch's ``nvidia`` wheels on sys.path (a toolkit without
    the math libraries, as on our build machines). Prefer the soname of torch's own CUDA
    major version: that is the copy torch has already loaded when pyowt._C is imported.
    """
    major = (torch.version.cuda or "").split(".")[0]
    home = cpp_extension.CUDA_HOME or ""
    dirs = [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
    for d in dirs:
        names = [os.path.basename(p) for p in glob.glob(os.path.join(d, "libcublasLt.so*"))]
        for name in (f"libcublasLt.so.{major}", "libcublasLt.so"):
            if name in names:
                # -l:<file> links that exact file (GNU ld); its soname becomes the dependency.
                return [d], [":" + name]
    sys.exit("cannot build the CUDA sources: libcublasLt not found in " + ", ".join(dirs))


def _torch_libstdcxx():
    """Link arguments naming the libstdc++ that torch runs on in this process.

    Some toolchains ship only a static libstdc++ (seen: the gcc 13 in /opt/gcc on the
    GPU machines) and would copy a second C++ runtime into _C. Every TORCH_CHECK throws
    from libc10 through our frames, whose personality routine then belongs to the other
    runtime: the first argument error kills the process with a segmentation fault.
    Naming torch's shared libstdc++ before the driver's implicit ``-lstdc++`` resolves
    the runtime symbols there, so nothing is copied from the archive.
    """
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and os.path.basename(parts[5]).startswith("libstdc++.so"):
                    return [parts[5]]
    except OSError:
        pass
    return []


def _check_one_cxx_runtime(path):
    """Refuse an extension that carries its own C++ runtime (see _torch_libstdcxx)."""
    nm = shutil.which("nm")
    if nm is None or not os.path.exists(path):
        return
    out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True).stdout
    defined = {line.split()[-1] for line in out.splitlines() if line.strip()}
    own = [sym for sym in ("__cxa_throw", "__gxx_personality_v0") if sym in defined]
    if own:
        sys.exit(f"pyowt: {path} defines {', '.join(own)}: the C++ runtime was linked statically "
                 f"(CXX={os.environ.get('CXX', 'c++')}), so exceptions thrown by torch would crash "
                 "the process. Build with a compiler whose libstdc++ is shared.")


def _want_cuda():
    if _flag("PYOWT_SKIP_CUDA"):
        return False, "PYOWT_SKIP_CUDA=1"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if _flag("FORCE_CUDA"):
            sys.exit("FORCE_CUDA=1 but the CUDA sources cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons)
    return True, "CUDA toolkit and CUDA build of torch present"


def _nvcc_version():
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip().splitlines()[-1]


with_cuda, cuda_reason = _want_cuda()
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

# torch.utils.cpp_extension picks the C++ standard its headers need (C++20 from torch 2.13).
cxx_flags = ["-O3"]
# at::parallel_for is a header template that runs serially unless the including file is
# compiled with OpenMP. The runtime is torch's own libgomp.so.1 (loaded by libtorch_cpu,
# which the extension links): no -fopenmp at link time, so no second thread pool.
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _has_sm90a(arch_list):
    """Whether TORCH_CUDA_ARCH_LIST ("8.0;9.0a", "9.0a+PTX", space separated too) names 9.0a."""
    return any(a.strip().lower().split("+")[0] == "9.0a" for a in arch_list.replace(" ", ";").split(";"))


define_macros = [("PYOWT_WITH_CUDA", "1" if with_cuda else "0"),
                 ("PYOWT_SM90A", "1" if with_cuda and _has_sm90a(os.environ.get("TORCH_CUDA_ARCH_LIST", "")) else "0")]
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(ROOT, "csrc")]
libraries = []
library_dirs = []
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs.append(_missing_header_dir())
    library_dirs, libraries = _cublaslt_link()
    extension_cls = cpp_extension.CUDAExtension
else:
    extension_cls = cpp_extension.CppExtension

extension = extension_cls(
    name="pyowt._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    libraries=libraries,
    library_dirs=library_dirs,
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
    extra_link_args=_torch_libstdcxx(),
)


class BuildExtension(cpp_extension.BuildExtension):
    """Compiles ``pyowt._C`` and records what it was built for beside it.

    ``pyowt`` reads ``_build_info.json`` at import and refuses (with a warning) an
    extension built for another torch, instead of crashing on a missing symbol.
    """

    def run(self):
        super().run()
        info = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "with_cuda": with_cuda,
            "cuda_reason": cuda_reason,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
            "nvcc": _nvcc_version() if with_cuda else None,
            "cxx": os.environ.get("CXX", "c++"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sources": sources,
        }
        ext_path = self.get_ext_fullpath("pyowt._C")
        _check_one_cxx_runtime(ext_path)
        os.makedirs(os.path.dirname(ext_path), exist_ok=True)
        with open(os.path.join(os.path.dirname(ext_path), "_build_info.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        print(f"pyowt: built _C (CUDA: {with_cuda}; {cuda_reason})")


packages = find_packages(include=["pyowt", "pyowt.*"]) + ["pyowt.kernels"]

setup(
    packages=packages,
    # The Triton kernels live in kernels/ at the top level but install as pyowt.kernels:
    # a top-level package named "kernels" would collide with others in site-packages.
    package_dir={"pyowt.kernels": "kernels"},
    package_data={"pyowt": ["_build_info.json", "data/*"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
