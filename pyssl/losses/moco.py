"""MoCo's contrastive loss against a queue of past keys, on a fused one-sweep kernel.

The (N x (K+1)) logit matrix is never materialised: the forward sweeps the queue once with
an online log-sum-exp and, since the loss is a scalar, also accumulates the only thing the
backward needs from the queue (the probability-weighted queue sum per query). The backward
therefore never reads the queue, and the keys can be enqueued right after the forward.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyssl import distributed, ops


class MoCoLoss(nn.Module):
    r"""InfoNCE of MoCo: each query against its key (positive) and a queue of negatives.

    With :math:`u_i, v_i` the normalised query and key and :math:`q_j` the queue rows
    (stored normalised):

    .. math::
        \mathcal{L} = \frac{1}{N}\sum_{i=1}^{N} -\log
        \frac{\exp(u_i^\top v_i/\tau)}{\exp(u_i^\top v_i/\tau) + \sum_{j=1}^{K} \exp(u_i^\top q_j/\tau)}

    After the loss is computed (and when ``update`` is true, by default whenever the query
    requires grad) the normalised keys are enqueued: the queue is a ring buffer and the keys
    overwrite the oldest entries. Same value, gradients and queue contents as lightly's
    ``NTXentLoss(temperature, memory_bank_size=(queue_size, dim))`` started from the same
    queue; like lightly, a batch that would run past the end of the queue is cut there (its
    remaining keys are not enqueued) and writing restarts at row 0 on the next step.

    The queue (``queue``), the write position (``queue_ptr``) and the number of filled rows
    (``queue_len``) are buffers: they follow ``.to()`` and are saved in and restored from
    ``state_dict()``, so training resumes with the exact same queue.

    Threads may share one module: an enqueue (reading the write position, writing the rows,
    moving the position) holds a lock, so keys enqueued from several threads are all written,
    each once. A loss computed while another thread enqueues may see some of that thread's keys
    among its negatives, as the order of the threads decides. (``nn.DataParallel`` replicas
    hold copies of the buffers: their enqueues never reach this module.)

    The key gets the gradient of its positive logit (it is usually produced under
    ``torch.no_grad()`` by the momentum encoder); the queue never gets a gradient.

    Args:
        temperature: :math:`\tau > 0`.
        queue_size: number of queued keys :math:`K \ge 1`.
        dim: feature dimension of queries and keys.
        queue_init: ``"random"`` (default, as MoCo and lightly: random unit rows, the queue counts
            as full) or ``"empty"`` (only keys enqueued so far are negatives until it fills).
        queue_dtype: dtype of the stored queue; float32 by default, bfloat16 halves its memory
            (logits still accumulate in float32).
        check_inputs_finite: raise on NaN/inf inputs (costs a device synchronisation).
        gather_distributed: in a process group of more than one rank, enqueue the keys of all
            ranks (in rank order) rather than this rank's only, as MoCo does on several GPUs, so
            that the queues of all ranks stay identical (they must start identical: same seed,
            or parameters and buffers broadcast from rank 0 as the pyssl trainer does). The
            loss itself stays local: each query against its own key and the shared queue.

    Shape:
        - query, key: :math:`(N, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - output: scalar.

    Example:
        >>> loss_fn = MoCoLoss(temperature=0.2, queue_size=65536, dim=128)
        >>> query = projector(backbone(view0))
        >>> with torch.no_grad():
        ...     key = projector_momentum(backbone_momentum(view1))
        >>> loss = loss_fn(query, key)  # then enqueues key
    """

    queue: Tensor
    queue_ptr: Tensor
    queue_len: Tensor

    def __init__(
        self,
        temperature: float = 0.2,
        queue_size: int = 65536,
        dim: int = 128,
        *,
        queue_init: str = "random",
        queue_dtype: torch.dtype = torch.float32,
        check_inputs_finite: bool = False,
        gather_distributed: bool = False,
    ):
        super().__init__()
        self.temperature = ops.check_positive("MoCoLoss", "temperature", temperature)
        for name, value in (("queue_size", queue_size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"MoCoLoss: {name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"MoCoLoss: {name} must be >= 1, got {value}")
        if queue_init not in ("random", "empty"):
            raise ValueError(f"MoCoLoss: queue_init must be 'random' or 'empty', got {queue_init!r}")
        if not isinstance(queue_dtype, torch.dtype) or not queue_dtype.is_floating_point:
            raise TypeError(f"MoCoLoss: queue_dtype must be a floating torch.dtype, got {queue_dtype}")
        self.queue_size, self.dim = queue_size, dim
        self.check_inputs_finite = check_inputs_finite
        self.gather_distributed = gather_distributed
        if queue_init == "random":
            # normalised in place: no second (K, d) temporary at construction
            queue = torch.randn(queue_size, dim)
            queue = queue.div_(torch.linalg.vector_norm(queue, dim=1, keepdim=True).clamp_min_(1e-12)).to(queue_dtype)
            filled = queue_size
        else:
            queue = torch.zeros(queue_size, dim, dtype=queue_dtype)
            filled = 0
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.tensor(0, dtype=torch.long))
        self.register_buffer("queue_len", torch.tensor(filled, dtype=torch.long))
        # Python copies of queue_ptr / queue_len, so a step needs no device synchronisation;
        # dropped when a state_dict is loaded (re-read from the buffers on the next step).
        self._ptr: int | None = 0
        self._len: int | None = filled
        self._enqueue_lock = threading.Lock()
        self.register_load_state_dict_post_hook(MoCoLoss._forget_cached_position)

    # A lock can be neither pickled nor deep-copied: copies (torch.save, copy.deepcopy) get their own.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_enqueue_lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._enqueue_lock = threading.Lock()

    @staticmethod
    def _forget_cached_position(module, incompatible_keys) -> None:
        module._ptr = module._len = None

    def _position(self) -> tuple[int, int]:
        if self._ptr is None or self._len is None:
            self._ptr, self._len = int(self.queue_ptr), int(self.queue_len)
            if not (0 <= self._ptr < self.queue_size and 0 <= self._len <= self.queue_size):
                raise ValueError(
                    f"MoCoLoss: queue_ptr={self._ptr} / queue_len={self._len} do not fit a queue of {self.queue_size}"
                )
        return self._ptr, self._len

    def forward(self, query: Tensor, key: Tensor, *, update: bool | None = None, queue: Tensor | None = None) -> Tensor:
        """Loss of ``query`` against ``key`` and the queue; then enqueues ``key``.

        Args:
            update: enqueue the keys after computing the loss. ``None`` (default): when
                ``query.requires_grad`` (lightly's rule: evaluation leaves the queue unchanged).
            queue: an explicit ``(K, D)`` tensor of negatives to use instead of the module's
                queue (rows used as given); the module's queue is then neither read nor updated.
        """
        if queue is not None:
            return ops.moco(query, key, queue, self.temperature, check_inputs_finite=self.check_inputs_finite)
        ptr, filled = self._position()
        negatives = self.queue if filled == self.queue_size else self.queue[:filled]
        loss = ops.moco(query, key, negatives, self.temperature, check_inputs_finite=self.check_inputs_finite)
        if update is None:
            update = query.requires_grad
        if update:
            # The op never writes the queue (its backward does not read it either), so the
            # gathered keys can simply go through the same ring-buffer write.
            self.enqueue(distributed.gather(key.detach()) if self.gather_distributed else key)
        return loss

    @torch.no_grad()
    def enqueue(self, key: Tensor) -> None:
        """Writes the normalised ``key`` rows at the write position (cut at the queue's end)."""
        ops.check_embeddings("key", key, op="MoCoLoss.enqueue")
        if key.shape[1] != self.dim:
            raise ValueError(f"MoCoLoss.enqueue: key must have {self.dim} features, got shape {tuple(key.shape)}")
        with self._enqueue_lock:
            ptr, filled = self._position()
            count = min(key.shape[0], self.queue_size - ptr)
            rows = key[:count].detach()
            rows = F.normalize(rows.to(ops.accumulate_dtype(rows.dtype)), dim=1)
            self.queue[ptr : ptr + count].copy_(rows)
            self._ptr = (ptr + count) % self.queue_size
            self._len = min(filled + count, self.queue_size)
            self.queue_ptr.fill_(self._ptr)
            self.queue_len.fill_(self._len)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, queue_size={self.queue_size}, dim={self.dim}, "
            f"queue_dtype={self.queue.dtype}, gather_distributed={self.gather_distributed}"
        )
