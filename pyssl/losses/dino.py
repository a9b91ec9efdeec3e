r"""DINO's teacher-student cross-entropy over K prototypes (Caron et al., 2021), without the
views x views x batch x K tensors.

For teacher views :math:`t = 1..T` (the global crops) and student views :math:`s = 1..S` (the
same global crops first, then the local ones),

.. math::
    L = \frac{1}{B\,n} \sum_{s} \sum_{t \ne s} \sum_{b} -\,q_{t,b} \cdot \log p_{s,b},\quad
    q_t = \operatorname{softmax}\!\Big(\frac{y_t - c}{\tau_t}\Big),\;
    p_s = \operatorname{softmax}\!\Big(\frac{x_s}{\tau_s}\Big),

:math:`n` the number of (t, s) pairs with :math:`t \ne s` and :math:`c` the centre, an EMA of
the teacher outputs' batch mean. Since :math:`\sum_{t \ne s} q_t = Q - q_s [s \le T]` with
:math:`Q = \sum_t q_t`, each student view needs one weighted log-softmax, and as
:math:`\partial L_s / \partial x_s = (n_s\, p_s - W_s) / (\tau_s B n)` (:math:`W_s` the summed
teacher weights, :math:`n_s` how many there are) the backward recomputes :math:`p_s` from the
student's own output instead of keeping it. Apart from the inputs, no more than a few
:math:`B \times K` matrices are alive at once, at the paper's K = 65,536 as at any other
(lightly's stacks all views: :math:`(T + S) B K` floats, and as many again for autograd).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl import distributed, reference


class _StudentCrossEntropy(torch.autograd.Function):
    """sum_b -W_b . log_softmax(x_b / tau); the backward recomputes the softmax from x instead of
    keeping a (B, K) matrix per view."""

    @staticmethod
    def forward(ctx, student: Tensor, weights: Tensor, temperature: float) -> Tensor:
        log_p = F.log_softmax(student.to(weights.dtype) / temperature, dim=-1)
        loss = -(weights * log_p).sum()
        ctx.save_for_backward(student, weights)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        student, weights = ctx.saved_tensors
        p = F.softmax(student.to(weights.dtype) / ctx.temperature, dim=-1)
        g = (weights.sum(-1, keepdim=True) * p - weights) * (grad / ctx.temperature)
        return g.to(student.dtype), None, None


class DINOLoss(nn.Module):
    """Drop-in for lightly's ``DINOLoss``: same arguments, values, gradients and centre updates.

    Args:
        output_dim: K, the number of prototypes (the projection head's output width).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: the teacher temperature,
            linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the first epochs when
            ``forward`` is given ``epoch`` (lightly's backward-compatible schedule).
        student_temp: the student temperature.
        center_momentum: the centre's EMA momentum (its batch mean is averaged over the
            processes under torch.distributed).
        center_mode: ``"mean"`` (the only mode, as in lightly).

    ``forward(teacher_out, student_out, teacher_temp=None, epoch=None)`` takes lists of
    ``(B, K)`` tensors, one per view (the teacher's views are the student's first ones), and
    updates the centre with the teacher outputs.
    """

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        center_mode: str = "mean",
    ) -> None:
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"DINOLoss: unknown center_mode {center_mode!r} (only 'mean')")
        if not isinstance(output_dim, int) or output_dim < 1:
            raise ValueError(f"DINOLoss: output_dim must be a positive int, got {output_dim!r}")
        for name, value in (("teacher_temp", teacher_temp), ("student_temp", student_temp)):
            if not value > 0:
                raise ValueError(f"DINOLoss: {name} must be > 0, got {value!r}")
        self.teacher_temp, self.student_temp = teacher_temp, student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)

    def teacher_temperature(self, epoch: int | None = None, teacher_temp: float | None = None) -> float:
        """The teacher temperature ``forward`` uses for these arguments: ``teacher_temp`` when
        given, else the warm-up schedule's value at ``epoch``, else ``teacher_temp`` of the
        constructor."""
        if teacher_temp is not None:
            return float(teacher_temp)
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return float(self.teacher_temp)

    def forward(
        self,
        teacher_out: list[Tensor],
        student_out: list[Tensor],
        teacher_temp: float | None = None,
        epoch: int | None = None,
    ) -> Tensor:
        if not teacher_out or not student_out:
            raise ValueError("DINOLoss: teacher_out and student_out must each hold at least one view")
        shape = teacher_out[0].shape
        for name, views in (("teacher_out", teacher_out), ("student_out", student_out)):
            for i, v in enumerate(views):
                if not isinstance(v, Tensor) or v.dim() != 2 or v.shape != shape:
                    raise ValueError(
                        f"DINOLoss: {name}[{i}] must be a (batch, {self.center.shape[-1]}) tensor like "
                        f"teacher_out[0] {tuple(shape)}, got {tuple(getattr(v, 'shape', ()))}"
                    )
        if shape[1] != self.center.shape[-1]:
            raise ValueError(f"DINOLoss: the views have {shape[1]} outputs, output_dim is {self.center.shape[-1]}")
        t_views, s_views, batch = len(teacher_out), len(student_out), shape[0]
        n_terms = t_views * s_views - min(t_views, s_views)
        if n_terms == 0:
            raise ValueError(
                f"DINOLoss requires at least two views in total, got {t_views} teacher and {s_views} student view(s)"
            )
        temperature = self.teacher_temperature(epoch, teacher_temp)
        # float32 at least (float64 stays float64): half-precision softmaxes over K = 65,536 lose the tail
        acc = torch.promote_types(torch.promote_types(teacher_out[0].dtype, student_out[0].dtype), torch.float32)
        center = self.center.reshape(1, -1).to(acc)
        with torch.no_grad():
            teacher_probs = [F.softmax((y.detach().to(acc) - center) / temperature, dim=-1) for y in teacher_out]
            total = sum(teacher_probs[1:], teacher_probs[0])  # summed view by view: no (T, B, K) stack
        loss = 0.0
        for s, x in enumerate(student_out):
            weights = total - teacher_probs[s] if s < t_views else total
            loss = loss + _StudentCrossEntropy.apply(x, weights, self.student_temp)
        loss = loss / (n_terms * batch)
        self.update_center(teacher_out)
        return loss.to(torch.promote_types(teacher_out[0].dtype, student_out[0].dtype))

    @torch.no_grad()
    def update_center(self, teacher_out: list[Tensor]) -> None:
        """EMA of the teacher outputs' mean over views and batch (and processes)."""
        # the mean of the views' batch means (the views share one batch size): no (T, B, K) stack
        batch_center = sum(y.detach().float().mean(0) for y in teacher_out) / len(teacher_out)
        batch_center = batch_center.reshape(1, 1, -1)
        batch_center = distributed.mean_over_ranks(batch_center)  # the identity in one process
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)


def dino_loss_reference(teacher_out, student_out, center, teacher_temp, student_temp) -> Tensor:
    """float64 reference, every view stacked as lightly does (:func:`pyssl.reference.dino`)."""
    return reference.dino(
        [t.double() for t in teacher_out],
        [s.double() for s in student_out],
        center.double(),
        teacher_temp,
        student_temp,
    )
