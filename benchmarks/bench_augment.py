"""SimCLR augmentation pipeline on a batch: pyssl's fused kernel vs kornia vs torchvision v2.

    python benchmarks/bench_augment.py [--device cuda] [--quick]

Every candidate runs the same pipeline: RandomResizedCrop(size, scale=(0.08, 1)) -> horizontal
flip -> ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8 -> grayscale p=0.2 -> Gaussian blur
(kernel 10% of the side, sigma in (0.1, 2)) p=0.5 -> Normalize (ImageNet), float32 output.
pyssl and torchvision read uint8 images; kornia needs float input, converted before timing.
torchvision v2 is what a DataLoader worker runs: the transform applied image by image.
Besides the harness's time ratios, images/s is printed and stored per candidate.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import run_benchmark  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _kernel(size):
    k = max(int(0.1 * size), 1)
    return k if k % 2 else k + 1


def _images(config, device):
    g = torch.Generator().manual_seed(0)
    b, s = config["batch"], config["in"]
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(device)


def pyssl_candidate(config, device):
    import pyssl

    aug = pyssl.augment.SimCLRAugment.simclr(config["out"])
    images = _images(config, device)
    return lambda: aug(images)


def kornia_candidate(config, device):
    import kornia.augmentation as K

    size = config["out"]
    k = _kernel(size)
    aug = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.5),
        K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
    ).to(device)
    images = _images(config, device).float() / 255
    return lambda: aug(images)


def torchvision_candidate(config, device):
    from torchvision.transforms import v2

    size = config["out"]
    transform = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=False),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(_kernel(size), sigma=(0.1, 2.0))], p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    images = _images(config, device)
    return lambda: torch.stack([transform(image) for image in images])


CANDIDATES = {"pyssl": pyssl_candidate, "kornia": kornia_candidate, "torchvision_v2": torchvision_candidate}


def _add_images_per_second(path):
    with open(path) as f:
        report = json.load(f)
    for entry in report["results"]:
        batch = entry["config"]["batch"]
        print(f"\n{entry['config']}: images/s")
        for name, r in entry["candidates"].items():
            if "seconds" in r:
                r["images_per_second"] = batch / r["seconds"]
                print(f"  {name:<18}{r['images_per_second']:>12.0f}")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    on_cuda = "--device" in sys.argv and "cuda" in sys.argv[sys.argv.index("--device") + 1]
    configs = (
        [{"batch": 512, "in": 256, "out": 224}, {"batch": 1024, "in": 32, "out": 32}]
        if on_cuda
        else [{"batch": 256, "in": 32, "out": 32}, {"batch": 64, "in": 256, "out": 224}]
    )
    out = run_benchmark(__file__, CANDIDATES, configs)
    if out is not None:
        _add_images_per_second(out)
