"""Loads the compiled extension pyssl._C and checks it matches the torch in use."""

from __future__ import annotations

import importlib
import os

import torch  # the extension links against torch's libraries: load them first

_BUILD_HINT = (
    "Build it against the torch you are running: `pip install --no-build-isolation .` "
    "(or `make build`) in pyssl's source tree."
)


class ExtensionMissingWarning(UserWarning):
    """import pyssl found no usable compiled extension and runs on eager PyTorch kernels."""


def _same_release(built: str, running: str) -> bool:
    def major_minor(v: str) -> tuple[str, ...]:
        return tuple(v.split("+")[0].split(".")[:2])

    return major_minor(built) == major_minor(running)


def load_extension():
    try:
        ext = importlib.import_module("pyssl._C")
    except ImportError as err:
        here = os.path.dirname(os.path.abspath(__file__))
        shadow = ""
        if os.path.exists(os.path.join(os.path.dirname(here), "pyproject.toml")):
            shadow = (
                f" Note: pyssl was imported from its source tree ({here}); if it is installed, "
                "run Python from another folder so the installed package is the one imported."
            )
        raise ImportError(
            f"pyssl's compiled extension pyssl._C could not be loaded ({err}). {_BUILD_HINT}{shadow}"
        ) from err
    if not _same_release(ext.torch_version, torch.__version__):
        raise ImportError(
            f"pyssl._C was built against torch {ext.torch_version} but torch {torch.__version__} "
            f"is imported. {_BUILD_HINT}"
        )
    return ext
