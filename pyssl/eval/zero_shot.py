"""Zero-shot classification of an image-text model (CLIP) with text prompts."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def zero_shot_accuracy(model: nn.Module, images: Tensor, labels: Tensor, prompts, batch_size: int = 512) -> float:
    """Accuracy of classifying ``images`` with no labelled example: each image goes to the class
    whose prompts' embedding (``model.zero_shot_classifier(prompts)``, one list of prompts per
    class, in label order) is the most cosine-similar to its own (``model.encode_image``).
    ``model`` is an image-text method such as :class:`pyssl.methods.CLIP`."""
    if not hasattr(model, "zero_shot_classifier") or not hasattr(model, "encode_image"):
        raise ValueError(f"zero-shot classification needs an image-text model, got {type(model).__name__}")
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"zero_shot_accuracy: {len(images)} images and {len(labels)} labels (need as many, > 0)")
    classifier = model.zero_shot_classifier(prompts)
    was = model.training
    model.eval()
    try:
        hits = 0
        for i in range(0, len(images), batch_size):
            scores = model.encode_image(images[i : i + batch_size]) @ classifier.T
            hits += int((scores.argmax(1) == labels[i : i + batch_size].to(scores.device)).sum())
    finally:
        model.train(was)
    return hits / len(images)


def zero_shot_prompts(model: nn.Module, data_spec: str, classes) -> list[list[str]]:
    """The prompts a run is classified with: the captioned digits' spell the digits out, as their
    captions do; other data names its classes (``ValueError`` when the vocabulary lacks them)."""
    if data_spec.partition(":")[0].lower() == "captioned_digits":
        return model.digit_prompts()
    return model.class_prompts(classes)


def zero_shot_comparison(trained: nn.Module, random_init: nn.Module, test, data_spec: str):
    """``(prompts, trained accuracy, random-init accuracy)`` on the test images, no label used."""
    prompts = zero_shot_prompts(trained, data_spec, test.classes)
    return (
        prompts,
        zero_shot_accuracy(trained, test.images, test.labels, prompts),
        zero_shot_accuracy(random_init, test.images, test.labels, prompts),
    )
