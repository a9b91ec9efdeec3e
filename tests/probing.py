"""The learning tests' measure: the trained encoder beside the same encoder at random init, on
the held-out split, by kNN (k = 20, all labels) and a linear probe with 10 % of the labels."""

from __future__ import annotations

from pyssl.eval import balanced_subset, extract_features, knn_predict, linear_probe


def knn_and_probe(method, train, test) -> tuple[float, float]:
    """(kNN accuracy, 10 %-label linear-probe accuracy) of ``method.backbone``'s features."""
    method.eval()
    tr = extract_features(method.backbone, train.images, method.normalize)
    te = extract_features(method.backbone, test.images, method.normalize)
    knn = (knn_predict(tr, train.labels, te, k=20, t=0.1, num_classes=10) == test.labels).float().mean().item()
    keep = balanced_subset(train.labels, 0.1, 0)
    return knn, linear_probe(tr[keep], train.labels[keep], te, test.labels, num_classes=10)


def trained_and_random(trainer, random_init) -> dict[str, tuple[float, float]]:
    """:func:`knn_and_probe` of a trainer's method after ``fit`` and of its copy from before."""
    train, test = trainer.train_data, trainer.test_data
    return {"trained": knn_and_probe(trainer.method, train, test), "random": knn_and_probe(random_init, train, test)}
