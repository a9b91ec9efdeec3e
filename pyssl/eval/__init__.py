"""Evaluation of a (frozen or fine-tuned) encoder with a fraction of the labels.

- :func:`knn_predict`: weighted kNN on cosine similarity, votes ``exp(sim / t)`` (InstDisc;
  k=200, t=0.1 as in lightly's CIFAR-10 benchmark).
- :func:`extract_features` (with ``layer=``, :func:`resolve_layer`, :func:`middle_layer`): frozen
  features of the output or of an intermediate layer.
- :func:`linear_probe`: a linear classifier on frozen, standardised features (full-batch L-BFGS
  with L2 regularisation: deterministic and quick).
- :func:`fine_tune`: the encoder plus a linear layer trained end to end.
- :func:`balanced_subset`: a class-balanced fraction of the labelled images (>= 1 per class).
- :func:`evaluate_encoders`: all of it for several encoders (raw pixels and a random-init
  encoder as baselines) and label fractions; :func:`format_table` prints it.
"""

from pyssl.eval.features import extract_features, middle_layer, resolve_layer
from pyssl.eval.knn import knn_predict
from pyssl.eval.probes import balanced_subset, fine_tune, linear_probe
from pyssl.eval.protocols import PROTOCOLS, evaluate_encoders, format_table
from pyssl.eval.zero_shot import zero_shot_accuracy

__all__ = [
    "extract_features",
    "knn_predict",
    "balanced_subset",
    "linear_probe",
    "fine_tune",
    "evaluate_encoders",
    "format_table",
    "zero_shot_accuracy",
    "PROTOCOLS",
    "middle_layer",
    "resolve_layer",
]
