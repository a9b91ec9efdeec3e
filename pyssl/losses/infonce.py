"""Contrastive losses of the InfoNCE family on the fused, tiled kernel.

None of these modules materialises the (batch x batch) similarity matrix: the forward keeps
one log-sum-exp per row (and per column for CLIP), the backward recomputes similarity tiles.
Inputs are unnormalised embeddings; the L2 normalisation is part of the fused op.

With ``gather_distributed=True`` in a process group of more than one rank, both inputs are
all-gathered (with gradient, :func:`pyssl.distributed.gather_with_grad`) so that every rank
computes the loss over the global batch, the other ranks' samples serving as extra negatives.
The trade-off: every rank redoes the whole loss over batch x world-size rows (cheap beside the
encoders) and in exchange gets exactly the single-process gradient once parameter gradients are
averaged over ranks, as DDP and the pyssl trainer do. Every rank must pass the same shapes.
The flag is ignored in a single process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyssl import distributed, ops
from pyssl.losses.moco import MoCoLoss


class NTXentLoss(nn.Module):
    r"""NT-Xent loss of SimCLR (normalised temperature-scaled cross-entropy).

    The two views are stacked into :math:`2N` rows :math:`z_k`, normalised to :math:`u_k`.
    Row :math:`i`'s positive is its other view :math:`p(i) = i \pm N`; every other row but
    itself is a negative:

    .. math::
        \mathcal{L} = \frac{1}{2N}\sum_{i=1}^{2N} -\log
        \frac{\exp(u_i^\top u_{p(i)}/\tau)}{\sum_{j \ne i} \exp(u_i^\top u_j/\tau)}

    Drop-in for lightly's ``NTXentLoss``: the same arguments, values and gradients.

    Args:
        temperature: :math:`\tau > 0`.
        memory_bank_size: 0 (in-batch negatives, above), or ``(K, D)``: a memory bank of the
            ``K`` latest second views, as lightly's (random unit rows at first). The loss is then
            MoCo's, each first view against its second view and the bank
            (:class:`~pyssl.losses.MoCoLoss`, the fused queue kernel, held as ``memory_bank``),
            and the second views are enqueued when the first ones require grad.
        gather_distributed: compute the loss over the batches of all ranks (see the module's
            doc); as lightly's, not with a memory bank.
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).

    Shape:
        - z0, z1: :math:`(N, D)`, any floating dtype (fp16/bf16 accumulate in float32).
        - output: scalar.

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(projector(backbone(view0)), projector(backbone(view1)))
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: int | Sequence[int] = 0,
        gather_distributed: bool = False,
        *,
        check_inputs_finite: bool = False,
    ):
        super().__init__()
        self.temperature = ops.check_positive("NTXentLoss", "temperature", temperature)
        self.check_inputs_finite = check_inputs_finite
        self.gather_distributed = gather_distributed
        self.memory_bank_size = memory_bank_size
        bank = _memory_bank_shape(memory_bank_size)
        self.memory_bank = (
            None if bank is None else MoCoLoss(self.temperature, *bank, check_inputs_finite=check_inputs_finite)
        )

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        if self.memory_bank is not None:
            return self.memory_bank(z0, z1)
        if self.gather_distributed:
            z0, z1 = distributed.gather_with_grad(z0), distributed.gather_with_grad(z1)
        return ops.ntxent(z0, z1, self.temperature, check_inputs_finite=self.check_inputs_finite)

    def extra_repr(self) -> str:
        bank = f", memory_bank_size={self.memory_bank_size}" if self.memory_bank_size else ""
        return f"temperature={self.temperature}{bank}, gather_distributed={self.gather_distributed}"


class InfoNCELoss(nn.Module):
    r"""Asymmetric InfoNCE with in-batch negatives (CPC; MoCo without a queue).

    .. math::
        \mathcal{L} = \frac{1}{N}\sum_{i=1}^{N} -\log
        \frac{\exp(\cos(q_i, k_i)/\tau)}{\sum_{j=1}^{K} \exp(\cos(q_i, k_j)/\tau)}

    The positive of query :math:`i` is key :math:`i`; keys beyond the :math:`N`-th
    (:math:`K > N`) are extra negatives.

    Args:
        temperature: :math:`\tau > 0`.
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).
        gather_distributed: compute the loss over the queries and keys of all ranks (see the
            module's doc); the gathered keys are ordered so that positives still come first.
        local_loss: with ``gather_distributed``, each rank scores only its own queries against
            all ranks' keys (open_clip's ``local_loss``): the per-rank cost falls with the number
            of ranks, and the mean of the ranks' losses is the global one, so the averaged
            gradients are the single-process ones as without it.

    Shape:
        - query: :math:`(N, D)`; key: :math:`(K, D)` with :math:`K \ge N`.
        - output: scalar.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        check_inputs_finite: bool = False,
        gather_distributed: bool = False,
        local_loss: bool = False,
    ):
        super().__init__()
        self.temperature = ops.check_positive("InfoNCELoss", "temperature", temperature)
        self.check_inputs_finite = check_inputs_finite
        self.gather_distributed = gather_distributed
        self.local_loss = local_loss

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        if self.gather_distributed and distributed.is_distributed() and query.dim() == 2:
            key = _gather_keys(query.shape[0], key)
            if self.local_loss:
                key = _own_rows_first(key, distributed.rank(), query.shape[0])
            else:
                query = distributed.gather_with_grad(query)
        return ops.infonce(
            query, key, 1.0 / self.temperature, symmetric=False, check_inputs_finite=self.check_inputs_finite
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, "
            f"local_loss={self.local_loss}"
        )


def _memory_bank_shape(memory_bank_size) -> tuple[int, int] | None:
    """(K, D) of lightly's ``memory_bank_size``, None for 0 (no bank)."""
    if isinstance(memory_bank_size, int) and not isinstance(memory_bank_size, bool):
        if memory_bank_size == 0:
            return None
        raise ValueError(
            f"NTXentLoss: memory_bank_size={memory_bank_size} does not give the feature dimension: "
            f"pass ({memory_bank_size}, dim), or 0 for no memory bank"
        )
    shape = tuple(memory_bank_size) if isinstance(memory_bank_size, Sequence) else ()
    if len(shape) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
        raise ValueError(f"NTXentLoss: memory_bank_size must be 0 or (K, D) with K, D >= 1, got {memory_bank_size!r}")
    return shape


def _gather_keys(rows: int, key: Tensor) -> Tensor:
    """All ranks' keys with each rank's query's positive at that query's gathered row: the keys
    beyond the local batch (extra negatives) go after all ranks' positives, not between them."""
    if key.dim() != 2 or key.shape[0] < rows:
        return key  # the op raises its own shape error
    positives = distributed.gather_with_grad(key[:rows])
    if key.shape[0] > rows:
        return torch.cat([positives, distributed.gather_with_grad(key[rows:])])
    return positives


def _own_rows_first(gathered: Tensor, rank: int, rows: int) -> Tensor:
    """The gathered rows with this rank's ``rows`` first, then the other ranks' in rank order, so
    that local query i's positive is key i: a softmax cross-entropy does not depend on the order
    of its columns. This is what a local loss needs of the fused op, instead of a row offset."""
    if rank == 0:
        return gathered
    start = rank * rows
    return torch.cat([gathered[start : start + rows], gathered[:start], gathered[start + rows :]])


class ClipLoss(nn.Module):
    r"""Symmetric CLIP loss: the mean of the image->text and text->image cross-entropies.

    .. math::
        S_{ij} = s \cos(x_i, y_j), \qquad
        \mathcal{L} = \frac{1}{2N}\sum_{i=1}^{N}\Big[-\log\operatorname{softmax}_j(S_{ij})_{i}
        - \log\operatorname{softmax}_i(S_{ij})_{j=i}\Big]

    Drop-in for open_clip's ``ClipLoss``: the same arguments, values and gradients (the features
    are normalised here too, which leaves open_clip's normalised ones as they are).
    ``logit_scale`` :math:`s` is the multiplier itself (already exponentiated, as open_clip passes
    it): a float, or a tensor that may require grad.

    Args:
        local_loss, gather_with_grad, rank, world_size: open_clip's data-parallel settings. With
            ``world_size > 1`` the features of all ranks are gathered (with gradient if
            ``gather_with_grad``, else only this rank's own rows carry it); ``local_loss`` scores
            this rank's rows only against all ranks' (an N x N world-size problem per rank instead
            of the whole global batch).
        cache_labels: accepted for open_clip's sake; there are no label tensors to cache.
        use_horovod: not supported (pyssl gathers with torch.distributed).
        check_inputs_finite: raise on NaN/inf embeddings (costs a device synchronisation).
        gather_distributed: pyssl's way of asking for the gather (see the module's doc): rank and
            world size from torch.distributed, gathered with gradient; ``local_loss`` applies too.
            A ``logit_scale`` tensor is never gathered (it is the same parameter on every rank).

    Shape:
        - image_features, text_features: :math:`(N, D)`, the same N on every rank.
        - logit_scale: float or a one-element tensor; logit_bias (open_clip's SigLIP-style bias):
          a number or one-element tensor, added to every logit, which leaves every softmax and so
          the loss as they are (its gradient is 0).
        - output: scalar, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        check_inputs_finite: bool = False,
        gather_distributed: bool = False,
    ):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: use_horovod is not supported (pyssl gathers with torch.distributed)")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"ClipLoss: world_size must be an integer >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"ClipLoss: rank must be an integer in [0, world_size = {world_size}), got {rank!r}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.check_inputs_finite = check_inputs_finite
        self.gather_distributed = gather_distributed

    def _group(self) -> tuple[int, int]:
        """(this rank, the number of ranks) of the gather; (0, 1) for none."""
        if self.world_size > 1:
            if not distributed.is_distributed() or distributed.world_size() != self.world_size:
                raise RuntimeError(
                    f"ClipLoss: world_size={self.world_size} needs an initialised torch.distributed group of "
                    f"that many processes, got {distributed.world_size()}"
                )
            if distributed.rank() != self.rank:
                raise RuntimeError(f"ClipLoss: rank={self.rank}, but this process is rank {distributed.rank()}")
            return self.rank, self.world_size
        if self.gather_distributed and distributed.is_distributed():
            return distributed.rank(), distributed.world_size()
        return 0, 1

    def _gather(self, features: Tensor) -> Tensor:
        if self.gather_with_grad or self.gather_distributed:
            return distributed.gather_with_grad(features)
        gathered = distributed.gather(features)
        if self.local_loss:  # open_clip's: the local rows carry their gradient as queries only
            return gathered
        rows, start = features.shape[0], self.rank * features.shape[0]
        return torch.cat([gathered[:start], features, gathered[start + rows :]])

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, output_dict=False):
        rank, ranks = self._group()
        check = self.check_inputs_finite
        if ranks == 1:
            loss = ops.infonce(image_features, text_features, logit_scale, symmetric=True, check_inputs_finite=check)
        else:
            all_image, all_text = self._gather(image_features), self._gather(text_features)
            if self.local_loss:
                rows = image_features.shape[0]
                image_to_text = ops.infonce(
                    image_features, _own_rows_first(all_text, rank, rows), logit_scale, check_inputs_finite=check
                )
                text_to_image = ops.infonce(
                    text_features, _own_rows_first(all_image, rank, rows), logit_scale, check_inputs_finite=check
                )
                loss = 0.5 * (image_to_text + text_to_image)
            else:
                loss = ops.infonce(all_image, all_text, logit_scale, symmetric=True, check_inputs_finite=check)
        if isinstance(logit_bias, Tensor):
            if logit_bias.numel() != 1:
                raise ValueError(f"ClipLoss: logit_bias must hold one value, got shape {tuple(logit_bias.shape)}")
            loss = loss + 0.0 * logit_bias.reshape(())  # in the graph, with the exact gradient 0
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
            f"world_size={self.world_size}, gather_distributed={self.gather_distributed}"
        )
