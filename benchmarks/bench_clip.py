"""CLIP loss with a learnable logit scale, forward + backward: pyssl vs eager PyTorch vs open_clip.

    python benchmarks/bench_clip.py [--device cuda] [--quick]

Eager and open_clip get features normalised by F.normalize first (open_clip's model does that
before its loss); pyssl's fused op normalises inside.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import embedding_pair, run_benchmark  # noqa: E402


def _inputs(config, device):
    image, text = embedding_pair(config, device)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return image, text, scale


def _step(loss_fn, image, text, scale):
    def step():
        image.grad = text.grad = scale.grad = None
        loss_fn(image, text, scale).backward()

    return step


def pyssl_candidate(config, device):
    import pyssl

    return _step(pyssl.losses.ClipLoss(), *_inputs(config, device))


def eager_candidate(config, device):
    from pyssl import reference

    return _step(lambda image, text, scale: reference.infonce(image, text, scale, True), *_inputs(config, device))


def open_clip_candidate(config, device):
    from open_clip.loss import ClipLoss

    loss = ClipLoss()
    return _step(lambda i, t, s: loss(F.normalize(i, dim=1), F.normalize(t, dim=1), s), *_inputs(config, device))


CANDIDATES = {"pyssl": pyssl_candidate, "eager": eager_candidate, "open_clip": open_clip_candidate}

if __name__ == "__main__":
    on_cuda = "--device" in sys.argv and "cuda" in sys.argv[sys.argv.index("--device") + 1]
    configs = (
        [{"n": 32768, "d": 512, "dtype": "bfloat16"}]
        if on_cuda
        else [{"n": 8192, "d": 128, "dtype": "float32"}, {"n": 2048, "d": 512, "dtype": "float32"}]
    )
    run_benchmark(__file__, CANDIDATES, configs)
