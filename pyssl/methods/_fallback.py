"""Plain-PyTorch stand-ins, used ONLY when the fused modules are missing from this build.

The methods import ``pyssl.losses.MoCoLoss``, ``pyssl.momentum`` and ``pyssl.augment`` first and
fall back to these when that import fails (a checkout of this branch without those pieces).
They follow the same call signatures, so nothing else changes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---- momentum encoder ----------------------------------------------------------------------------


@torch.no_grad()
def update_momentum(ema_model: nn.Module, model: nn.Module, m: float) -> None:
    """ema <- m * ema + (1 - m) * model, for every parameter (buffers are copied as they are)."""
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.mul_(m).add_(p.detach(), alpha=1.0 - m)


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float) -> float:
    """Cosine ramp from ``start_value`` (step 0) to ``end_value`` (step ``max_steps``)."""
    if max_steps <= 1:
        return end_value
    progress = min(max(step, 0), max_steps - 1) / (max_steps - 1)
    return end_value - (end_value - start_value) * (math.cos(math.pi * progress) + 1) / 2


# ---- MoCo loss with a queue of negatives --------------------------------------------------------


class MoCoLoss(nn.Module):
    """InfoNCE against the key of the same image and a FIFO queue of past keys (unfused)."""

    def __init__(self, temperature: float = 0.2, queue_size: int = 65536, dim: int = 128):
        super().__init__()
        self.temperature = float(temperature)
        self.queue_size = int(queue_size)
        self.register_buffer("queue", F.normalize(torch.randn(self.queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        q = F.normalize(query.float(), dim=1)
        k = F.normalize(key.detach().float(), dim=1)
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ self.queue.clone().T
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        self._enqueue(k)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: Tensor) -> None:
        n = min(len(k), self.queue_size)
        ptr = int(self.queue_ptr)
        idx = (torch.arange(n, device=k.device) + ptr) % self.queue_size
        self.queue[idx] = k[-n:].to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % self.queue_size)


# ---- batched GPU-friendly augmentation -----------------------------------------------------------


def _rand(n, generator, device):
    return torch.rand(n, generator=generator, device="cpu").to(device)


class SimCLRAugment(nn.Module):
    """SimCLR's augmentation on a whole batch: random resized crop, horizontal flip, colour
    jitter, grayscale, Gaussian blur, solarisation, then normalisation. Plain PyTorch."""

    def __init__(self, size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2,
                 p_blur=0.5, sigma=(0.1, 2.0), p_solarize=0.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 p_flip=0.5):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.jitter, self.sigma = tuple(scale), tuple(jitter), tuple(sigma)
        self.p_jitter, self.p_gray, self.p_blur, self.p_solarize, self.p_flip = p_jitter, p_gray, p_blur, p_solarize, p_flip
        self.mean, self.std = tuple(mean), tuple(std)

    def views(self, images: Tensor, n: int = 2, generator=None) -> list[Tensor]:
        return [self(images, generator=generator) for _ in range(n)]

    def forward(self, images: Tensor, generator=None) -> Tensor:
        x = images.float() / 255.0 if not images.is_floating_point() else images.float()
        b, c, h, w = x.shape
        dev = x.device
        # random resized crop (ratio 3/4..4/3) via an affine sampling grid
        area = torch.empty(b).uniform_(*self.scale, generator=generator).to(dev)
        logr = (_rand(b, generator, dev) * 2 - 1) * math.log(4 / 3)
        ratio = torch.exp(logr)
        cw = torch.sqrt(area * ratio).clamp(max=1.0)
        ch = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (_rand(b, generator, dev) * 2 - 1) * (1 - cw)
        cy = (_rand(b, generator, dev) * 2 - 1) * (1 - ch)
        flip = torch.where(_rand(b, generator, dev) < self.p_flip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = ch, cy
        grid = F.affine_grid(theta, (b, c, *self.size), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if c == 3:
            x = self._jitter(x, generator)
            gray = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
            do_gray = (_rand(b, generator, dev) < self.p_gray).view(b, 1, 1, 1)
            x = torch.where(do_gray, gray.expand_as(x), x)
        else:
            x = self._jitter(x, generator, color=False)
        if self.p_blur > 0:
            x = self._blur(x, generator)
        if self.p_solarize > 0:
            sol = (_rand(b, generator, dev) < self.p_solarize).view(b, 1, 1, 1)
            x = torch.where(sol & (x >= 0.5), 1.0 - x, x)
        mean = torch.tensor(self.mean[:c] if len(self.mean) >= c else self.mean * c, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(self.std[:c] if len(self.std) >= c else self.std * c, device=dev).view(1, -1, 1, 1)
        return (x - mean) / std

    def _jitter(self, x, generator, color=True):
        b, dev = x.shape[0], x.device
        on = (_rand(b, generator, dev) < self.p_jitter).view(b, 1, 1, 1)
        bri, con, sat, _hue = self.jitter
        y = x * (1 + (_rand(b, generator, dev) * 2 - 1) * bri).view(b, 1, 1, 1)
        m = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - m) * (1 + (_rand(b, generator, dev) * 2 - 1) * con).view(b, 1, 1, 1) + m
        if color:
            g = y.mean(1, keepdim=True)
            y = (y - g) * (1 + (_rand(b, generator, dev) * 2 - 1) * sat).view(b, 1, 1, 1) + g
        return torch.where(on, y.clamp(0, 1), x)

    def _blur(self, x, generator):
        b, c, h, w = x.shape
        dev = x.device
        k = max(3, (min(h, w) // 10) | 1)
        sig = torch.empty(b).uniform_(*self.sigma, generator=generator).to(dev)
        r = torch.arange(k, device=dev, dtype=x.dtype) - k // 2
        ker = torch.exp(-(r.view(1, -1) ** 2) / (2 * sig.view(-1, 1) ** 2))
        ker = ker / ker.sum(1, keepdim=True)
        on = (_rand(b, generator, dev) < self.p_blur).view(b, 1, 1, 1)
        y = x.reshape(1, b * c, h, w)
        kk = ker.repeat_interleave(c, 0)
        y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), kk.view(b * c, 1, 1, k), groups=b * c)
        y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), kk.view(b * c, 1, k, 1), groups=b * c)
        return torch.where(on, y.view(b, c, h, w), x)
