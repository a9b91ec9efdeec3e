"""Encoders built as a sequence of stages, whose stages can be named for feature extraction."""

from __future__ import annotations


class StagedEncoder:
    """Mixin of the encoders built as a sequence of stages in one ``nn.Sequential``: each records,
    while it is built, the index of every stage's last layer in ``_stage_ends``, so that a stage's
    output can be named for :func:`pyssl.eval.extract_features` (``layer=``)."""

    _stage_container: str  # attribute name of the nn.Sequential holding the stages
    _stage_ends: list[int]

    @property
    def num_stages(self) -> int:
        return len(self._stage_ends)

    def stage_name(self, stage: int) -> str:
        """Name (within this module) of the last layer of ``stage`` (negative counts from the end)."""
        n = self.num_stages
        if not -n <= stage < n:
            raise ValueError(f"{type(self).__name__}: stage must be in [{-n}, {n}), got {stage}")
        return f"{self._stage_container}.{self._stage_ends[stage]}"
