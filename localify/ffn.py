"""The LocalViT locality feed-forward network, and deployment fusion.

:class:`LocalViTFFN` replaces a whole transformer MLP (``fc1 -> act -> fc2``) with the block of the LocalViT
paper (arXiv 2104.05707)::

    1x1 conv in -> hid (no bias) + BN + act
    -> depth-wise kxk conv (no bias) + BN + act
    -> optional channel attention (SE or ECA)
    -> 1x1 conv hid -> out (no bias) + BN

Unlike the paper's code it runs on any (H, W) token grid read at run time (never ``sqrt(N)``), with any number
of prefix (class, distillation, register) and suffix (detection) tokens. Those extra tokens go through the
point-wise layers (with their BatchNorm and activation) and skip only the spatial part (depth-wise conv, its
BatchNorm and activation, and the channel attention).

Implementation notes (speed):

* The point-wise convs are ``nn.Linear(bias=False)`` modules: a 1x1 conv is exactly a matmul over channels.
  Weights are (out, in); a paper checkpoint's (out, in, 1, 1) conv weight loads after ``.flatten(1)``. They
  run as ``F.linear`` or as a 1x1 ``F.conv2d`` of a channels-last view, whichever
  :func:`~localify.layers.pointwise_backend` picks for this CPU (oneDNN's conv is 2-3x faster than MKL's
  sgemm on AMD CPUs), and always as the conv in an exported graph.
* All BatchNorms are ``nn.BatchNorm1d`` called on (rows, C) views, i.e. normalisation over channels (what a
  BatchNorm2d does on the image). They are called as modules, so ``SyncBatchNorm`` conversion works.
* Training: the rows are ordered "all grid tokens of the batch first, then the extra tokens": the grid rows
  are then one contiguous (B*H*W, hid) block whose (B, H, W, hid) view permuted to (B, hid, H, W) is already
  channels-last, so the depth-wise conv and the way back to tokens need no copy. Reordering happens only at
  the narrow ends (in_dim / out_dim wide, a quarter of the hidden width for ratio 4): one concat of the
  input rows and one concat of the output tokens. Nothing hid-wide is ever concatenated or copied.
* Eval: the grid tokens go through the whole block as a (B, H, W) map, channels-last from fc1 to fc2, and
  the few extra tokens as rows; the two are joined out-wide. An exported graph (ONNX) then holds the hidden
  map in one layout, with transposes only at the narrow ends (ONNX Runtime folds them into its reorders).
* BatchNorm statistics in training mode: BN1 and BN3 over all tokens (grid and extras), BN2 over the grid.
* Without autograd (``torch.no_grad`` / ``inference_mode``) the activations and the SE/ECA scaling run in
  place on tensors the block itself just allocated (never on the input).
* Eval mode: each BatchNorm is folded into the layer before it (BN over activations costs a full pass over
  the hidden width; folding costs a pass over the weights). Without autograd the folded weights are kept,
  keyed on the versions of the parameters and statistics, so an unfused block in eval costs about what a
  fused one does, at the price of one extra copy of its weights until it goes back to training mode.
* One sample in eval without autograd (the batch-1 latency case): fc1 runs on every token, and the
  depth-wise conv gets one extra row of padding above and below the grid, which leaves room in its output
  for the extra tokens; fc2 reads a view of it, so nothing is concatenated at all.
* Backward: the row groups are separated with ``split`` (its gradient is one concat) rather than slicing.

:func:`fuse_ffn` folds every BatchNorm into the preceding Linear / conv for deployment, and
:func:`fuse_locality_linear` folds a residual :class:`~localify.layers.LocalityLinear` (``h + dw(h)``) into a
plain one with the identity added to the centre tap.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ._grid import GridSource, check_tokens
from .errors import ConfigError, FuseError
from .layers import (
    LocalifyModule,
    capturing,
    conv_act_applies,
    copy_sharing_grid,
    depthwise_act,
    fuse_locality_linear,
    nchw_view,
    onednn_activation,
    pointwise,
    require_eval,
    rows_to_grid,
    tokens_around_grid,
)

__all__ = [
    "LocalViTFFN",
    "SqueezeExcite",
    "EfficientChannelAttention",
    "ACTIVATIONS",
    "ATTENTIONS",
    "make_activation",
    "eca_kernel_size",
    "fuse_ffn",
    "fuse_locality_linear",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "hswish": nn.Hardswish,
    "relu6": nn.ReLU6,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
}
_INPLACE_ACTS = {"hswish": F.hardswish, "relu6": F.relu6, "relu": F.relu, "silu": F.silu, "swish": F.silu}
ATTENTIONS = (None, "se", "eca")
LAYOUTS = ("BNC", "BHWC")


def make_activation(name: str) -> nn.Module:
    """An activation module by name (``hswish``, ``relu6``, ``relu``, ``silu``/``swish``, ``gelu``)."""
    cls = ACTIVATIONS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"localify: unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return cls()


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA-Net's adaptive kernel size: the odd number nearest ``(log2(C) + b) / gamma`` (5 for 768 and 1536)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over the grid of (B, L, C) tokens or a (B, C, H, W) map -> (B, C)."""
    return x.mean((2, 3)) if x.dim() == 4 else x.mean(1)


def _scale(x: torch.Tensor, w: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``x`` (tokens or map) times per-sample channel weights ``w`` (B, C)."""
    w = w[:, :, None, None] if x.dim() == 4 else w.unsqueeze(1)
    return x.mul_(w) if inplace else x * w


class FoldedParams(NamedTuple):
    """The eval-mode weights of a :class:`LocalViTFFN` with every BatchNorm folded into the layer before it."""

    w1: torch.Tensor  # fc1 (1x1 conv) weight, (hid, in)
    b1: torch.Tensor | None
    w_dw: torch.Tensor  # depth-wise kernel, (hid, 1, k, k)
    b_dw: torch.Tensor | None
    w2: torch.Tensor  # fc2 (1x1 conv) weight, (out, hid)
    b2: torch.Tensor | None


class SqueezeExcite(nn.Module):
    """SE on tokens: mean over the grid -> Linear -> ReLU -> Linear -> h-sigmoid -> scale the channels.

    Takes (B, L, C) tokens or a (B, C, H, W) map.
    """

    def __init__(self, channels: int, hidden: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels, device=device, dtype=dtype)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return _scale(x, self.gate(self.fc2(self.act(self.fc1(_pool(x))))), inplace)


class EfficientChannelAttention(nn.Module):
    """ECA on tokens: mean over the grid -> 1-D conv across channels -> sigmoid -> scale the channels.

    Takes (B, L, C) tokens or a (B, C, H, W) map.
    """

    def __init__(self, channels: int, kernel_size: int | None = None, device: Any = None, dtype: Any = None):
        super().__init__()
        k = eca_kernel_size(channels) if kernel_size is None else kernel_size
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return _scale(x, torch.sigmoid(self.conv(_pool(x).unsqueeze(1))).squeeze(1), inplace)


class LocalViTFFN(LocalifyModule):
    """The LocalViT locality FFN; replaces a whole MLP module (``fc1 -> act -> fc2``).

    Args:
        fc1, fc2: the MLP's projections; their weights initialise the point-wise convs (their biases, and
            anything between them such as dropout or a norm, are not used: the block is the paper's).
        grid: where the (H, W) token grid is read at run time; may be None with ``layout="BHWC"``.
        prefix, suffix: tokens before / after the grid; they skip the depth-wise conv and the attention.
        kernel_size: odd size of the depth-wise kernel.
        act: ``hswish`` (paper default), ``relu6``, ``relu``, ``silu``/``swish`` or ``gelu``.
        attention: None, ``"se"`` or ``"eca"``.
        se_hidden / se_reduction: width of the SE bottleneck, given directly or as ``hid // se_reduction``
            (default 4, as LocalViT-T).
        eca_kernel: kernel of the ECA conv (default: ECA-Net's formula, 5 for 768 channels).
        layout: ``"BNC"`` for (B, N, C) tokens, ``"BHWC"`` for (B, H, W, C) feature maps (no grid source).

    Parameters are created on the device and in the dtype of ``fc1.weight``. Fresh BatchNorms (mean 0,
    var 1) are the identity in eval mode up to ``1/sqrt(1 + eps)``; the block is not function-preserving
    (act -> dw -> act), it is meant to be trained, as in the paper.
    """

    def __init__(
        self,
        fc1: nn.Linear,
        fc2: nn.Linear,
        grid: GridSource | None,
        prefix: int = 0,
        suffix: int = 0,
        *,
        kernel_size: int = 3,
        act: str = "hswish",
        attention: str | None = None,
        se_hidden: int | None = None,
        se_reduction: int | None = None,
        eca_kernel: int | None = None,
        layout: str = "BNC",
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ConfigError(f"localify: unknown attention {attention!r}; choose one of {list(ATTENTIONS)}")
        if layout not in LAYOUTS:
            raise ConfigError(f"localify: unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(
                f"localify: kernel_size must be a positive odd int (3, 5, 7, ...), got {kernel_size!r}"
            )
        if prefix < 0 or suffix < 0:
            raise ConfigError(f"localify: prefix and suffix must be >= 0, got {prefix} and {suffix}")
        if layout == "BHWC" and (prefix or suffix):
            raise ConfigError("localify: layout 'BHWC' has no prefix or suffix tokens")
        if layout == "BNC" and grid is None:
            raise ConfigError(
                "localify: layout 'BNC' needs a grid source (GridSource) for the (H, W) token grid"
            )
        if fc2.in_features != fc1.out_features:
            raise ConfigError(
                f"localify: fc2 takes {fc2.in_features} features but fc1 gives {fc1.out_features}"
            )
        self.act = make_activation(act)
        in_dim, hid, out_dim = fc1.in_features, fc1.out_features, fc2.out_features
        w = fc1.weight
        kw = {"device": w.device, "dtype": w.dtype}

        self.prefix = prefix
        self.suffix = suffix
        self.layout = layout
        self.grid_source = grid
        self.act_name = act.lower()
        self.attention_name = attention

        self.fc1 = nn.Linear(in_dim, hid, bias=False, **kw)  # point-wise 1x1 conv
        self.bn1 = nn.BatchNorm1d(hid, **kw)
        self.dwconv = nn.Conv2d(hid, hid, kernel_size, padding=kernel_size // 2, groups=hid, bias=False, **kw)
        self.bn2 = nn.BatchNorm1d(hid, **kw)
        if attention == "se":
            if se_hidden is not None and se_reduction is not None:
                raise ConfigError("localify: give se_hidden or se_reduction, not both")
            if se_reduction is not None:
                if se_reduction < 1 or hid // se_reduction < 1:
                    raise ConfigError(f"localify: se_reduction {se_reduction} does not fit {hid} channels")
                se_hidden = hid // se_reduction
            se_hidden = 4 if se_hidden is None else se_hidden
            if se_hidden < 1:
                raise ConfigError(f"localify: se_hidden must be >= 1, got {se_hidden}")
            self.attn = SqueezeExcite(hid, se_hidden, **kw)
        elif attention == "eca":
            if eca_kernel is not None and (eca_kernel < 1 or eca_kernel % 2 == 0):
                raise ConfigError(f"localify: eca_kernel must be a positive odd int, got {eca_kernel}")
            self.attn = EfficientChannelAttention(hid, eca_kernel, **kw)
        else:
            self.attn = None
        self.fc2 = nn.Linear(hid, out_dim, bias=False, **kw)  # point-wise 1x1 conv
        self.bn3 = nn.BatchNorm1d(out_dim, **kw)
        with torch.no_grad():
            self.fc1.weight.copy_(fc1.weight)
            self.fc2.weight.copy_(fc2.weight)

    # --- introspection ---------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_features

    @property
    def out_features(self) -> int:
        return self.fc2.out_features

    @property
    def kernel_size(self) -> int:
        return self.dwconv.kernel_size[0]

    @property
    def fused(self) -> bool:  # type: ignore[override]
        """True once the BatchNorms were folded into the convs (see :func:`fuse_ffn`)."""
        return self.bn1 is None

    def extra_repr(self) -> str:
        return (
            f"prefix={self.prefix}, suffix={self.suffix}, act={self.act_name}, attention={self.attention_name}, "
            f"layout={self.layout}, fused={self.fused}"
        )

    def fuse(self) -> LocalViTFFN:
        """A copy with every BatchNorm folded in (eval mode only); see :func:`fuse_ffn`."""
        return fuse_ffn(self)

    def get_base_layer(self) -> None:
        """None: the block replaces the original MLP (its fc1/fc2 weights only initialise the 1x1 convs)."""
        return None

    def locality_state_keys(self) -> list[str]:
        return list(self.state_dict())

    @property
    def needs_fuse(self) -> bool:
        return not self.fused

    # --- forward -----------------------------------------------------------------------------------------
    @staticmethod
    def _bn(bn: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        return x if bn is None else bn(x)

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        # Without autograd the activations (and the attention's scaling) run in place on the fresh tensors
        # of this block: fewer large allocations in eager inference. Not under torch.compile, which plans
        # its buffers itself and cannot mutate the explicit-strided view of nchw_view() in place.
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            fn = _INPLACE_ACTS.get(self.act_name)
            if fn is not None and type(self.act) is ACTIVATIONS[self.act_name]:
                return fn(t, inplace=True)
        return self.act(t)

    def _eval_params(self) -> FoldedParams | None:
        """In eval mode: (w1, b1, w_dw, b_dw, w2, b2) with every BatchNorm folded in, else None.

        An eval-mode BatchNorm is a per-channel affine map, so it is folded into the weights of the layer
        before it instead of running as a full pass over the activations (BN1 and BN2 run on the hidden
        width). Without autograd the folded weights are kept and reused until a weight or a statistic
        changes (checked by version); they are dropped when the block goes back to training mode. With
        autograd they are folded on every call, so gradients reach the original parameters. The module's
        parameters are never changed (see :func:`fuse_ffn` to fold once for deployment). Modules with
        hooks, or BatchNorms in training mode or without running statistics, keep the module-by-module path.
        """
        if self.training:
            return None
        mods = (self.fc1, self.bn1, self.dwconv, self.bn2, self.fc2, self.bn3)
        for mod in mods:
            if mod is not None and (mod._forward_hooks or mod._forward_pre_hooks):
                return None
        for bn in mods[1::2]:
            if bn is not None and (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training
                                   or bn.running_mean is None):
                return None
        if self.bn1 is None and self.bn2 is None and self.bn3 is None:  # fused: nothing to fold
            return FoldedParams(self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias,
                                self.fc2.weight, self.fc2.bias)
        key = None
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            key = _version_key(mods)
            cached = self.__dict__.get("_folded")
            if key is not None and cached is not None and cached[0] == key:
                return cached[1]
        prm = FoldedParams(
            *_fold_eval(self.fc1.weight, self.fc1.bias, self.bn1),
            *_fold_eval(self.dwconv.weight, self.dwconv.bias, self.bn2),
            *_fold_eval(self.fc2.weight, self.fc2.bias, self.bn3),
        )
        if key is not None:
            self.__dict__["_folded"] = (key, prm)
        return prm

    def train(self, mode: bool = True) -> LocalViTFFN:
        self.__dict__.pop("_folded", None)
        return super().train(mode)

    def __getstate__(self) -> dict:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``) leaves out the folded-weights cache."""
        state = super().__getstate__().copy()
        state.pop("_folded", None)
        return state

    @staticmethod
    def _linear(fc: nn.Linear, rows: torch.Tensor, b: Any) -> torch.Tensor:
        """``fc(rows)`` for (R, C) rows of ``b`` samples; a plain, hook-free Linear may run as a 1x1 conv."""
        if type(fc) is nn.Linear and not (fc._forward_hooks or fc._forward_pre_hooks):
            return pointwise(rows, fc.weight, fc.bias, b)
        return fc(rows)

    def _pw1(self, rows: torch.Tensor, prm: FoldedParams | None, b: Any = 1) -> torch.Tensor:
        y = self._bn(self.bn1, self._linear(self.fc1, rows, b)) if prm is None else F.linear(rows, prm.w1, prm.b1)
        return self._act(y)

    def _pw2(self, rows: torch.Tensor, prm: FoldedParams | None, b: Any = 1) -> torch.Tensor:
        """fc2 (+ BN3 when folded; the module path applies BN3 to all tokens at once afterwards)."""
        return self._linear(self.fc2, rows, b) if prm is None else F.linear(rows, prm.w2, prm.b2)

    def _dw(self, g: torch.Tensor, prm: FoldedParams | None, pad_rows: int = 0) -> torch.Tensor:
        """Depth-wise conv (+ BN2 when folded) of a (B, C, H, W) grid; ``pad_rows`` extra output rows above
        and below (folded path only)."""
        if prm is None:
            return self.dwconv(g)
        k = self.dwconv.kernel_size[0] // 2
        return F.conv2d(g, prm.w_dw, prm.b_dw, 1, (k + pad_rows, k), 1, self.dwconv.groups)

    def _dw_act(self, g: torch.Tensor, prm: FoldedParams) -> torch.Tensor:
        """act(BN2(dw(g))) with the folded weights: in eager inference where the activation is one oneDNN
        knows, a single convolution with it inside (:func:`~localify.layers.depthwise_act`); else the conv,
        then the activation (in place without autograd)."""
        act = onednn_activation(self.act) if conv_act_applies(g) else None
        if act is None:
            return self._act(self._dw(g, prm))
        k = self.dwconv.kernel_size[0] // 2
        return depthwise_act(g, prm.w_dw, prm.b_dw, (k, k), self.dwconv.groups, act)

    def _spatial(self, rows: torch.Tensor, b: Any, hw: tuple[Any, Any], prm: FoldedParams | None) -> torch.Tensor:
        """(B*H*W, hid) contiguous grid rows -> depth-wise conv, BN, act, attention -> (B, H*W, hid)."""
        c = rows.shape[-1]
        g = nchw_view(rows.view(b, hw[0], hw[1], c))  # channels-last view, no copy
        g = self._dw(g, prm)  # channels-last in -> channels-last out
        t = g.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels-last output
        t = self._act(t if prm is not None else self._bn(self.bn2, t)).view(b, -1, c)
        if self.attn is not None:
            t = self.attn(t, inplace=not torch.is_grad_enabled())
        return t

    def _one_sample(self, x: torch.Tensor, hw: tuple[Any, Any], prm: FoldedParams) -> torch.Tensor:
        """Eval, no autograd, one sample with extra tokens: no concatenation at all.

        fc1 runs on every token; the grid rows are a channels-last image; the depth-wise conv gets one extra
        row of padding above and below, which leaves room in its output for the prefix tokens (end of the
        top row) and the suffix tokens (start of the bottom row). fc2 then reads a view of that output.
        """
        n, p, s = x.shape[1], self.prefix, self.suffix
        h = self._act(pointwise(x.reshape(n, -1), prm.w1, prm.b1, 1))  # (N, hid)
        # the activation apart, in place (see conv_act_applies: one sample)
        t = self._act(self._dw(rows_to_grid(h, p, hw), prm, pad_rows=1))
        t = t.permute(0, 2, 3, 1).flatten(1, 2)  # (1, (H + 2) * W, hid), a view
        if self.attn is not None:
            self.attn(t.narrow(1, hw[1], n - p - s), inplace=True)
        return pointwise(tokens_around_grid(t, h.unsqueeze(0), hw[1], p, s), prm.w2, prm.b2)

    def _grid_eval(self, g: torch.Tensor, prm: FoldedParams) -> torch.Tensor:
        """Eval (folded weights): a (B, H, W, in) grid through the whole block -> (B, H, W, out).

        The hidden map stays channels-last from fc1 to fc2 (views only); the point-wise layers run as 1x1
        convolutions or ``F.linear`` (:func:`~localify.layers.pointwise`; always the former in an
        exported graph, whose hidden map then keeps one layout from the first projection to the last).
        """
        h = nchw_view(pointwise(g, prm.w1, prm.b1))
        # (B, hid, H, W) channels-last from here to fc2: activations, conv and attention on the map
        t = self._dw_act(self._act(h), prm)
        if self.attn is not None:
            t = self.attn(t, inplace=not torch.is_grad_enabled())
        return pointwise(t.permute(0, 2, 3, 1), prm.w2, prm.b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prm = self._eval_params()
        if self.layout == "BHWC":
            if prm is not None:
                return self._grid_eval(x, prm)
            b, h, w, c = x.shape
            y = self._pw2(self._spatial(self._pw1(x.reshape(-1, c), prm, b), b, (h, w), prm), prm, b)
            return self._bn3(y, prm).view(b, h, w, -1)

        b, n, c = x.shape
        hw = self.grid_source.get()
        p, s = self.prefix, self.suffix
        check_tokens(n, hw, p, s)
        if p == 0 and s == 0:
            if prm is not None:
                return self._grid_eval(x.unflatten(1, hw), prm).flatten(1, 2)
            y = self._pw2(self._spatial(self._pw1(x.reshape(-1, c), prm, b), b, hw, prm), prm, b)
            return self._bn3(y, prm).view(b, n, -1)
        m = n - p - s
        if prm is not None:
            if not torch.is_grad_enabled() and not capturing() and b == 1 and max(p, s) <= hw[1]:
                return self._one_sample(x, hw, prm)  # eager only (see capturing()): checked before the shape
            # eval: the grid through the whole block as a map, the few extra tokens as rows, joined
            # out-wide (what an exported graph keeps in one layout)
            pre, grid, suf = x.split([p, m, s], dim=1)
            yg = self._grid_eval(grid.contiguous().unflatten(1, hw), prm).flatten(1, 2)  # (B, M, out)
            extra = pre if not s else suf if not p else torch.cat([pre, suf], dim=1)
            ye = self._pw2(self._pw1(extra.reshape(-1, c), prm), prm).view(b, p + s, -1)
            parts = [yg]
            if p:
                parts.insert(0, ye[:, :p])
            if s:
                parts.append(ye[:, p:])
            return torch.cat(parts, dim=1)

        # Training (BatchNorm statistics over all tokens). Rows: every grid token of the batch, then every
        # extra token (prefix then suffix of each sample). split (not slicing) so that autograd joins the
        # gradients with one concat instead of zero-filling a full-size buffer per slice.
        pre, grid, suf = x.split([p, m, s], dim=1)
        parts = [grid.reshape(-1, c)]
        if p:
            parts.append(pre.reshape(-1, c))
        if s:
            parts.append(suf.reshape(-1, c))
        rows = torch.cat(parts)
        h = self._pw1(rows, prm, b)  # BN1 statistics over all tokens
        nl = b * m
        hg, he = h.split([nl, b * (p + s)])
        yg = self._pw2(self._spatial(hg, b, hw, prm), prm, b)  # (B, M, out)
        ye = self._pw2(he, prm, b)  # (B*p + B*s, out): small
        o = ye.shape[-1]
        yp, ys = ye.split([b * p, b * s])
        y = torch.cat([yp.view(b, p, o), yg, ys.view(b, s, o)], dim=1)  # (B, N, out), out_dim wide
        return self._bn3(y, prm).view(b, n, o)

    def _bn3(self, y: torch.Tensor, prm: FoldedParams | None) -> torch.Tensor:
        """BN3 over all tokens' rows on the module path (folded into fc2 on the eval path)."""
        if prm is not None or self.bn3 is None:
            return y
        return self.bn3(y.reshape(-1, y.shape[-1]))


def _version_key(mods: tuple[nn.Module | None, ...]) -> tuple | None:
    """Identity and version of every parameter and buffer of ``mods``: changes whenever one is modified
    (in place, by an optimizer or ``load_state_dict``) or replaced (``.to()``, new ``Parameter``)."""
    key = []
    try:
        for mod in mods:
            if mod is None:
                continue
            for t in (*mod._parameters.values(), *mod._buffers.values()):
                key.append(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device))
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return None
    return tuple(key)


def _bn_affine(bn: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift`` per channel, computed in ``dtype`` (default: its own)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    scale = torch.rsqrt(cast(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * cast(bn.weight)
    shift = -cast(bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + cast(bn.bias)
    return scale, shift


def _fold_eval(w: torch.Tensor, b: torch.Tensor | None, bn: nn.Module | None):
    """``bn(conv_or_linear(x))`` in eval mode as one layer: the folded weight and bias (differentiable)."""
    if bn is None:
        return w, b
    scale, shift = _bn_affine(bn)
    if b is not None:
        shift = shift + b * scale
    return w * scale.view(-1, *([1] * (w.dim() - 1))), shift


# --- fusion ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _bn_scale_shift(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None:
        raise FuseError(
            "localify: cannot fuse a BatchNorm without running statistics (track_running_stats=False)"
        )
    return _bn_affine(bn, torch.float64)


@torch.no_grad()
def _fold_linear(lin: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    scale, shift = _bn_scale_shift(bn)
    w = lin.weight
    out = nn.Linear(lin.in_features, lin.out_features, bias=True, device=w.device, dtype=w.dtype)
    out.weight.copy_(w.double() * scale[:, None])
    b = shift if lin.bias is None else lin.bias.double() * scale + shift
    out.bias.copy_(b)
    out.weight.requires_grad_(w.requires_grad)
    out.bias.requires_grad_(w.requires_grad)
    return out


@torch.no_grad()
def _fold_conv(conv: nn.Conv2d, bn: nn.BatchNorm1d) -> nn.Conv2d:
    scale, shift = _bn_scale_shift(bn)
    w = conv.weight
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    out.weight.copy_(w.double() * scale.view(-1, 1, 1, 1))
    b = shift if conv.bias is None else conv.bias.double() * scale + shift
    out.bias.copy_(b)
    out.weight.requires_grad_(w.requires_grad)
    out.bias.requires_grad_(w.requires_grad)
    return out


def fuse_ffn(m: LocalViTFFN) -> LocalViTFFN:
    """A deployment copy of ``m`` with every BatchNorm folded into the preceding Linear / conv.

    The result is a :class:`LocalViTFFN` whose ``bn1/bn2/bn3`` are None and whose ``fc1``, ``dwconv`` and
    ``fc2`` carry biases; in eval mode it computes what ``m`` computes (folding is done in float64). ``m``
    itself is left unchanged; the copy shares its grid source. Fusing a fused block returns an equal copy.

    Raises:
        FuseError: ``m`` is in training mode (BatchNorm would use batch statistics).
    """
    if not isinstance(m, LocalViTFFN):
        raise FuseError(f"localify: fuse_ffn expects a LocalViTFFN, got {type(m).__name__}")
    require_eval(m)
    f = copy_sharing_grid(m)
    f.__dict__.pop("_folded", None)  # the eval-mode cache of m, if it had one
    if f.fused:
        return f
    f.fc1 = _fold_linear(f.fc1, f.bn1)
    f.dwconv = _fold_conv(f.dwconv, f.bn2)
    f.fc2 = _fold_linear(f.fc2, f.bn3)
    f.bn1 = f.bn2 = f.bn3 = None
    return f
