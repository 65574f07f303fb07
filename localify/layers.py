"""The modules localify splices into a model.

:class:`LocalityLinear` wraps a first-layer projection of an MLP (fc1): the original Linear runs first,
then a depth-wise convolution runs over the token grid of its output, while prefix tokens (class,
distillation, register) and suffix tokens (detection) skip only the convolution. Initialised with an
identity (Dirac) kernel, the MLP computes exactly what it computed before (the ``fc1 -> dw -> act -> fc2``
order of PVTv2's ConvFFN).

:class:`LocalityMLP` goes one step further where fc1, the activation and fc2 sit in one per-token MLP module
(timm ``Mlp`` / ``GluMlp`` / ``SwiGLU``, Hugging Face 5.x ``mlp``): it runs that module twice, once on the
grid tokens as a (B, H, W, C) map and once on the extra tokens as plain rows, and joins the two results on
the narrow output side. Its fc1(s) are :class:`LocalityLinear` as above, and it keeps the module's
parameters, buffers and state-dict keys.

Layout, measured on CPU (``benchmarks/bench_overhead.py``, ``benchmarks/bench_runtimes.py``):

* The hidden grid is handed to the convolution as a channels-last view, never copied.
* One sample in eager mode (:class:`LocalityLinear`): the convolution is padded by one extra row at the top
  and bottom so that its output has room for the prefix tokens right before the grid and the suffix tokens
  right after it: the result is returned as a view of the conv output, with no concatenation of the wide
  hidden tensor.
* More samples: the grid tokens are projected on their own (a contiguous, channels-last grid) and the few
  extra tokens separately. :class:`LocalityLinear` must return every token: in inference it uses the
  row-padded conv as for one sample and returns a strided view (the samples' tokens sit (H + 2) * W rows
  apart); with autograd, or in an exported graph, it concatenates the hidden tensor once.
  :class:`LocalityMLP` never does (the join is ``out``-wide).
* Point-wise projections of a (B, H, W, C) grid run either as ``F.linear`` or as a 1x1 convolution of its
  channels-last view (oneDNN), see :func:`pointwise_backend`. When ``torch.export`` traces the model (ONNX
  export) the 1x1-convolution form is always used: the exported graph then holds the hidden grid in one
  layout from fc1 to fc2 (ONNX Runtime folds the transposes of the narrow ends into its own reorders).
* Where :func:`conv_activation_fusion` is on (Intel CPUs), :class:`LocalityMLP` runs the grid of a timm
  ``Mlp`` in eager inference as the projection, one oneDNN convolution with the activation as a post-op, and
  fc2 (:meth:`LocalityMLP.conv_act_chain`): the activation does not read the wide map again. A fused
  ``LocalViTFFN`` applies its second activation the same way (:func:`depthwise_act`). Both only with more
  than one sample: with one, the map is in cache and the post-op measured slower.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._grid import GridSource, check_tokens
from ._trace import eval_mode
from .errors import ConfigError, FuseError

__all__ = [
    "LocalifyModule",
    "fuse_locality_linear",
    "LocalityLinear",
    "LocalityMLP",
    "PointwiseLinear",
    "tokens_to_grid",
    "grid_to_tokens",
    "pointwise_backend",
    "set_pointwise_backend",
    "pointwise_measurements",
    "conv_activation_fusion",
    "set_conv_activation_fusion",
    "linear_channels_last",
    "linear_rows",
    "pointwise",
    "use_conv_pointwise",
    "per_token_module",
    "onednn_activation",
    "conv_act_applies",
    "depthwise_act",
    "pointwise_replacement",
]

POINTWISE_ENV = "LOCALIFY_POINTWISE"
POINTWISE_BACKENDS = ("auto", "conv", "linear", "measure")
CONV_ACT_ENV = "LOCALIFY_CONV_ACT"
CONV_ACT_CHOICES = ("auto", "on", "off")


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


def nchw_view(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, W, C) map -> the (B, C, H, W) channels-last view the convolutions take (``x`` is made
    contiguous first if it is not).

    Under ``torch.compile``, and for one sample whose batch stride is not H*W*C, the view is written with
    explicit strides: a permuted view of one sample may get a batch stride of 0 in compiled code (a buffer
    reused in place), and oneDNN then runs the conv in NCHW with a transposing copy in and out (deit_tiny
    ``localvit`` fused, batch 1: 1.35-1.44x the original compiled, against 1.14-1.21x with the strides kept).
    Otherwise, and always under ``torch.export``, it is the plain permute (the same strides there)."""
    if not x.is_contiguous():
        x = x.contiguous()
    if not tracing():
        b, h, w, c = x.shape
        if torch.compiler.is_compiling() or x.stride(0) != h * w * c:
            return x.as_strided((b, c, h, w), (h * w * c, 1, w * c, c))
    return x.permute(0, 3, 1, 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) image -> (B, H*W, C) tokens; a view when ``x`` is channels-last."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


# --- point-wise primitive --------------------------------------------------------------------------------
def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _auto_backend() -> str:
    """``conv`` where PyTorch's BLAS is MKL and the CPU is an AMD one, ``linear`` everywhere else.

    MKL takes a slower code path on AMD CPUs than oneDNN does. On an AMD EPYC (AVX-512) with torch 2.14 and 2
    threads, a (B x 14 x 14, 192) -> 768 projection ran 2.0-2.3x faster as a 1x1 convolution of the
    channels-last map than through ``F.linear`` at B = 16 (1.8x forward + backward) and 1.4-1.7x at B = 1;
    with 1 thread 2.1x at B = 16 and 0.96x at B = 1. On an Intel Xeon (AVX-512) the conv was the slower one:
    (14 x 14, 192) -> 768 and back took 1.41x / 1.29x the ``F.linear`` time at B = 1 and 1.07x / 0.96x at
    B = 16 with 2 threads (1.06x / 1.08x and 1.05x / 0.83x with 1 thread), so ``F.linear`` stays there. Where
    nothing was measured (ARM, other BLAS) the model's own primitive is kept too.
    """
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkl.is_available()):
        return "linear"
    return "conv" if "AuthenticAMD" in _cpu_vendor() else "linear"


class _Setting:
    """A process-wide choice: set by a function, else by an environment variable as it was when localify was
    imported (or when the setter was last called with None), else ``auto``, resolved by the CPU."""

    def __init__(self, env: str, what: str, choices: tuple[str, ...], auto: Any) -> None:
        self.env, self.what, self.choices, self.auto = env, what, choices, auto
        self.setting: str | None = None
        self.value = self._resolve(os.environ.get(env))

    def _resolve(self, name: str | None) -> str:
        name = (name or "auto").strip().lower() or "auto"
        if name not in self.choices:
            warnings.warn(f"localify: {self.env}={name!r} is not one of {self.choices}; using 'auto'",
                          stacklevel=4)
            name = "auto"
        return self.auto() if name == "auto" else name

    def set(self, name: str | None) -> str | None:
        if name is not None and name not in self.choices:
            raise ValueError(f"localify: unknown {self.what} {name!r}; choose one of {self.choices}")
        prev, self.setting = self.setting, name
        self.value = self._resolve(name if name is not None else os.environ.get(self.env))
        return prev


# resolved at import (never inside a compiled region: torch.compile cannot trace the CPU checks)
_AUTO_POINTWISE = _auto_backend()
_pointwise = _Setting(POINTWISE_ENV, "point-wise backend", POINTWISE_BACKENDS, lambda: _AUTO_POINTWISE)


class _Measured:
    """``measure`` mode of :func:`pointwise`: for each kind of call (input shape and contiguity, weight shape,
    bias, ``batch``, grad mode, thread count) the first calls alternate between the two primitives, each call
    timed where it runs in the model (caches and threads as they are there, which a loop of its own does not
    reproduce); after ``trials`` calls of each, the one with the lower median is kept for that kind of call.
    Thread-safe: concurrent calls may add samples to the same kind; the choice is made once."""

    trials = 7

    def __init__(self) -> None:
        self.clock = time.perf_counter  # replaced by tests
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.samples: dict[tuple, tuple[list[float], list[float]]] = {}
            self.choice: dict[tuple, bool] = {}  # True: conv

    def run(self, key: tuple, conv: Any, linear: Any) -> torch.Tensor:
        chosen = self.choice.get(key)
        if chosen is None:
            with self.lock:  # checked again: another thread may have just decided (and dropped the samples)
                chosen = self.choice.get(key)
                if chosen is None:
                    conv_t, lin_t = self.samples.setdefault(key, ([], []))
                    use_conv = len(conv_t) <= len(lin_t)
        if chosen is not None:
            return conv() if chosen else linear()
        t = self.clock()
        y = conv() if use_conv else linear()
        t = self.clock() - t
        with self.lock:
            (conv_t if use_conv else lin_t).append(t)
            if key not in self.choice and min(len(conv_t), len(lin_t)) >= self.trials:
                self.choice[key] = statistics.median(conv_t) < statistics.median(lin_t)
                del self.samples[key]
        return y


_measured = _Measured()


def pointwise_backend() -> str:
    """How converted blocks run point-wise projections of a token grid in eager mode: ``conv``, ``linear`` or
    ``measure`` (``auto`` is resolved to one of the first two).

    ``linear`` is ``F.linear`` (MKL's sgemm on x86 builds); ``conv`` is a 1x1 ``F.conv2d`` of the grid's
    channels-last view (oneDNN; with one thread and fewer than 16 samples PyTorch's own rule sends a 1x1 conv
    to its native GEMM path instead, which ran within 10% of ``F.linear`` in a loop at batch 1 and 4). Both
    compute the same product (float rounding aside, about 1e-7 relative).
    Set by :func:`set_pointwise_backend`, else by the ``LOCALIFY_POINTWISE`` environment variable (``conv``,
    ``linear``, ``measure`` or ``auto``) as it was when localify was imported, else ``auto``: ``conv`` on AMD
    CPUs with an MKL build, ``linear`` elsewhere. ``conv`` applies to float32 CPU tensors. Under
    ``torch.export`` (ONNX export) the 1x1-conv form is always used. :func:`pointwise` is where the choice is
    applied.

    ``measure`` (opt-in, like ``torch.backends.cudnn.benchmark``): in eager mode the first calls of each kind
    (shapes, batch, grad mode, thread count) alternate between both primitives, timed where they run in the
    model, and the faster is kept from then on (:func:`pointwise_measurements`); the first forward passes
    then mix both, so their outputs differ from later ones by float rounding (about 1e-7 relative), and two
    processes may choose differently. Only the forward is timed. Under ``torch.compile`` it acts as ``auto``.
    Measured on an AMD EPYC (Zen 4, 2 threads) whose ``auto`` choice, the conv, was the slower one at batch
    1 and the faster at batch 16. The choices hold for the process (as cuDNN's benchmark cache does), also
    across switches of the backend.
    """
    return _pointwise.value


def set_pointwise_backend(name: str | None) -> str | None:
    """Choose the eager point-wise primitive (``conv``, ``linear``, ``measure``, ``auto``; None: back to the
    ``LOCALIFY_POINTWISE`` environment variable, read now, or ``auto``). Returns the previous setting.
    See :func:`pointwise_backend`."""
    return _pointwise.set(name)


def pointwise_measurements() -> dict[tuple, str]:
    """What ``measure`` mode (:func:`pointwise_backend`) chose so far: ``{kind of call: "conv" | "linear"}``,
    a kind being (input shape, contiguous, weight shape, bias, batch, grad enabled, threads)."""
    with _measured.lock:
        return {k: "conv" if v else "linear" for k, v in _measured.choice.items()}


def _auto_conv_act() -> str:
    """``on`` where PyTorch has oneDNN and the CPU is an Intel one, ``off`` elsewhere.

    On an Intel Xeon (AVX-512, 2 threads, torch 2.14), deit_tiny converted with the default variant ran at
    1.08-1.10x the original at batch 16 with the GELU inside the depth-wise conv, against 1.15-1.16x with
    the conv and ``F.gelu`` apart (the same code otherwise, interleaved in one process): the activation then
    reads the wide map again, which the conv has just written. On an AMD EPYC (Zen 4, 2 threads), where the
    projections run as 1x1 convs (:func:`pointwise_backend`), it made no difference at batch 16 (0.98-1.01x
    the original either way, three runs of one process each), so it stays off there.
    """
    return "on" if torch.backends.mkldnn.is_available() and "GenuineIntel" in _cpu_vendor() else "off"


_conv_act = _Setting(CONV_ACT_ENV, "conv-activation setting", CONV_ACT_CHOICES, _auto_conv_act)


def conv_activation_fusion() -> bool:
    """Whether converted MLP blocks apply the activation inside the depth-wise conv (a oneDNN post-op,
    ``torch.ops.mkldnn._convolution_pointwise``) in eager inference, where the MLP is a timm ``Mlp`` with a
    supported activation (see :meth:`LocalityMLP.conv_act_chain`). Set by :func:`set_conv_activation_fusion`,
    else by the ``LOCALIFY_CONV_ACT`` environment variable (``on``, ``off``, ``auto``) as it was when localify
    was imported, else ``auto``: on for Intel CPUs with oneDNN, off elsewhere. The results are the same as
    the conv and the activation apart (oneDNN's GELU is the one ``F.gelu`` runs on CPU; about 1e-7 otherwise).
    """
    return _conv_act.value == "on"


def set_conv_activation_fusion(name: str | None) -> str | None:
    """Choose ``on``, ``off`` or ``auto`` (None: back to ``LOCALIFY_CONV_ACT``, read now, or ``auto``);
    returns the previous setting. See :func:`conv_activation_fusion`."""
    return _conv_act.set(name)


def linear_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a (B, H, W, C) ``x``, computed as a 1x1 convolution of its
    channels-last view; the (B, H, W, out) result is a view of the (channels-last) conv output."""
    return F.conv2d(nchw_view(x), weight[:, :, None, None], bias).permute(0, 2, 3, 1)


def _hook_free(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def exporting() -> bool:
    """True while ``torch.export`` traces (ONNX export included), not under ``torch.compile``."""
    return torch.compiler.is_exporting()


def use_conv_pointwise(x: torch.Tensor) -> bool:
    """Whether a point-wise projection of ``x`` runs as a 1x1 convolution (see :func:`pointwise`): always
    under ``torch.export``; in eager mode and under ``torch.compile`` when :func:`pointwise_backend` is
    ``conv``, for float32 CPU tensors. With ``measure`` it tells whether the conv is a candidate (eager; under
    ``torch.compile`` the ``auto`` choice)."""
    if exporting():
        return True
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    name = _pointwise.value
    if name == "measure":
        return not torch.compiler.is_compiling() or _AUTO_POINTWISE == "conv"
    return name == "conv"


def linear_rows(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: Any) -> torch.Tensor:
    """``F.linear`` of contiguous (..., C) rows as a 1x1 convolution of a (groups, C, R / groups, 1)
    channels-last view (oneDNN runs one image per group; ``groups`` is the batch size and divides the R rows);
    the result has the shape of ``rows`` with ``out`` features."""
    y = linear_channels_last(rows.reshape(groups, -1, 1, rows.shape[-1]), weight, bias)
    return y.reshape(*rows.shape[:-1], y.shape[-1])


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: Any = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the point-wise primitive of converted blocks: a 1x1 convolution
    where :func:`use_conv_pointwise` says so, else ``F.linear``.

    ``x`` is a (B, H, W, C) grid (the result is then a view of the channels-last conv output), (B, N, C)
    tokens, or (R, C) rows of ``batch`` samples. Tokens and rows run as a (B, C, N, 1) image in eager mode
    only: under ``torch.compile`` (and ``torch.export``) they take ``F.linear``, which measured faster there
    in the model (deit_tiny, one sample: 1.05x the original with ``F.linear``, 1.16x with the conv). 2-D rows
    without ``batch`` always take ``F.linear``: those are a block's few extra tokens, for which a conv call
    costs more than the product. In ``measure`` mode (:func:`pointwise_backend`) eager calls where the conv
    applies take whichever of the two measured faster for their kind of call."""
    if x.dim() == 4:
        conv = use_conv_pointwise(x)
    else:
        conv = not torch.compiler.is_compiling() and (x.dim() == 3 or batch is not None) and use_conv_pointwise(x)
    if not conv:
        return F.linear(x, weight, bias)
    if _pointwise.value == "measure" and not capturing() and not exporting():
        key = (tuple(x.shape), x.is_contiguous(), tuple(weight.shape), bias is not None, batch,
               torch.is_grad_enabled(), torch.get_num_threads())
        return _measured.run(key, lambda: _conv_pointwise(x, weight, bias, batch),
                             lambda: F.linear(x, weight, bias))
    return _conv_pointwise(x, weight, bias, batch)


def _conv_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: Any) -> torch.Tensor:
    if x.dim() == 4:
        return linear_channels_last(x, weight, bias)
    return linear_rows(x, weight, bias, x.shape[0] if x.dim() == 3 else batch)


class PointwiseLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state-dict keys, same results) that projects a (B, H, W, C)
    grid as a 1x1 convolution where that is faster (:func:`use_conv_pointwise`) and always when exported.

    ``localify()`` swaps it in (:func:`pointwise_replacement`) for the second projection of an MLP that runs as
    a :class:`LocalityMLP`, so the grid stays in one layout from fc1 to fc2. Other inputs, and a layer with
    hooks, take ``F.linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() in (3, 4) and _hook_free(self):
            return pointwise(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def pointwise_replacement(module: nn.Module) -> PointwiseLinear | None:
    """A :class:`PointwiseLinear` to swap in for ``module``, or None when ``module`` is not a plain
    ``nn.Linear`` without hooks (it is then kept as it is).

    The replacement holds the same ``Parameter`` objects and attributes (training mode included) in containers
    of its own, so swapping it in keeps the parameters, state-dict keys and any optimizer state; ``module``
    itself is not changed (a failure before the swap leaves the model as it was)."""
    if type(module) is not nn.Linear or any(v for k, v in vars(module).items() if "hooks" in k):
        return None
    new = copy.copy(module)  # shares the containers (parameter dict, hook dicts...): give it its own
    for k, v in list(vars(new).items()):
        if isinstance(v, (dict, set)):
            object.__setattr__(new, k, copy.copy(v))
    new.__class__ = PointwiseLinear
    return new


# --- LocalityLinear --------------------------------------------------------------------------------------
class LocalityLinear(LocalifyModule):
    """A Linear followed by a depth-wise conv over the token grid; extra tokens skip the conv.

    Inputs with layout ``"BNC"``: (B, N, C) tokens (prefix + grid + suffix); a (B, H, W, C) map, which is the
    grid alone (how :class:`LocalityMLP` hands over the grid tokens); or (R, C) rows of tokens that have no
    grid (the conv is skipped: :class:`LocalityMLP`'s extra tokens). With layout ``"BHWC"``: (B, H, W, C).

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
        return type(conv) is nn.Conv2d and _hook_free(conv)

    def _plain_linear(self) -> bool:
        """Whether ``linear`` is a plain, hook-free Linear that may be called functionally (as a 1x1 conv).
        A hooked or wrapped projection (PEFT, localify's own tracing) is always called as a module."""
        lin = self.linear
        return type(lin) in (nn.Linear, PointwiseLinear) and _hook_free(lin)

    def _conv_padded(self, g: torch.Tensor) -> torch.Tensor:
        """The conv of a (B, C, H, W) grid with one extra output row above and below (``_plain_conv()``)."""
        conv = self.dwconv
        k = conv.kernel_size[0] // 2
        y = F.conv2d(g, conv.weight, conv.bias, 1, (k + 1, k), 1, conv.groups)
        if self.residual:  # h + dw(h), added into the fresh conv output
            y.narrow(2, 1, g.shape[2]).add_(g)
        return y

    def conv_act(self, h: torch.Tensor, act: tuple[str, str | None]) -> torch.Tensor:
        """The depth-wise conv of a projected (B, H, W, C) map ``h`` with the activation ``act`` inside it
        (:func:`depthwise_act`; non-residual, ``_plain_conv()``, stride 1: :meth:`LocalityMLP.conv_act_chain`).
        The result is a (B, H, W, C) view of the channels-last conv output."""
        conv = self.dwconv
        return depthwise_act(nchw_view(h), conv.weight, conv.bias, conv.padding, conv.groups,
                             act).permute(0, 2, 3, 1)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The projection of a (B, H, W, C) grid or (B, N, C) tokens (:func:`pointwise`: a view of a
        channels-last tensor when it runs as a 1x1 conv)."""
        if self._plain_linear():
            return pointwise(x, self.linear.weight, self.linear.bias)
        return self.linear(x)

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) grid -> projection and conv -> (B, H, W, out), a view of the channels-last conv output."""
        return self._conv(nchw_view(self._project(x))).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # layout BHWC, or the grid alone
            return self._grid(x)
        if x.dim() == 2:  # tokens without a grid
            return self.linear(x)
        hw = self.grid_source.get()
        n = x.shape[1]
        p, s = self.prefix, self.suffix
        check_tokens(n, hw, p, s)
        if p == 0 and s == 0:
            return self._grid(x.unflatten(1, hw)).flatten(1, 2)
        # no shape guard when exporting: check tracing() first
        if not tracing() and x.shape[0] == 1 and max(p, s) <= hw[1] and self._plain_conv():
            # One sample: the grid rows of the full projection are already a channels-last image. One
            # extra row of padding above and below the grid leaves room in the conv output for the prefix
            # tokens (end of the top row) and the suffix tokens (start of the bottom row), so the tokens
            # come back as a view of it; only the few extra tokens are copied.
            h = self._project(x)
            y = self._conv_padded(rows_to_grid(h, p, hw))
            return tokens_around_grid(grid_to_tokens(y), h, hw[1], p, s)
        # Project the grid tokens on their own so the hidden grid is contiguous (channels-last for the
        # conv, no copy of the wide hidden tensor); the few extra tokens are projected separately. The
        # narrow inputs are made contiguous first: a strided input would take matmul's slower path (a copy
        # anyway, then the bias added in a separate pass over the wide output).
        grid = x[:, p:n - s].contiguous().unflatten(1, hw)
        if not tracing() and not torch.is_grad_enabled() and max(p, s) <= hw[1] and self._plain_conv():
            # Inference: the row-padded conv as for one sample; every sample's tokens are a dense block of
            # its padded output, so the result is a view with a batch stride of (H + 2) * W tokens (what
            # comes next, the activation, reads it in one pass) and nothing wide is concatenated.
            y = grid_to_tokens(self._conv_padded(nchw_view(self._project(grid))))
            out = y.narrow(1, hw[1] - p, n)
            if p:
                out.narrow(1, 0, p).copy_(self._rows(x[:, :p]))
            if s:
                out.narrow(1, n - s, s).copy_(self._rows(x[:, n - s:]))
            return out
        # With autograd (or when exporting): one concatenation of the hidden tensor, the price of returning
        # every token as one dense tensor (LocalityMLP avoids it); its gradient is a split.
        z = self._grid(grid).flatten(1, 2)
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


def onednn_activation(act: nn.Module) -> tuple[str, str | None] | None:
    """The oneDNN post-op (``attr``, ``algorithm`` of ``torch.ops.mkldnn._convolution_pointwise``) that computes
    the activation module ``act`` exactly as its forward does, or None: ``nn.GELU`` (erf or tanh), ``nn.ReLU``,
    ``nn.SiLU``, ``nn.Hardswish``; exact classes only, without hooks."""
    if not _hook_free(act):
        return None
    t = type(act)
    if t is nn.GELU:
        return "gelu", act.approximate
    return {nn.ReLU: ("relu", None), nn.SiLU: ("swish", None), nn.Hardswish: ("hardswish", None)}.get(t)


def conv_act_applies(x: torch.Tensor) -> bool:
    """Whether a depth-wise conv of ``x`` may run with the activation inside (:func:`depthwise_act`): eager
    inference (no autograd, no graph capture or export) on a float32 CPU tensor of more than one sample (with
    one the map is in cache, and the post-op measured slower), with oneDNN enabled and
    :func:`conv_activation_fusion` on."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and x.shape[0] > 1
            and not capturing() and conv_activation_fusion()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def depthwise_act(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Any, groups: int,
                  act: tuple[str, str | None]) -> torch.Tensor:
    """``act(F.conv2d(g, weight, bias, 1, padding, 1, groups))`` as one oneDNN convolution with the activation
    as a post-op (``act`` from :func:`onednn_activation`): the conv output is written once, activated, instead
    of being read again by the activation. ``g`` is (B, C, H, W), channels-last for a channels-last result.
    Only where :func:`conv_act_applies` (the op has no autograd and is not exported)."""
    return torch.ops.mkldnn._convolution_pointwise(g, weight, bias, list(padding), [1, 1], [1, 1], groups,
                                                   act[0], [], act[1])


# --- LocalityMLP -----------------------------------------------------------------------------------------
# nn.Module internals that LocalityMLP shares with the MLP module it stands for (the same dict / set objects,
# so a child replaced on either, e.g. by PEFT, is replaced on both).
_SHARED = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules", "_forward_hooks",
           "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
           "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
           "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class LocalityMLP(nn.Module):
    """A per-token MLP module whose first projection(s) are :class:`LocalityLinear`, run so that the wide
    hidden tensor is never concatenated: grid tokens and extra tokens go through the whole MLP separately.

    The MLP module's own ``forward`` runs twice: on the grid tokens as a (B, H, W, C) map (its fc1 then
    projects and convolves the grid, everything after it sees a (B, H, W, hidden) map) and on the prefix and
    suffix tokens of every sample as (rows, C) (fc1 skips the conv); the two results are joined on the
    ``out``-wide side. That requires an MLP whose ``forward`` treats every token on its own and accepts any
    number of leading dimensions (element-wise activations, dropout, LayerNorm over channels, ``chunk`` on
    the last dim: timm ``Mlp``, ``GluMlp``, ``SwiGLU``, Hugging Face 5.x ``mlp`` modules); see
    :func:`per_token_module`. Without extra tokens, or with one sample in eager mode, the MLP runs once on
    all tokens as before; so it does when this module has hooks (one observed call per MLP call).

    The wrapper stands in for the MLP module: it shares its parameters, buffers, children and hooks (the same
    dictionaries), so state-dict keys and module names are the MLP's (``fc1.linear.weight``,
    ``fc1.dwconv.weight``, ``fc2.weight``, ...), a child replaced on the wrapper (PEFT) is replaced in the
    MLP, and attributes it lacks are read from the MLP. :meth:`get_base_layer` returns the MLP module.
    The constructor changes nothing in ``mlp``. ``localify()`` also swaps in the :func:`pointwise_replacement`
    of the MLP's second projection (a :class:`PointwiseLinear`: same parameters and results; it projects the
    hidden map as a 1x1 convolution where that is faster, and in an exported graph, so the hidden grid keeps
    one layout from fc1 to fc2).

    Args:
        mlp: the MLP module, its fc1(s) already replaced by :class:`LocalityLinear`.
        grid: where the token grid is read at run time (None with layout ``"BHWC"``).
        prefix, suffix: tokens before / after the grid (as in the fc1 :class:`LocalityLinear`).
        layout: ``"BNC"`` (tokens) or ``"BHWC"`` (maps: the MLP simply runs on the map).
    """

    def __init__(self, mlp: nn.Module, grid: GridSource | None, prefix: int = 0, suffix: int = 0,
                 layout: str = "BNC") -> None:
        super().__init__()
        if layout not in ("BNC", "BHWC"):
            raise ConfigError(f"localify: unknown layout {layout!r}; choose 'BNC' or 'BHWC'")
        if layout == "BNC" and grid is None:
            raise ConfigError("localify: layout 'BNC' needs a grid source (GridSource) for the (H, W) token grid")
        if prefix < 0 or suffix < 0:
            raise ConfigError(f"localify: prefix and suffix must be >= 0, got {prefix} and {suffix}")
        object.__setattr__(self, "_base", mlp)  # not a child: its children are this module's children
        for name in _SHARED:
            if hasattr(mlp, name):
                object.__setattr__(self, name, getattr(mlp, name))
        self.training = mlp.training
        self.prefix = prefix
        self.suffix = suffix
        self.layout = layout
        self.grid_source = grid

    def get_base_layer(self) -> nn.Module:
        """The MLP module this block runs (it shares its parameters and children with this one)."""
        return self._base

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None or name.startswith("__"):
                raise
            return getattr(base, name)

    def train(self, mode: bool = True) -> LocalityMLP:
        super().train(mode)
        self._base.training = mode
        return self

    def extra_repr(self) -> str:
        return (f"{type(self._base).__name__}, prefix={self.prefix}, suffix={self.suffix}, "
                f"layout={self.layout}")

    def conv_act_chain(self) -> tuple[LocalityLinear, tuple[str, str | None], nn.Module] | None:
        """(fc1, oneDNN activation, fc2) when the grid may run as fc1's projection, the depth-wise conv with the
        activation inside (:meth:`LocalityLinear.conv_act`) and fc2, which is what the MLP's own forward
        computes: the MLP is a timm ``Mlp`` (that class exactly: ``fc1 -> act -> drop1 -> norm -> fc2 ->
        drop2``) with a non-residual :class:`LocalityLinear` fc1 over a plain Linear and conv, an activation
        :func:`onednn_activation` knows, no norm, inactive dropout, a plain Linear fc2, and no hooks on any of
        them. None otherwise (the MLP's forward then runs as it is)."""
        mlp = self._base
        timm_mlp = sys.modules.get("timm.layers.mlp")
        if timm_mlp is None or type(mlp) is not getattr(timm_mlp, "Mlp", None):
            return None
        fc1, fc2, rest = mlp.fc1, mlp.fc2, (mlp.drop1, mlp.norm, mlp.drop2)
        conv = fc1.dwconv if type(fc1) is LocalityLinear else None
        if not (conv is not None and not fc1.residual and fc1.layout == "BNC" and _hook_free(fc1)
                and fc1._plain_linear() and fc1._plain_conv() and conv.padding_mode == "zeros"
                and conv.stride == (1, 1) and conv.dilation == (1, 1)):
            return None
        if type(fc2) not in (nn.Linear, PointwiseLinear) or not all(map(_hook_free, (fc2, *rest))):
            return None
        if type(mlp.norm) is not nn.Identity or not all(
                type(d) is nn.Identity or (type(d) is nn.Dropout and (not d.training or d.p == 0))
                for d in (mlp.drop1, mlp.drop2)):
            return None
        act = onednn_activation(mlp.act)
        return None if act is None else (fc1, act, fc2)

    def _grid(self, g: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The MLP on a (B, H, W, C) grid map: in eager inference on CPU float32 with
        :func:`conv_activation_fusion` on and a :meth:`conv_act_chain`, as fc1's projection, the conv with the
        activation inside and fc2; otherwise the MLP's own forward."""
        if not args and not kwargs and conv_act_applies(g):
            chain = self.conv_act_chain()
            if chain is not None:
                fc1, act, fc2 = chain
                return pointwise(fc1.conv_act(fc1._project(g), act), fc2.weight, fc2.bias)
        return self._base.forward(g, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        run = self._base.forward  # not __call__: the MLP's hooks are this module's (shared), already run
        if self.layout == "BHWC" or x.dim() != 3:
            return run(x, *args, **kwargs)
        b, n, c = x.shape
        hw = self.grid_source.get()
        p, s = self.prefix, self.suffix
        check_tokens(n, hw, p, s)
        if p == 0 and s == 0:
            return self._grid(x.unflatten(1, hw), args, kwargs).flatten(1, 2)
        if self._forward_hooks or self._forward_pre_hooks or (b == 1 and not capturing()):
            # One sample in eager mode: fc1 runs on every token and its conv output has room for the extra
            # tokens (LocalityLinear's row-padded path); nothing wide is concatenated either. With hooks
            # (localify's own trace records every module call) the MLP also runs once, on all tokens.
            return run(x, *args, **kwargs)
        m = n - p - s
        pre, grid, suf = x.split([p, m, s], dim=1)
        # contiguous once here (narrow), not in each fc1 (SwiGLU has two)
        yg = self._grid(grid.contiguous().unflatten(1, hw), args, kwargs).flatten(1, 2)  # (B, M, out)
        extra = pre if not s else suf if not p else torch.cat([pre, suf], dim=1)
        ye = run(extra.reshape(-1, c), *args, **kwargs)  # (B * (p + s), out): a few rows
        ye = ye.view(b, p + s, ye.shape[-1])
        parts = [yg]
        if p:
            parts.insert(0, ye[:, :p])
        if s:
            parts.append(ye[:, p:])
        return torch.cat(parts, dim=1)  # out-wide


def per_token_module(mlp: nn.Module, in_features: int) -> bool:
    """Whether ``mlp`` maps every token on its own and accepts any leading dimensions, as
    :class:`LocalityMLP` needs: its output on 6 random rows equals its output on the same rows shaped
    (2, 3, C) and (1, 2, 3, C). Run in eval mode without autograd on the module's device and dtype; the
    module is left as it was (mode included). Call it on the MLP before its fc1 is replaced. A module that
    raises on these inputs, or whose outputs cannot be compared (not tensors, another device), is not one."""
    try:
        p = next(iter(mlp.parameters()), None)
        kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        x = torch.randn(6, in_features, generator=torch.Generator().manual_seed(0)).to(**kw)
        with eval_mode(mlp), torch.no_grad():
            y2 = mlp(x)
            y3 = mlp(x.view(2, 3, -1))
            y4 = mlp(x.view(1, 2, 3, -1))
        if not all(isinstance(y, torch.Tensor) for y in (y2, y3, y4)) or y2.dim() != 2 \
                or y3.shape != (2, 3, *y2.shape[1:]) or y4.shape != (1, 2, 3, *y2.shape[1:]):
            return False
        tol = 1e-5 * float(y2.abs().max()) + 1e-6
        return (bool((y3.reshape(y2.shape) - y2).abs().max() <= tol)
                and bool((y4.reshape(y2.shape) - y2).abs().max() <= tol))
    except Exception:
        return False


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
    """True while ``torch.export`` (ONNX export included) or TorchScript traces the model: take the
    shape-generic path there, with no guard on the batch size or the grid. ``torch.compile`` specialises on
    shapes (with guards), so shape-specific paths may apply there."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def capturing() -> bool:
    """True while a graph is captured: ``torch.compile``, ``torch.export`` (ONNX export included) or a
    TorchScript trace. The one-sample paths (fc1 over every token, a row-padded conv, the extra tokens copied
    into its output) are for eager mode only: in a captured graph the grid runs as a (1, H, W, C) map with
    the extra tokens apart, which measured faster under torch.compile (deit_tiny, batch 1: the ``localvit``
    block 0.99-1.00x the original against 1.09-1.10x, ``dwconv`` 1.06-1.13x against 1.08-1.13x)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def rows_to_grid(h: torch.Tensor, start: int, hw: tuple[int, int]) -> torch.Tensor:
    """Rows ``start .. start + H*W`` of one sample's tokens ``h`` ((N, C) or (1, N, C)) as a (1, C, H, W)
    channels-last view (:func:`nchw_view`)."""
    c, (gh, gw) = h.shape[-1], hw
    return nchw_view(h.reshape(-1).narrow(0, start * c, gh * gw * c).view(1, gh, gw, c))


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
