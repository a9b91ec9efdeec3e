"""Label / mask propagation with the attention of a video colorization model.

An evaluation: it lives in :mod:`pyssl.eval.propagation`; this name stays for existing imports.
"""

from pyssl.eval.propagation import propagate_masks
from pyssl.methods.video_colorization import VideoColorization, attention, split_frames

__all__ = ["propagate_masks", "VideoColorization", "attention", "split_frames"]
