"""Label / mask propagation with the attention of a video colorization model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pyssl.methods.video_colorization import VideoColorization, attention, split_frames


def _iou_and_acc(pred: Tensor, truth: Tensor, num_classes: int) -> tuple[float, float]:
    # Mean over objects (classes >= 1, those present in the truth) of the IoU, and pixel accuracy.
    ious = []
    for k in range(1, num_classes):
        t, p = truth == k, pred == k
        present = t.flatten(1).any(1)
        if present.any():
            inter = (t & p).flatten(1).sum(1).float()
            union = (t | p).flatten(1).sum(1).float()
            ious.append((inter / union.clamp_min(1))[present])
    miou = float(torch.cat(ious).mean()) if ious else float("nan")
    return miou, float((pred == truth).float().mean())


@torch.no_grad()
def propagate_masks(model: VideoColorization, videos: Tensor, masks: Tensor, batch_size: int = 32) -> dict[str, float]:
    """Carry frame 0's object masks to every later frame with the model's attention.

    For each later frame the soft labels are ``sum_i A_ij onehot(label_i)`` at feature
    resolution (frame-0 labels area-averaged to it), upsampled bilinearly to the frame size
    and arg-maxed. Returns the mean object IoU (J) and pixel accuracy, beside the same for
    the baseline that copies frame 0's labels from the same location (``*_copy``).
    """
    frames_all = split_frames(videos)
    n, t = frames_all.shape[:2]
    num_classes = int(masks.max()) + 1
    was = model.training
    model.eval()
    preds = []
    try:
        for s in range(0, n, batch_size):
            frames = frames_all[s : s + batch_size]
            m0 = masks[s : s + batch_size, 0]
            b = frames.shape[0]
            feats = model.embed(frames.flatten(0, 1))
            feats = feats.view(b, t, *feats.shape[1:])
            onehot = F.one_hot(m0, num_classes).permute(0, 3, 1, 2).float()
            soft0 = F.avg_pool2d(onehot, model.downsample).flatten(2)  # (b, K, hw)
            out = []
            for k in range(1, t):
                a = attention(feats[:, 0], feats[:, k], model.temperature)
                lab = (soft0 @ a).view(b, num_classes, *feats.shape[-2:])
                lab = F.interpolate(lab, size=masks.shape[-2:], mode="bilinear", align_corners=False)
                out.append(lab.argmax(1))
            preds.append(torch.stack(out, 1))
    finally:
        model.train(was)
    pred = torch.cat(preds)  # (n, t-1, H, W)
    truth = masks[:, 1:]
    copy = masks[:, :1].expand_as(truth)
    iou, acc = _iou_and_acc(pred.flatten(0, 1), truth.flatten(0, 1), num_classes)
    iou_c, acc_c = _iou_and_acc(copy.flatten(0, 1), truth.flatten(0, 1), num_classes)
    return {"mask_iou": iou, "pixel_acc": acc, "mask_iou_copy": iou_c, "pixel_acc_copy": acc_c}
