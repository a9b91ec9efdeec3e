"""Drop-in loss modules: the InfoNCE family and MoCo on pyssl's fused kernels; the metric-learning
losses (contrastive, triplet, N-pair, lifted structure, NCE, soft nearest neighbours) and the
non-contrastive ones (negative cosine similarity, Barlow Twins, VICReg, DINO) in plain,
memory-bounded PyTorch."""

from pyssl.losses.dino import DINOLoss
from pyssl.losses.infonce import ClipLoss, InfoNCELoss, NTXentLoss
from pyssl.losses.metric import (
    ContrastiveLoss,
    LiftedStructureLoss,
    NCELoss,
    NPairLoss,
    SoftNearestNeighborsLoss,
    TripletLoss,
)
from pyssl.losses.moco import MoCoLoss
from pyssl.losses.noncontrastive import BarlowTwinsLoss, NegativeCosineSimilarity, VICRegLoss
from pyssl.losses.swav import SwaVLoss

__all__ = [
    "NTXentLoss",
    "InfoNCELoss",
    "ClipLoss",
    "MoCoLoss",
    "ContrastiveLoss",
    "TripletLoss",
    "NPairLoss",
    "LiftedStructureLoss",
    "NCELoss",
    "SoftNearestNeighborsLoss",
    "NegativeCosineSimilarity",
    "BarlowTwinsLoss",
    "VICRegLoss",
    "DINOLoss",
    "SwaVLoss",
]
