"""Drop-in loss modules backed by pyssl's fused kernels."""
from pyssl.losses.infonce import ClipLoss, InfoNCELoss, NTXentLoss
from pyssl.losses.moco import MoCoLoss

__all__ = ["NTXentLoss", "InfoNCELoss", "ClipLoss", "MoCoLoss"]
