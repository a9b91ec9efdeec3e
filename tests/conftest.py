import os
import random
import zlib

import pytest
import torch

# Fixed per-test seeds would make every run see the same inputs; draw fresh ones but print
# the seed so a failure can be replayed with PYSSL_TEST_SEED.

_SEED = int(os.environ.get("PYSSL_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"pyssl test seed: {_SEED} (replay with PYSSL_TEST_SEED={_SEED})"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = (_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def cuda_ready() -> bool:
    import pyssl

    return torch.cuda.is_available() and pyssl.cuda_kernels_built
