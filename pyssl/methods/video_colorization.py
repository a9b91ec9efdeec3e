"""Tracking emerges by colorizing videos (Vondrick et al., 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl.methods._pretext import MethodError, PretextMethod, own_encoder_only, pretext_spec
from pyssl.methods.registry import register
from pyssl.pretext.lab import ABQuantizer, rgb_to_lab
from pyssl.pretext.nets import Backbone, ConvEncoder, FirstFrame, LabChannels, normalized_lab


def split_frames(videos: Tensor) -> Tensor:
    """``(N, T * 3, H, W)`` (how videos are stored as images) or ``(N, T, 3, H, W)`` -> ``(N, T, 3, H, W)``."""
    if videos.dim() == 5:
        if videos.shape[2] != 3:
            raise ValueError(f"video_colorization: expected RGB frames (N, T, 3, H, W), got {tuple(videos.shape)}")
        return videos
    if videos.dim() != 4 or videos.shape[1] % 3 or videos.shape[1] < 6:
        raise ValueError(
            "video_colorization: expected videos as (N, T*3, H, W) images with T >= 2 RGB frames, "
            f"or (N, T, 3, H, W); got {tuple(videos.shape)}"
        )
    n, c, h, w = videos.shape
    return videos.view(n, c // 3, 3, h, w)


def attention(ref_feats: Tensor, tgt_feats: Tensor, temperature: float = 1.0) -> Tensor:
    """``A[n, i, j] = softmax_i(f_i^T f_j / temperature)``: how much target location ``j``
    copies from reference location ``i``. Features ``(N, D, h, w)`` -> ``(N, hw_ref, hw_tgt)``."""
    fr, ft = ref_feats.flatten(2), tgt_feats.flatten(2)
    return torch.softmax(fr.transpose(1, 2) @ ft / temperature, dim=1)


@register("video_colorization")
class VideoColorization(PretextMethod):
    """Colourise a grey target frame by pointing into a colourful reference frame.

    An embedding network ``f`` (conv stages on the L channel, then a 1x1 projection to
    ``embed_dim``) maps each frame to per-location features at 1/``2^(len(widths)-1)`` of
    the resolution. Target location ``j`` predicts its colour as the attention-weighted
    sum of the reference colours, ``A_ij = softmax_i(f_i^T f_j / temperature)``; colours
    are the ab values quantised into the in-gamut bins of spacing ``grid`` (one-hot), and
    the loss is the cross-entropy of the predicted distribution at the target's true bin.
    Copying a colour is only right if it points to the same surface, so tracking emerges:
    :func:`pyssl.eval.propagation.propagate_masks` uses the same attention to carry object
    masks from the first frame to later ones.

    Videos come as ``(N, T * 3, H, W)`` uint8 images (how :mod:`pyssl.data.colour` stores
    them) or ``(N, T, 3, H, W)``; the reference is frame 0, the target a random later frame.
    The backbone (for linear probes) pools ``f``'s stages on the first frame.

    Args:
        image_size, in_channels: the frame size and ``T * 3``.
        widths, embed_dim: the embedding network.
        grid: ab bin spacing of the colour classes.
        temperature: softmax temperature of the attention (1 in the paper).
        backbone, mean, std, hidden_dim: accepted for the CLI (``backbone`` must be "small"); unused.
    """

    spec = pretext_spec("videos", inputs="videos")

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 12,
        widths: tuple[int, ...] = (32, 64),
        embed_dim: int = 64,
        grid: float = 20.0,
        temperature: float = 1.0,
        backbone: str = "small",
        mean=None,
        std=None,
        hidden_dim: int | None = None,
    ):
        own_encoder_only("video_colorization", backbone)
        super().__init__(image_size, 3, mean=(0.0,) * 3, std=(1.0,) * 3)
        if in_channels % 3 or in_channels < 6:
            raise MethodError(f"video_colorization: in_channels must be T * 3 with T >= 2 frames, got {in_channels}")
        if not temperature > 0:
            raise MethodError(f"video_colorization: temperature must be > 0, got {temperature}")
        self.frames = in_channels // 3
        self.temperature = float(temperature)
        self.quantizer = ABQuantizer(grid)
        widths = tuple(widths)
        self.encoder = ConvEncoder(1, widths)
        self.project = nn.Conv2d(widths[-1], embed_dim, 1)
        self.backbone = Backbone(nn.Sequential(FirstFrame(), LabChannels("L")), self.encoder, self.encoder.out_dim)

    @property
    def downsample(self) -> int:
        return self.encoder.downsample

    def check_images(self, images: Tensor) -> None:
        frames = split_frames(images)
        need = self.downsample
        if frames.shape[-1] % need or frames.shape[-2] % need:
            raise ValueError(
                f"video_colorization: frame size {frames.shape[-2]}x{frames.shape[-1]} must be a "
                f"multiple of {need}; the minimum is {need}x{need}"
            )

    def normalize(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0 if not images.is_floating_point() else images.float()
        return x

    def embed(self, frames: Tensor) -> Tensor:
        """RGB frames ``(B, 3, H, W)`` -> features ``(B, embed_dim, h, w)`` from their L channel only."""
        x = frames.float() / 255.0 if not frames.is_floating_point() else frames.float()
        return self.project(self.encoder.forward_features(normalized_lab(x)[:, :1]))

    def colour_bins(self, frames: Tensor) -> Tensor:
        x = frames.float() / 255.0 if not frames.is_floating_point() else frames.float()
        ab = F.avg_pool2d(rgb_to_lab(x)[:, 1:], self.downsample) if self.downsample > 1 else rgb_to_lab(x)[:, 1:]
        return self.quantizer.encode(ab, dim=1).flatten(1)  # (B, hw)

    def pretext_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        frames = split_frames(images)
        n, t = frames.shape[:2]
        target_t = int(torch.randint(1, t, ()))
        pair = torch.cat([frames[:, 0], frames[:, target_t]])
        feats = self.embed(pair)
        bins = self.colour_bins(pair)
        ref_bins, tgt_bins = bins[:n], bins[n:]
        a = attention(feats[:n], feats[n:], self.temperature)  # (N, hw, hw)
        # Predicted colour distribution of target j: sum_i A_ij onehot(ref colour i), a scatter.
        q = self.quantizer.num_bins
        pred = torch.zeros(n, q, a.shape[2], device=a.device, dtype=a.dtype)
        pred.scatter_add_(1, ref_bins.unsqueeze(-1).expand(-1, -1, a.shape[2]), a)
        loss = F.nll_loss(torch.log(pred.clamp_min(1e-8)), tgt_bins)
        with torch.no_grad():
            metrics = {
                "colour_acc": (pred.argmax(1) == tgt_bins).float().mean(),
                # Copying the colour at the same location: the no-motion baseline.
                "colour_acc_copy": (ref_bins == tgt_bins).float().mean(),
            }
        return loss, metrics
