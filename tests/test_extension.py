"""Loading the compiled extension: import order, and clear errors for a missing or stale build."""

import subprocess
import sys
import types

import pytest
import torch

import pyssl
from pyssl import _loader


def test_import_pyssl_before_torch_in_a_fresh_process():
    code = "import pyssl, torch; print(torch.ops.pyssl.ntxent_forward.default.name())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "pyssl::ntxent_forward" in out.stdout


def test_extension_reports_its_build():
    assert pyssl._C.torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(pyssl.cuda_kernels_built, bool)
    # A CPU-only torch never gets CUDA kernels compiled in.
    if torch.version.cuda is None:
        assert not pyssl.cuda_kernels_built


def test_missing_extension_is_a_helpful_import_error(monkeypatch):
    def fail(name):
        raise ImportError(f"No module named '{name}'")

    monkeypatch.setattr(_loader.importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation"):
        _loader.load_extension()


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    stale = types.SimpleNamespace(torch_version="1.13.1", with_cuda=False)
    monkeypatch.setattr(_loader.importlib, "import_module", lambda name: stale)
    with pytest.raises(ImportError, match=r"built against torch 1\.13\.1"):
        _loader.load_extension()


@pytest.mark.parametrize(
    "built,running,same",
    [("2.14.1", "2.14.1+cu130", True), ("2.14.0+cpu", "2.14.1", True), ("2.13.0", "2.14.1", False)],
)
def test_release_comparison(built, running, same):
    assert _loader._same_release(built, running) is same
