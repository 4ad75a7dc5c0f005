"""Import without the extension, build-metadata checks, pyowt.info and the CLI."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import pyowt
from pyowt import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SNIPPET = (
    "import warnings, torch, pyowt\n"
    "x = torch.randn(2, 3, 4, requires_grad=True); b = torch.randn(3, requires_grad=True)\n"
    "y = pyowt.ops.bias_relu(x, b); y.sum().backward()\n"
    "y2 = pyowt.ops.bias_relu(x, b)\n"
    "ref = torch.relu(x + b[None, :, None])\n"
    "assert torch.equal(y, ref), 'fallback result differs from ATen'\n"
    "i = pyowt.info()\n"
    "print('PYOWT_FILE', pyowt.__file__)\n"
    "print('INFO', i['extension']['loaded'], i['ops']['bias_relu']['cpu'])\n"
)


def _run(code, env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", code],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_disabled_extension_warns_once_and_falls_back():
    r = _run(_SNIPPET, {"PYOWT_DISABLE_EXTENSION": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("running without the compiled extension") == 1, r.stderr
    assert "disabled by PYOWT_DISABLE_EXTENSION" in r.stderr
    assert "INFO False aten" in r.stdout


def test_package_without_built_extension_imports(tmp_path):
    """A copy of the package with no _C binary (as after a failed build) still works."""
    dst = tmp_path / "pyowt"
    shutil.copytree(os.path.join(ROOT, "pyowt"), dst,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "_build_info.json", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), dst / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    # An editable install's import hook would still find the source tree's binary: drop it,
    # so the copy behaves like a plain install whose build produced no _C.
    prelude = (
        "import sys; sys.path.insert(0, %r)\n"
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        % str(tmp_path)
    )
    r = _run(prelude + _SNIPPET, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert f"PYOWT_FILE {dst}" in r.stdout, r.stdout
    assert r.stderr.count("running without the compiled extension") == 1, r.stderr
    assert "pyowt._C could not be imported" in r.stderr
    assert "INFO False aten" in r.stdout


def test_extension_built_for_other_torch_is_refused(tmp_path):
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"torch": "1.13.0+cu117", "torch_cuda": "11.7"}))
    status = _extension.load_extension(str(info))
    assert not status.loaded
    assert "built for torch 1.13.0+cu117" in status.reason and torch.__version__ in status.reason


def test_unreadable_build_info_does_not_block_loading(tmp_path):
    info = tmp_path / "_build_info.json"
    info.write_text("{not json")
    status = _extension.load_extension(str(info))
    assert status.loaded == _extension.STATUS.loaded


@pytest.mark.skipif(not _extension.STATUS.loaded, reason="extension not built")
def test_build_metadata_recorded():
    build = pyowt.info()["extension"]["build"]
    assert build["torch"] == torch.__version__
    assert build["torch_cuda"] == torch.version.cuda
    if build["with_cuda"]:
        assert build["cuda_archs"] and build["nvcc"]
        assert any(s.endswith(".cu") for s in build["sources"])


def test_info_and_cli():
    i = pyowt.info()
    for key in ("pyowt", "torch", "triton", "extension", "ops", "cuda_available", "nccl", "gloo"):
        assert key in i
    assert i["ops"]["bias_relu"]["cpu"] in ("cpu", "aten")
    r = subprocess.run([sys.executable, "-m", "pyowt", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["torch"] == torch.__version__
    assert printed["extension"]["loaded"] == _extension.STATUS.loaded


def test_cli_rejects_unknown_command():
    r = subprocess.run([sys.executable, "-m", "pyowt", "frobnicate"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr
