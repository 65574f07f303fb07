"""Distributed training helpers: BatchNorm synchronised across processes, on GPUs and on CPUs.

The ``localvit`` blocks hold BatchNorms (``nn.BatchNorm1d`` on (rows, C) token rows). Under data-parallel
training each process would otherwise normalise with the statistics of its own slice of the batch.
``torch.nn.SyncBatchNorm`` synchronises them, but only for CUDA / XPU / HPU tensors: it raises on CPU tensors
as soon as a process group is initialised, and ``DistributedDataParallel`` refuses it in CPU modules.
:func:`sync_batchnorm` converts every BatchNorm of a model into ``torch.nn.SyncBatchNorm`` on those devices and
into :class:`AllReduceBatchNorm` (an all-reduce of the per-channel sums, differentiable, two passes; any device)
elsewhere. The state dict does not change, so checkpoints load into the plain model and back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["sync_batchnorm", "AllReduceBatchNorm"]

_NATIVE = ("cuda", "hpu", "xpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the gradient of a sum over processes is the sum of the gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training statistics cover every process of a group, on any device (CPU + gloo too).

    In training mode, with an initialised process group of more than one process, it computes the batch mean
    and (biased) variance over all processes with two differentiable all-reduces of per-channel sums in
    float32, normalises with them and updates the running statistics as BatchNorm does (unbiased variance
    over the global batch). Otherwise (eval, a single process) it is a plain BatchNorm. Input: (N, C, ...),
    such as the (rows, C) token rows of localify's ``localvit`` blocks or (B, C, H, W) feature maps.

    It is not a ``torch.nn.SyncBatchNorm`` subclass on purpose: ``DistributedDataParallel`` refuses those on
    CPU ("SyncBatchNorm layers only work with GPU modules"). The state dict is a BatchNorm's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        x = input.transpose(0, 1).reshape(c, -1).float()  # (C, rows)
        count = torch.tensor([x.shape[1]], dtype=x.dtype, device=x.device)
        s = _AllReduceSum.apply(torch.cat([x.sum(1), count]), group)
        total = s[-1].detach()
        if float(total) < 2:
            raise ValueError(f"expected more than 1 value per channel over all processes when training, got "
                             f"input of size {tuple(input.shape)}")
        mean = s[:-1] / total
        xc = x - mean[:, None]
        var = _AllReduceSum.apply((xc * xc).sum(1), group) / total
        y = xc * torch.rsqrt(var + self.eps)[:, None]
        if self.weight is not None:
            y = y * self.weight.float()[:, None]
        if self.bias is not None:
            y = y + self.bias.float()[:, None]
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                unbiased = var.detach() * (total / (total - 1))
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        y = y.to(input.dtype).reshape(c, input.shape[0], *input.shape[2:])
        return y.transpose(0, 1)


def sync_batchnorm(model: nn.Module, process_group: Any = None, *, native: bool | None = None) -> nn.Module:
    """Synchronise every BatchNorm of ``model`` (localify's ``localvit`` blocks included) across the processes
    of a data-parallel run, in place, and return the model (the same object unless ``model`` itself is a
    BatchNorm). Parameters and buffers are shared with the replaced modules; the state dict is unchanged, so
    checkpoints load into the plain model.

    ``native=True`` converts to ``torch.nn.SyncBatchNorm`` (fused kernels; CUDA / XPU / HPU only),
    ``native=False`` to :class:`AllReduceBatchNorm` (any device, CPU with gloo included). By default
    (``None``) the choice follows where the model's parameters are now: call it after ``model.to(device)``.
    Call it before wrapping the model in ``DistributedDataParallel``.

    Example::

        >>> model = localify.sync_batchnorm(model.to(device))
        >>> ddp = torch.nn.parallel.DistributedDataParallel(model)
    """
    if native is None:
        dev = next((p.device.type for p in model.parameters()), "cpu")
        native = dev in _NATIVE
    if native:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _convert_tree(model, process_group)


def _convert_tree(model: nn.Module, process_group: Any) -> nn.Module:
    if isinstance(model, nn.modules.batchnorm._BatchNorm) and not isinstance(model, AllReduceBatchNorm):
        return _convert(model, process_group)
    for name, child in list(model.named_children()):
        new = _convert_tree(child, process_group)
        if new is not child:
            setattr(model, name, new)
    return model


def _convert(bn: nn.modules.batchnorm._BatchNorm, process_group: Any) -> AllReduceBatchNorm:
    out = AllReduceBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                             process_group, device="meta")
    if bn.affine:
        out.weight, out.bias = bn.weight, bn.bias
    out.running_mean, out.running_var = bn.running_mean, bn.running_var
    out.num_batches_tracked = bn.num_batches_tracked
    out.train(bn.training)
    if hasattr(bn, "qconfig"):
        out.qconfig = bn.qconfig
    return out
