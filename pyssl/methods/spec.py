"""What a method declares about itself for the trainer, the run configuration and the CLI.

Each method class sets ``spec = MethodSpec(...)``; nothing above the methods probes them for
attributes by name. The defaults a run starts from are layered, weakest first: the data set's
(:func:`pyssl.data.data_defaults`, tuned for the contrastive methods), the method's
``run_defaults``, what :meth:`Method.run_defaults_for` derives from the data (MoCo's queue size,
CLIP's vocabulary), and what the user sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: What a method trains on: images; image-text pairs (``batch = (images, tokens)``); or videos
#: (clips of frames stacked as channels).
INPUTS = ("images", "image-text", "videos")


@dataclass(frozen=True)
class MethodSpec:
    """
    Args:
        default_data: the embedded data set a run uses when none is named.
        inputs: one of :data:`INPUTS`; a run refuses data of another kind with a clear message.
        train_defaults: the optimiser the method was published with: ``optimizer``, ``lr`` (for a
            batch of 128; scaled linearly with the batch), ``weight_decay``, ``momentum``.
        run_defaults: run settings that win over the data set's (``backbone``, ``batch_size``,
            ``epochs``, ``warmup_epochs``, ``lr`` as ``{"*": rate}``, ...); a value of None
            removes the data set's setting (the method's constructor default then holds).
        sync_bn: whether the trainer converts BatchNorm to SyncBatchNorm when distributed on
            CUDA and the user left it unset (an instance can decide otherwise: MoCo's Shuffle-BN).
        teachers: ``(teacher, student)`` attribute pairs of the momentum copies: the teacher of
            ``backbone`` starts from the same weights when a run initialises its backbone.
    """

    default_data: str = "digits"
    inputs: str = "images"
    train_defaults: dict = field(
        default_factory=lambda: {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "momentum": 0.9}
    )
    run_defaults: dict = field(default_factory=dict)
    sync_bn: bool = True
    teachers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.inputs not in INPUTS:
            raise ValueError(f"MethodSpec: inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        missing = {"optimizer", "lr", "weight_decay"} - set(self.train_defaults)
        if missing:
            raise ValueError(f"MethodSpec: train_defaults lacks {', '.join(sorted(missing))}")

    @property
    def needs_texts(self) -> bool:
        return self.inputs == "image-text"
