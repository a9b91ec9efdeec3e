"""The base of every method with momentum teachers (MoCo, BYOL, MoCo v3, DINO, ...)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyssl import ops
from pyssl.methods.base import Method, MethodError
from pyssl.momentum import cosine_schedule


class MomentumMethod(Method):
    """A method whose teachers are exponential moving averages of its students.

    The class declares its ``(teacher, student)`` attribute pairs in ``spec.teachers``; once the
    students are built, :meth:`build_teachers` makes each teacher a frozen copy of its student.
    :meth:`update_teachers` then moves every teacher towards its student,
    :math:`\\theta_t \\leftarrow m\\,\\theta_t + (1 - m)\\,\\theta_s`, with one fused
    ``ema_update_`` call over the parameters of all pairs (one kernel launch on CUDA, however many
    pairs and tensors), at the momentum of :meth:`current_momentum`.

    Args:
        momentum: the teacher momentum ``m`` (a constant), or the start of the schedule.
        momentum_end: with it, ``m`` follows a cosine ramp from ``momentum`` to ``momentum_end``
            over training (BYOL's 0.996 -> 1), driven by the trainer's ``set_progress``.
    """

    def __init__(self, *args, momentum: float = 0.99, momentum_end: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value in (("momentum", momentum), ("momentum_end", momentum_end)):
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise MethodError(f"{type(self).__name__}: {name} must lie in [0, 1], got {value!r}")
        self.momentum, self.momentum_end = float(momentum), momentum_end

    def build_teachers(self) -> None:
        """Each teacher of ``spec.teachers`` as a frozen copy of its student (call once the
        students exist, and before any optimiser sees the parameters)."""
        pairs = type(self).spec.teachers
        if not pairs:
            raise MethodError(f"{type(self).__name__}: a MomentumMethod declares its teachers in spec.teachers")
        for teacher, student in pairs:
            module = copy.deepcopy(getattr(self, student))
            for p in module.parameters():
                p.requires_grad_(False)
            setattr(self, teacher, module)

    def teacher_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, teacher), getattr(self, student)) for teacher, student in type(self).spec.teachers]

    def current_momentum(self) -> float:
        if self.momentum_end is None:
            return self.momentum
        return cosine_schedule(self.step, self.max_steps, self.momentum, self.momentum_end)

    @torch.no_grad()
    def update_teachers(self, m: float | None = None) -> None:
        """One EMA step of every teacher (``m``: default :meth:`current_momentum`)."""
        teachers, students = [], []
        for teacher, student in self.teacher_pairs():
            t, s = list(teacher.parameters()), list(student.parameters())
            if len(t) != len(s):
                raise MethodError(f"{type(self).__name__}: a teacher has {len(t)} parameters, its student {len(s)}")
            teachers += t
            students += s
        ops.ema_update_(teachers, students, self.current_momentum() if m is None else m)
