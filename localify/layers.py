"""The modules localify splices into a model.

:class:`LocalityLinear` wraps a first-layer projection of an MLP (fc1): the original Linear runs first,
then a depth-wise convolution runs over the token grid of its output, while prefix tokens (class,
distillation, register) and suffix tokens (detection) skip only the convolution. Initialised with an
identity (Dirac) kernel, the MLP computes exactly what it computed before (the ``fc1 -> dw -> act -> fc2``
order of PVTv2's ConvFFN).

Layout, measured on CPU (``benchmarks/bench_overhead.py``): the hidden grid is handed to the convolution as a
channels-last view, never copied. With one sample in eager mode, the convolution is padded by one extra row
at the top and bottom so that its output has room for the prefix tokens right before the grid and the suffix
tokens right after it: the result is returned as a view of the conv output, with no concatenation of the wide
hidden tensor. With more samples the grid tokens are projected on their own (a contiguous, channels-last
grid) and the few extra tokens are projected separately and concatenated.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._grid import GridSource, check_tokens
from .errors import FuseError

__all__ = ["LocalifyModule", "LocalityLinear", "fuse_locality_linear", "tokens_to_grid", "grid_to_tokens"]


class LocalifyModule(nn.Module):
    """Base class of every module localify splices into a model; each one owns its bookkeeping.

    * :meth:`get_base_layer` gives the original module it wraps (as PEFT's tuner layers do), or None when the
      module replaced the original computation (``localvit``).
    * :meth:`locality_state_keys` names the state-dict entries localify added (what ``mark_trainable`` trains
      and ``save(weights="locality")`` stores).
    * :meth:`fuse` returns a deployment copy (BatchNorms folded, residual branches merged), so that
      ``localify.fuse(model)`` and ``timm.utils.reparameterize_model(model)`` both work.
    """

    fused: bool = False  # True once fuse() produced this module

    def get_base_layer(self) -> nn.Module | None:
        raise NotImplementedError

    def locality_state_keys(self) -> list[str]:
        raise NotImplementedError

    def fuse(self) -> nn.Module:
        raise NotImplementedError

    @property
    def needs_fuse(self) -> bool:
        """Whether :meth:`fuse` changes the computation (BatchNorms to fold, a residual branch to merge)."""
        raise NotImplementedError


def require_eval(m: nn.Module) -> None:
    """Fusing folds running (eval) statistics: refuse a module in training mode."""
    if m.training:
        raise FuseError(
            f"localify: cannot fuse {type(m).__name__} in training mode: BatchNorm folds its running (eval) "
            "statistics. Call .eval() first."
        )


def copy_sharing_grid(m: nn.Module) -> nn.Module:
    """deepcopy that keeps the grid source shared: the copy must read the same run-time grid hook."""
    memo = {}
    for sub in m.modules():
        g = getattr(sub, "grid_source", None)
        if g is not None:
            memo[id(g)] = g
    return copy.deepcopy(m, memo)


def tokens_to_grid(x: torch.Tensor, hw: tuple[Any, Any]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) image; a view (channels-last strides) when ``x`` is contiguous."""
    return x.unflatten(1, hw).permute(0, 3, 1, 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) image -> (B, H*W, C) tokens; a view when ``x`` is channels-last."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class LocalityLinear(LocalifyModule):
    """A Linear followed by a depth-wise conv over the token grid; extra tokens skip the conv.

    Args:
        linear: the original projection, kept as it is (weights, bias, class).
        grid: where the token grid is read at run time.
        prefix: tokens before the grid (class, distillation, registers).
        suffix: tokens after the grid (e.g. detection tokens).
        kernel_size: size of the depth-wise kernel.
        residual: if True the block computes ``h + dw(h)`` with ``dw`` zero-initialised; otherwise ``dw(h)``
            with an identity (Dirac) kernel. Both are exact at conversion.
        layout: ``"BNC"`` for (B, N, C) tokens, ``"BHWC"`` for (B, H, W, C) feature maps.
    """

    def __init__(
        self,
        linear: nn.Linear,
        grid: GridSource | None,
        prefix: int = 0,
        suffix: int = 0,
        kernel_size: int = 3,
        residual: bool = False,
        layout: str = "BNC",
    ) -> None:
        super().__init__()
        self.linear = linear
        self.prefix = prefix
        self.suffix = suffix
        self.residual = residual
        self.layout = layout
        self.grid_source = grid
        ch = linear.out_features
        w = linear.weight
        self.dwconv = nn.Conv2d(
            ch, ch, kernel_size, padding=kernel_size // 2, groups=ch, bias=False, device=w.device, dtype=w.dtype
        )
        self.reset_locality()

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads mlp.fc1.weight keeps working
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @torch.no_grad()
    def reset_locality(self) -> None:
        """Re-initialise the depth-wise kernel so the block computes the original projection exactly."""
        w = self.dwconv.weight
        w.zero_()
        if not self.residual:
            k = w.shape[-1] // 2
            w[:, 0, k, k] = 1.0

    def extra_repr(self) -> str:
        return (f"prefix={self.prefix}, suffix={self.suffix}, residual={self.residual}, layout={self.layout}")

    def get_base_layer(self) -> nn.Linear:
        """The original projection, unchanged (``self.linear``)."""
        return self.linear

    def locality_state_keys(self) -> list[str]:
        return [k for k in self.state_dict() if not k.startswith("linear.")]

    def fuse(self) -> LocalityLinear:
        """A deployment copy; see :func:`fuse_locality_linear`."""
        return fuse_locality_linear(self)

    @property
    def needs_fuse(self) -> bool:
        return self.residual

    def _conv(self, g: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(g)
        return g + y if self.residual else y

    def _plain_conv(self) -> bool:
        """Whether ``dwconv`` is a plain, hook-free Conv2d that may be called functionally (padded)."""
        conv = self.dwconv
        return type(conv) is nn.Conv2d and not conv._forward_hooks and not conv._forward_pre_hooks

    def _conv_padded(self, g: torch.Tensor) -> torch.Tensor:
        """The conv of a (B, C, H, W) grid with one extra output row above and below (``_plain_conv()``)."""
        conv = self.dwconv
        k = conv.kernel_size[0] // 2
        y = F.conv2d(g, conv.weight, conv.bias, 1, (k + 1, k), 1, conv.groups)
        if self.residual:  # h + dw(h), added into the fresh conv output
            y.narrow(2, 1, g.shape[2]).add_(g)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "BHWC":
            return self._conv(self.linear(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        hw = self.grid_source.get()
        n = x.shape[1]
        p, s = self.prefix, self.suffix
        check_tokens(n, hw, p, s)
        if p == 0 and s == 0:
            return grid_to_tokens(self._conv(tokens_to_grid(self.linear(x), hw)))
        # no shape guard when tracing: check tracing() first
        if not tracing() and x.shape[0] == 1 and max(p, s) <= hw[1] and self._plain_conv():
            # One sample: the grid rows of the full projection are already a channels-last image. One
            # extra row of padding above and below the grid leaves room in the conv output for the prefix
            # tokens (end of the top row) and the suffix tokens (start of the bottom row), so the tokens
            # come back as a view of it; only the few extra tokens are copied.
            h = self.linear(x)
            y = self._conv_padded(tokens_to_grid(h[:, p:n - s], hw))
            return tokens_around_grid(grid_to_tokens(y), h, hw[1], p, s)
        # project the grid tokens on their own so the hidden grid is contiguous (channels-last for the
        # conv, no copy of the wide hidden tensor); the few extra tokens are projected separately. The
        # narrow inputs are made contiguous rows first: a strided 3-D input would take matmul's slower
        # path (a copy anyway, then the bias added in a separate pass over the wide output).
        z = grid_to_tokens(self._conv(tokens_to_grid(self._rows(x[:, p:n - s]), hw)))
        parts = [z]
        if p:
            parts.insert(0, self._rows(x[:, :p]))
        if s:
            parts.append(self._rows(x[:, n - s:]))
        return torch.cat(parts, dim=1)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """The projection of (B, L, C) tokens, computed on contiguous (B*L, C) rows."""
        y = self.linear(t.reshape(-1, t.shape[-1]))
        return y.view(t.shape[0], t.shape[1], y.shape[-1])


def tokens_around_grid(t: torch.Tensor, h: torch.Tensor, width: Any, prefix: int, suffix: int) -> torch.Tensor:
    """The (B, N, C) tokens of a row-padded grid output, as a view; the extra tokens are copied in from ``h``.

    ``t`` is (B, (H + 2) * W, C): the grid rows with one padding row above and below. The prefix tokens go at
    the end of the top padding row and the suffix tokens at the start of the bottom one, so the result is
    ``t[:, W - prefix : W - prefix + N]``, dense for one sample. ``h`` holds all N tokens (B, N, C).
    """
    n = h.shape[1]
    out = t.narrow(1, width - prefix, n)
    if prefix:
        out.narrow(1, 0, prefix).copy_(h.narrow(1, 0, prefix))
    if suffix:
        out.narrow(1, n - suffix, suffix).copy_(h.narrow(1, n - suffix, suffix))
    return out


def tracing() -> bool:
    """True under torch.compile / torch.export / TorchScript tracing: take the shape-generic path there."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def fuse_locality_linear(m: LocalityLinear) -> LocalityLinear:
    """A non-residual copy of a residual :class:`LocalityLinear`: ``h + dw(h)`` is ``dw'(h)`` with the
    identity added to the centre tap of every channel's kernel.

    A non-residual ``m`` comes back as an equal copy (fusing twice changes nothing). The copy shares the grid
    source of ``m``; ``m`` is left unchanged.

    Raises:
        FuseError: ``m`` is in training mode.
    """
    if not isinstance(m, LocalityLinear):
        raise FuseError(f"localify: fuse_locality_linear expects a LocalityLinear, got {type(m).__name__}")
    require_eval(m)
    f = copy_sharing_grid(m)
    f.fused = True
    if not f.residual:
        return f
    with torch.no_grad():
        w = f.dwconv.weight  # (C, 1, kh, kw)
        kh, kw = w.shape[-2:]
        if kh % 2 == 0 or kw % 2 == 0 or f.dwconv.padding != (kh // 2, kw // 2) or f.dwconv.stride != (1, 1):
            raise FuseError(
                "localify: only an odd, 'same'-padded, stride-1 depth-wise kernel can absorb the residual"
            )
        w[:, 0, kh // 2, kw // 2] += 1.0
    f.residual = False
    return f
