"""Drop-in loss modules backed by pyssl's fused kernels."""
from pyssl.losses.infonce import ClipLoss, InfoNCELoss, NTXentLoss

__all__ = ["NTXentLoss", "InfoNCELoss", "ClipLoss"]
