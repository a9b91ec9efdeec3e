"""Every ```python block of the README runs as written.

Convention (for whoever edits the README): a ```python block is executed, in a fresh namespace,
from its first line to its last; blocks of any other kind (```shell, plain ```) are not. A block
that uses something it does not build itself (your model, your images) says so in a comment, and
the HTML comment right above it (invisible once rendered) defines small stand-ins for the test:

    <!-- test-setup: backbone = torch.nn.Flatten() -->

The setup code runs first, in the block's namespace, with ``torch`` imported. A block that needs
the CUDA emulator (``pyssl.emulation``) is skipped when pyssl was built without it. Keep the
blocks and their stand-ins small: each must run in a few seconds on the CPU.
"""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCK = re.compile(r"(?:<!--\s*test-setup:(?P<setup>.*?)-->\s*\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)


def python_blocks():
    with open(README) as f:
        text = f.read()
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        yield pytest.param(match.group("setup") or "", match.group("code"), line, id=f"README.md:{line}")


def test_the_readme_has_python_blocks_and_marks_their_setup():
    blocks = list(python_blocks())
    assert len(blocks) >= 4
    assert any(block.values[0].strip() for block in blocks)


@pytest.mark.parametrize("setup,code,line", list(python_blocks()))
def test_readme_python_block_runs(setup, code, line, tmp_path, monkeypatch):
    import pyssl.methods.registry

    monkeypatch.chdir(tmp_path)  # a block that trains writes its run directory here, not into the tree
    # a block that registers a method registers it for itself, not for the rest of the tests
    monkeypatch.setattr(pyssl.methods.registry, "_REGISTRY", dict(pyssl.methods.registry._REGISTRY))
    if "pyssl.emulation" in code:
        import pyssl.emulation

        if not pyssl.emulation.available():
            pytest.skip("pyssl was built without its CUDA emulator (PYSSL_CUDA_EMULATE=ON)")
    namespace = {"__name__": "readme"}
    exec(compile("import torch\n" + setup.strip(), f"README.md:{line} (test-setup)", "exec"), namespace)
    exec(compile("\n" * (line - 1) + code, "README.md", "exec"), namespace)
