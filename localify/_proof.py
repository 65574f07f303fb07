"""Proof that the tokens entering an MLP form a raster-order 2-D grid of the input image.

The traced graph is run once on the example inputs, carrying next to every real value a *position code*:
for a tensor of shape ``S`` a float64 tensor of shape ``S + (4,)`` giving, per element, ``(batch index,
extra index, y, x)`` of the image pixel(s) it stands for, in input pixel coordinates. The extra index is
the frame of a video (B, T, C, H, W) or the tile of a (B, I, T, C, H, W) input, 0 for a plain image.
``NaN`` means "no position" (parameters, constants, learned tokens, padding) and ``+inf`` means "tokens of
different positions were mixed elementwise".

Codes start at the image pixels and follow the graph op by op (the table :data:`_RULES`):

* layout ops (reshape, permute, slice, cat, gather, roll, pad, pixel shuffle, unfold ...) move the codes
  exactly as they move the values, using the real index values where indices are data;
* elementwise ops keep the position of the element at the same index: mixing two positions marks a
  conflict; a statistic broadcast over tokens (a squeeze-excite gate, a global token) does not move a
  token, and two paths that meet within half a cell (a stride-2 conv and its shortcut) are one token;
* contractions keep the row: a Linear's output carries the centroid of its input channels' positions
  (a 2x2 patch merge gives the merged cell's centre), attention outputs carry the query's position,
  recurrent layers the step's;
* windowed spatial ops (conv, pools, fold) place each output cell at its window's centre (its central
  taps; the op's own padding continues the lattice), interpolation at the point it samples, reductions
  at the centroid of what they reduce;
* an op the table does not know stops the proof for everything derived from it, except that an op whose
  output has the shape of a coded input keeps that input's positions (as elementwise ops do).

Only values that indices, masks or data-dependent sizes are computed from are computed for real; every
other op contributes its traced shape (``node.meta["val"]``), so a proof costs a fraction of an export.

At each MLP input the codes must show one contiguous run of image tokens, all from their own image, one
position per token (constant over channels), laid out row-major on an evenly spaced lattice. Everything
else is reported in one sentence (a permutation of a grid, windows folded into the batch, frames or tiles
sharing the token axis, channels used as tokens, ...).
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx

from ._ops import op_name, owner, reshape_groups

__all__ = ["GridProof", "prove_grids"]

K = 4  # (batch, extra, y, x)
TOL = 1e-6
_NAN = float("nan")
_INF = float("inf")
_DT = torch.float64
LAYOUTS = ("BNC", "BHWC")


@dataclass(frozen=True)
class GridProof:
    """Whether the tokens entering one MLP were proven to be a raster grid, and which one."""

    ok: bool  # proven raster grid
    reason: str  # "" when ok; otherwise what was found, one sentence
    prefix: int = 0
    suffix: int = 0
    grid: tuple[int, int] | None = None  # (H, W) at the traced size
    stride: tuple[float, float] | None = None  # pixel spacing between neighbouring cells
    # set (with ok=False) when the grid tokens [prefix, N - suffix) are a raster grid's cells in another
    # order: permutation[i] is the raster index (row * W + col) of the i-th grid token
    permutation: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Unknown:
    """Codes that could not be followed; everything derived from them is unprovable."""

    reason: str


def _where(node: fx.Node) -> str:
    return f"{op_name(node)} in {owner(node) or 'the top-level module'}"


# --------------------------------------------------------------------------------------------------- code helpers
def _real_shape(c: torch.Tensor) -> tuple[int, ...]:
    return tuple(c.shape[:-1])


def _nan_codes(shape: Iterable[int], device: Any = None) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    return torch.full((1,) * len(shape) + (K,), _NAN, dtype=_DT, device=device).expand(*shape, K)


def _full(c: Any, shape: Iterable[int], device: Any = None) -> torch.Tensor:
    return c if isinstance(c, torch.Tensor) else _nan_codes(shape, device)


def _bcast(c: torch.Tensor, dim: int) -> bool:
    """True if the codes are one value repeated along ``dim`` (stride 0 or size 1)."""
    return c.shape[dim] == 1 or c.stride(dim) == 0


def _compact(ts: list[torch.Tensor], skip: Iterable[int] = ()) -> tuple[list[torch.Tensor], list[int]]:
    """Narrow the real dims along which every tensor is a broadcast copy (ops then run on the small ones)."""
    rank = ts[0].dim() - 1
    skip = {s % rank for s in skip} if rank else set()
    dims = [d for d in range(rank) if d not in skip and ts[0].shape[d] > 1
            and all(t.shape[d] == ts[0].shape[d] and _bcast(t, d) for t in ts)]
    out = []
    for t in ts:
        for d in dims:
            t = t.narrow(d, 0, 1)
        out.append(t)
    return out, dims


def _nanmean(c: torch.Tensor, dims: Iterable[int]) -> torch.Tensor:
    """Mean over real ``dims`` (keepdim) ignoring NaN; +inf (conflict) propagates. Dims that are broadcast
    copies stay broadcast (nothing is materialised)."""
    rank = c.dim() - 1
    dims = sorted({d % rank for d in dims}) if rank else []
    shape = list(c.shape)
    for d in dims:
        shape[d] = 1
    (small,), _ = _compact([c])
    for d in dims:
        if small.shape[d] > 1:
            small = torch.nanmean(small, dim=d, keepdim=True)
    return small.expand(*shape)


def _reshape(c: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Reshape codes to real ``shape`` without materialising dims that are broadcast copies."""
    shape = tuple(int(s) for s in shape)
    real = _real_shape(c)
    if real == shape:
        return c
    groups = reshape_groups(real, shape) if math.prod(real) == math.prod(shape) and 0 not in real else None
    if groups is None:
        return c.reshape(*shape, K)
    small_out = list(shape)
    for gi, go in groups:
        if gi and any(real[i] > 1 for i in gi) and all(_bcast(c, i) for i in gi):
            for i in gi:
                c = c.narrow(i, 0, 1)
            for o in go:
                small_out[o] = 1
    return c.reshape(*small_out, K).expand(*shape, K)


def _expand(c: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    return c.expand(*tuple(int(s) for s in shape), K)


class _Mixer:
    """What the last elementwise combination mixed: "" (nothing), "positions", or "images" (tokens of
    different images, as when per-image queries are paired with another image's windows)."""

    def __init__(self) -> None:
        self.mixed = ""


def _const_dims(c: torch.Tensor, shape: tuple[int, ...]) -> int:
    """How many dims of ``shape`` (of size > 1) the codes are constant along once broadcast to it."""
    (small,), narrowed = _compact([_expand(c, shape)])
    n = sum(1 for d in narrowed if shape[d] > 1)
    for d in range(len(shape)):
        if shape[d] == 1 or d in narrowed:
            continue
        first = small.narrow(d, 0, 1)
        same = torch.isclose(small, first, rtol=0.0, atol=TOL, equal_nan=True) | (small == first)
        n += int(bool(same.all()))
    return n


def _combine(codes: list[Any], shape: tuple[int, ...], mixer: _Mixer) -> Any:
    """Elementwise combination: each output element keeps the position of the input elements at its index.

    An input whose positions are constant along more of the output's dims than another's (a statistic such
    as a squeeze-excite gate, a global token, a norm over tokens) modulates the tokens and does not move
    them; among the inputs that vary most, two coded elements that disagree become a conflict (+inf)."""
    coded: list[torch.Tensor] = []
    for c in codes:
        if isinstance(c, torch.Tensor) and not any(c is p for p in coded):
            coded.append(c)
    if not coded:
        return None
    if len(coded) == 1:
        return _expand(coded[0], shape)
    small, _ = _compact([_expand(c, shape) for c in coded])
    if all(bool(torch.isclose(small[0], b, rtol=0.0, atol=TOL, equal_nan=True).all()) for b in small[1:]):
        return _expand(small[0], shape)  # the common case: the same positions on every path
    const = [_const_dims(c, shape) for c in coded]
    least = min(const)
    exp = [_expand(c, shape) for c, n in zip(coded, const) if n == least]
    if len(exp) == 1:
        return exp[0]
    small, _ = _compact(exp)
    a = small[0]
    for b in small[1:]:
        a, b = torch.broadcast_tensors(a, b)
        # two paths that reach the same cell through different windows (a stride-2 conv and a 2x2 pool or
        # 1x1 stride-2 shortcut) disagree by at most half a cell: the same token. Batch and extra must match.
        half = 0.5 * min(_cell(a), _cell(b))
        tol = torch.tensor([TOL, TOL, half, half] if math.isfinite(half) else [TOL] * K, dtype=_DT,
                           device=a.device)
        both = ~(torch.isnan(a) | torch.isnan(b))
        differ = both & ~((a - b).abs() <= tol + TOL) & ~(a == b)
        conflict = differ.any(dim=-1, keepdim=True)
        a = torch.where(torch.isnan(a), b, torch.where(torch.isnan(b), a, (a + b) / 2))
        if bool(conflict.any()):
            mixer.mixed = mixer.mixed or "positions"
            if bool((differ[..., 0] & conflict[..., 0]).any()):
                mixer.mixed = "images"
            a = a.masked_fill(conflict, _INF)
    return _expand(a, shape)


def _cell(c: torch.Tensor) -> float:
    """Smallest spacing in y or x between neighbouring elements along any dim (inf if none)."""
    best = _INF
    for d in range(c.dim() - 1):
        n = c.shape[d]
        if n < 2 or c.stride(d) == 0:
            continue
        diff = (c.narrow(d, 1, n - 1)[..., 2:] - c.narrow(d, 0, n - 1)[..., 2:]).abs()
        diff = diff[torch.isfinite(diff) & (diff > TOL)]
        if diff.numel():
            best = min(best, float(diff.min()))
    return best


# --------------------------------------------------------------------------------------------------- op view
_INDEX_ARGS = frozenset({"index", "indices", "mask", "condition"})


class _Op:
    """One op application as a rule sees it: real arguments and codes by schema name, the real output."""

    def __init__(self, node: fx.Node, args: tuple, kwargs: dict, cargs: tuple, ckwargs: dict, out: Any,
                 mixer: _Mixer, dev: torch.device) -> None:
        self.node = node
        self.dev = dev  # where the codes live (the image's device; values may be meta tensors)
        self.target = node.target
        self.name = op_name(node)
        self.out = out
        self.mixer = mixer
        self._args, self._kwargs = args, kwargs
        schema = getattr(node.target, "_schema", None)
        self.names = [a.name for a in schema.arguments] if schema is not None else []
        self.real = self._bind(schema, args, kwargs, defaults=True)
        self.codes = self._bind(schema, cargs, ckwargs, defaults=False)

    def _bind(self, schema: Any, args: tuple, kwargs: dict, defaults: bool) -> dict[str, Any]:
        if schema is None:
            return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        d: dict[str, Any] = {}
        for name, v in zip(self.names, args):
            d[name] = v
        d.update(kwargs)
        if defaults:
            for a in schema.arguments:
                if a.name not in d and a.has_default_value():
                    d[a.name] = a.default_value
        return d

    def a(self, name: str, default: Any = None) -> Any:
        v = self.real.get(name, default)
        return default if v is None else v

    def c(self, name: str) -> Any:
        return self.codes.get(name)

    def call(self, replace: dict[str, Any]) -> Any:
        """Run the same op with some arguments replaced (by schema name)."""
        args, kwargs = list(self._args), dict(self._kwargs)
        for name, v in replace.items():
            i = self.names.index(name)
            if i < len(args):
                args[i] = v
            else:
                kwargs[name] = v
        return self.target(*args, **kwargs)

    @property
    def rank(self) -> int:
        x = self.real.get("self", self.real.get("input"))
        return x.dim() if isinstance(x, torch.Tensor) else self.out.dim()

    def nd(self, d: int, rank: int | None = None) -> int:
        r = self.rank if rank is None else rank
        return d % r if r else 0

    def unknown(self, what: str = "") -> _Unknown:
        what = what or f"op {self.name}"
        return _Unknown(f"cannot follow {what} ({_where(self.node)}), so the token positions after it are "
                        f"unknown")


Rule = Callable[[_Op], Any]
_RULES: dict[str, Rule] = {}


_SELF_ONLY: set[Rule] = set()  # rules that follow the codes of ``self`` / ``input`` alone


def _rule(*names: str, self_only: bool = False) -> Callable[[Rule], Rule]:
    def reg(fn: Rule) -> Rule:
        for n in names:
            _RULES[n] = fn
        if self_only:
            _SELF_ONLY.add(fn)
        return fn

    return reg


def _self(op: _Op) -> Any:
    return op.c("self") if "self" in op.codes else op.c("input")


def _self_real(op: _Op) -> Any:
    return op.real.get("self", op.real.get("input"))


# --------------------------------------------------------------------------------------------------- 1. layout ops
@_rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
       "reshape_as", "_reshape_alias", "view_copy", "clone", "contiguous", "alias", "detach", "_to_copy",
       "to", "type_as", "lift_fresh_copy", "lift_fresh", "dropout", "feature_dropout", "alpha_dropout",
       "feature_alpha_dropout", "detach_", "squeeze_copy", "unsqueeze_copy", "alias_copy", self_only=True)
def _r_reshape(op: _Op) -> Any:
    return _reshape(_self(op), op.out.shape)


@_rule("native_dropout", self_only=True)
def _r_native_dropout(op: _Op) -> Any:
    c = _self(op)
    return [c, c]


@_rule("permute", "permute_copy", self_only=True)
def _r_permute(op: _Op) -> Any:
    return _self(op).permute(*[op.nd(d) for d in op.a("dims")], op.rank)


@_rule("transpose", "transpose_copy", self_only=True)
def _r_transpose(op: _Op) -> Any:
    return _self(op).transpose(op.nd(op.a("dim0")), op.nd(op.a("dim1")))


@_rule("t", "t_copy", self_only=True)
def _r_t(op: _Op) -> Any:
    c = _self(op)
    return c.transpose(0, 1) if op.rank == 2 else c


@_rule("movedim", "moveaxis", self_only=True)
def _r_movedim(op: _Op) -> Any:
    src, dst = op.a("source"), op.a("destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    return torch.movedim(_self(op), [op.nd(d) for d in src], [op.nd(d) for d in dst])


@_rule("expand", "expand_as", "broadcast_to", "expand_copy", self_only=True)
def _r_expand(op: _Op) -> Any:
    return _expand(_self(op), op.out.shape)


@_rule("slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind", "tensor_split",
       "index_select", "flip", "slice_copy", "select_copy", "narrow_copy", "unbind_copy", "split_copy",
       "split_with_sizes_copy", self_only=True)
def _r_dim_op(op: _Op) -> Any:
    """Ops whose only layout argument is a dim (or dims): run them on the codes with dims counted from 0."""
    repl: dict[str, Any] = {"self": _self(op)}
    for key in ("dim", "dims"):
        if key in op.names:
            v = op.real.get(key, 0 if key == "dim" else None)
            if v is None:
                continue
            repl[key] = [op.nd(d) for d in v] if isinstance(v, (list, tuple)) else op.nd(v)
    out = op.call(repl)
    return list(out) if isinstance(out, (list, tuple)) else out


@_rule("roll", self_only=True)
def _r_roll(op: _Op) -> Any:
    c = _self(op)
    dims = list(op.a("dims", []))
    shifts = op.a("shifts")
    if not dims:  # roll of the flattened tensor
        s = shifts[0] if isinstance(shifts, (list, tuple)) else shifts
        return c.reshape(-1, K).roll(s, 0).reshape(c.shape)
    return c.roll(shifts, [op.nd(d) for d in dims])


@_rule("cat", "concat", "concatenate")
def _r_cat(op: _Op) -> Any:
    tensors = [t for t in op.a("tensors") if not (t.dim() == 1 and t.shape[0] == 0)]
    codes = [c for t, c in zip(op.a("tensors"), op.c("tensors")) if not (t.dim() == 1 and t.shape[0] == 0)]
    rank = op.out.dim()
    d = op.nd(op.a("dim", 0), rank)
    full = [_full(c, t.shape, op.dev) for t, c in zip(tensors, codes)]
    small, dims = _compact(full, skip=[d])
    if all(_bcast(p, d) for p in small):  # channel groups of one token (as after grouped convs): still one
        first = small[0].narrow(d, 0, 1)
        if all(bool(torch.isclose(first, p.narrow(d, 0, 1), rtol=0.0, atol=TOL, equal_nan=True).all())
               for p in small[1:]):
            return _expand(first, op.out.shape)
    return _expand(torch.cat(small, d), op.out.shape) if dims else torch.cat(full, d)


@_rule("stack")
def _r_stack(op: _Op) -> Any:
    tensors = op.a("tensors")
    full = [_full(c, t.shape, op.dev) for t, c in zip(tensors, op.c("tensors"))]
    return torch.stack(full, op.nd(op.a("dim", 0), op.out.dim()))


@_rule("index", self_only=True)
def _r_index(op: _Op) -> Any:
    return torch.ops.aten.index.Tensor(_self(op), op.a("indices"))


@_rule("gather", self_only=True)
def _r_gather(op: _Op) -> Any:
    idx = op.a("index")
    return _self(op).gather(op.nd(op.a("dim")), idx.unsqueeze(-1).expand(*idx.shape, K))


@_rule("take_along_dim", self_only=True)
def _r_take_along_dim(op: _Op) -> Any:
    idx, dim = op.a("indices"), op.real.get("dim")
    c = _self(op)
    if dim is None:
        return c.reshape(-1, K)[idx.reshape(-1)].reshape(*idx.shape, K)
    return torch.take_along_dim(c, idx.unsqueeze(-1), dim=op.nd(dim))


@_rule("take", self_only=True)
def _r_take(op: _Op) -> Any:
    idx = op.a("index")
    return _self(op).reshape(-1, K)[idx.reshape(-1)].reshape(*idx.shape, K)


@_rule("repeat", self_only=True)
def _r_repeat(op: _Op) -> Any:
    return _self(op).repeat(*op.a("repeats"), 1)


@_rule("repeat_interleave", self_only=True)
def _r_repeat_interleave(op: _Op) -> Any:
    c, dim = _self(op), op.real.get("dim")
    if not isinstance(c, torch.Tensor):
        return c if c is None else op.unknown()
    reps = op.a("repeats")
    if dim is None:
        return c.reshape(-1, K).repeat_interleave(reps, dim=0)
    return c.repeat_interleave(reps, dim=op.nd(dim))


@_rule("unfold", self_only=True)
def _r_unfold(op: _Op) -> Any:
    c = _self(op).unfold(op.nd(op.a("dimension")), op.a("size"), op.a("step"))
    return c.movedim(-2, -1)


@_rule("index_put", "_index_put_impl", "index_put_")
def _r_index_put(op: _Op) -> Any:
    x, v = _self(op), op.c("values")
    if op.a("accumulate", False) and v is not None:
        return op.unknown("an accumulating index_put")
    x = _full(x, _self_real(op).shape, op.dev).clone()
    vals = op.a("values")
    v = _full(v, vals.shape, op.dev)
    return x.index_put(tuple(op.a("indices")), v)


@_rule("scatter", "scatter_")
def _r_scatter(op: _Op) -> Any:
    if op.real.get("reduce") is not None:
        return op.unknown("a reducing scatter")
    x = _full(_self(op), _self_real(op).shape, op.dev)
    idx = op.a("index")
    src = op.real.get("src")
    if isinstance(src, torch.Tensor):
        s = _full(op.c("src"), src.shape, op.dev)
    else:
        s = _nan_codes(idx.shape, op.dev)
    sl = tuple(slice(0, n) for n in idx.shape)
    return x.scatter(op.nd(op.a("dim")), idx.unsqueeze(-1).expand(*idx.shape, K), s[sl].contiguous())


@_rule("scatter_add", "scatter_reduce", "index_add", "index_reduce")
def _r_scatter_add(op: _Op) -> Any:
    src = op.c("src") if "src" in op.codes else op.c("source")
    if src is not None:
        return op.unknown("an accumulating scatter")
    return _reshape(_full(_self(op), _self_real(op).shape, op.dev), op.out.shape)


@_rule("masked_fill", "masked_fill_")
def _r_masked_fill(op: _Op) -> Any:
    x = _full(_self(op), _self_real(op).shape, op.dev)
    v = op.c("value")
    v = v if isinstance(v, torch.Tensor) else _nan_codes((), op.dev)
    mask = op.a("mask")
    return torch.where(mask.unsqueeze(-1), v, x).expand(*op.out.shape, K)


@_rule("where")
def _r_where(op: _Op) -> Any:
    if "self" not in op.names:  # where(condition) is nonzero
        return op.unknown()
    a, b = op.c("self"), op.c("other")
    if a is None and b is None:
        return None
    cond = op.a("condition")
    dev = op.dev
    ra, rb = op.real.get("self"), op.real.get("other")
    a = _full(a, ra.shape if isinstance(ra, torch.Tensor) else (), dev)
    b = _full(b, rb.shape if isinstance(rb, torch.Tensor) else (), dev)
    return torch.where(cond.unsqueeze(-1), a, b).expand(*op.out.shape, K)


@_rule("masked_scatter", "masked_scatter_")
def _r_masked_scatter(op: _Op) -> Any:
    x = _full(_self(op), _self_real(op).shape, op.dev)
    src = op.a("source")
    s = _full(op.c("source"), src.shape, op.dev).contiguous()
    mask = op.a("mask")
    return x.masked_scatter(mask.unsqueeze(-1).expand(*x.shape), s)


@_rule("copy", "copy_")
def _r_copy(op: _Op) -> Any:
    src = op.a("src")
    return _full(op.c("src"), src.shape, op.dev).expand(*op.out.shape, K)


@_rule("fill", "fill_", "zero", "zero_", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
       "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty", "new_full", "bernoulli", "normal_",
       "uniform_", "empty_strided", "_assert_tensor_metadata", "sym_size", "sym_numel", "sym_stride")
def _r_none(op: _Op) -> Any:
    return None


def _kfirst(c: torch.Tensor) -> torch.Tensor:
    return c.movedim(-1, 0)


def _klast(c: torch.Tensor) -> torch.Tensor:
    return c.movedim(0, -1)


@_rule("pixel_shuffle", "pixel_unshuffle", self_only=True)
def _r_pixel_shuffle(op: _Op) -> Any:
    return _klast(op.call({"self": _kfirst(_self(op)).contiguous()}))


@_rule("channel_shuffle", "native_channel_shuffle", self_only=True)
def _r_channel_shuffle(op: _Op) -> Any:
    c, g = _self(op), int(op.a("groups"))
    b, ch, *rest = c.shape
    return c.reshape(b, g, ch // g, *rest).transpose(1, 2).reshape(c.shape)


@_rule("rot90", self_only=True)
def _r_rot90(op: _Op) -> Any:
    return torch.rot90(_self(op), op.a("k", 1), [op.nd(d) for d in op.a("dims", [0, 1])])


@_rule("fft_fftshift", "fft_ifftshift", self_only=True)
def _r_fftshift(op: _Op) -> Any:
    c = _self(op)
    dims = op.real.get("dim")
    dims = list(range(op.rank)) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = [op.nd(d) for d in dims]
    sign = 1 if op.name == "fft_fftshift" else -1
    return c.roll([sign * (c.shape[d] // 2) for d in dims], dims)


@_rule("fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2", "fft_fftn", "fft_ifftn", "fft_rfft", "fft_irfft",
       "fft_rfft2", "fft_irfft2", "fft_rfftn", "fft_irfftn", "fft_hfft", "fft_ihfft", "_fft_r2c", "_fft_c2r",
       "_fft_c2c", "stft", "istft")
def _r_spectral(op: _Op) -> Any:
    # an element of a spectrum is a frequency, not a position (and a spectral filter is a global circular
    # convolution): no rule of thumb gives the positions after these ops
    return op.unknown("a Fourier transform")


@_rule("constant_pad_nd", self_only=True)
def _r_constant_pad(op: _Op) -> Any:
    return _pad_nan(_self(op), op.a("pad"))


def _pad_nan(c: torch.Tensor, pad: list[int]) -> torch.Tensor:
    """Constant padding of the last len(pad) // 2 real dims: the new cells have no position."""
    rank = c.dim() - 1
    m = len(pad) // 2
    (small,), dims = _compact([c], skip=range(rank - m, rank))
    r = _klast(torch.constant_pad_nd(_kfirst(small), pad, _NAN))
    shape = list(r.shape)
    for d in dims:
        shape[d] = c.shape[d]
    return r.expand(*shape)


@_rule("pad", self_only=True)
def _r_pad(op: _Op) -> Any:
    pad, mode = op.a("pad"), op.a("mode", "constant")
    if mode == "constant":
        return _pad_nan(_self(op), pad)
    n = len(pad) // 2
    return _per_channel(_self(op), n, lambda t: _chan_apply(t, lambda u: torch.ops.aten.pad(u, pad, mode)))


@_rule("reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
       "replication_pad3d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
       "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", self_only=True)
def _r_spatial_gather(op: _Op) -> Any:
    n = int(op.name[-2])
    fn = op.call
    return _per_channel(_self(op), n, lambda t: _chan_apply(t, lambda u: fn({_first_name(op): u})))


def _first_name(op: _Op) -> str:
    return op.names[0]


@_rule("im2col", self_only=True)
def _r_im2col(op: _Op) -> Any:
    c = _self(op)
    x = _self_real(op)
    unbatched = x.dim() == 3
    if unbatched:
        c = c.unsqueeze(0)
    kernel, dilation, padding, stride = (list(op.a(k))
                                         for k in ("kernel_size", "dilation", "padding", "stride"))
    chan = c.narrow(1, 0, 1) if _bcast(c, 1) else c
    b, cs, h, w = _real_shape(chan)
    t = chan.permute(4, 0, 1, 2, 3).reshape(K * b, cs, h, w)
    # padded cells take the lattice positions they would have (as for conv): a window's centroid stays its
    # centre. They are channels of a token, never tokens themselves.
    t = _extrapolate(_extrapolate(t, 2, padding[0], padding[0]), 3, padding[1], padding[1])
    cols = F.unfold(t, kernel, dilation=dilation, padding=0, stride=stride)  # (K*b, cs*kk, L)
    kk = kernel[0] * kernel[1]
    cols = cols.reshape(K, b, cs, kk, -1).permute(1, 2, 3, 4, 0)
    cc = c.shape[1]
    cols = cols.expand(b, cc, kk, cols.shape[3], K).reshape(b, cc * kk, -1, K)
    return cols.squeeze(0) if unbatched else cols


@_rule("col2im", self_only=True)
def _r_col2im(op: _Op) -> Any:
    """Fold: a pixel sits under the central tap of a window when one lands on it, else at the centroid of
    the windows covering it. Windows continue the lattice past the border (as padding does for a conv), so
    border pixels see the same set of windows as inner ones."""
    c = _self(op)
    x = _self_real(op)
    if x.dim() != 3:
        return op.unknown()
    b, ckk, n = x.shape
    size, kernel, dilation, padding, stride = (
        list(op.a(k)) for k in ("output_size", "kernel_size", "dilation", "padding", "stride"))
    grid = [(size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    if grid[0] * grid[1] != n:
        return op.unknown()
    ext = [-(-(dilation[i] * (kernel[i] - 1) + 1) // stride[i]) for i in range(2)]
    kk = kernel[0] * kernel[1]
    chans = ckk // kk
    per = c.reshape(b, chans, kk, n, K)
    if chans > 1 and (_bcast(per, 1) or bool(torch.isclose(per, per[:, :1], rtol=0.0, atol=TOL,
                                                            equal_nan=True).all())):
        one = _r_col2im_codes(per[:, :1].reshape(b, kk, n, K), b, kk, n, grid, ext, size, kernel, dilation,
                              padding, stride)
        return one.expand(b, chans, *one.shape[2:])  # every channel of a pixel: one position
    return _r_col2im_codes(c, b, ckk, n, grid, ext, size, kernel, dilation, padding, stride)


def _r_col2im_codes(c: torch.Tensor, b: int, ckk: int, n: int, grid: list[int], ext: list[int],
                    size: list[int], kernel: list[int], dilation: list[int], padding: list[int],
                    stride: list[int]) -> torch.Tensor:
    t = c.permute(3, 0, 1, 2).reshape(K * b, ckk, *grid)
    t = _extrapolate(_extrapolate(t, 2, ext[0], ext[0]), 3, ext[1], ext[1]).flatten(2)
    big = [size[i] + 2 * ext[i] * stride[i] for i in range(2)]

    def fn(u: torch.Tensor) -> torch.Tensor:
        r = F.fold(u, big, kernel, dilation=dilation, padding=padding, stride=stride)
        y0, x0 = ext[0] * stride[0], ext[1] * stride[1]
        return r[..., y0:y0 + size[0], x0:x0 + size[1]]

    kk = kernel[0] * kernel[1]
    centre = torch.zeros(kernel, dtype=torch.bool, device=c.device)
    centre[tuple(slice((k - 1) // 2, k // 2 + 1) for k in kernel)] = True
    rows = centre.flatten().repeat(ckk // kk).view(1, ckk, 1)
    res = _linear_map(t.masked_fill(~rows, _NAN), fn)
    if bool(torch.isnan(res).any()):
        res = torch.where(torch.isnan(res), _linear_map(t, fn), res)
    return res.reshape(K, b, *res.shape[1:]).movedim(0, -1)


@_rule("as_strided", "as_strided_copy", self_only=True)
def _r_as_strided(op: _Op) -> Any:
    x = _self_real(op)
    whole = x.untyped_storage().nbytes() == x.numel() * x.element_size()
    if not (x.is_contiguous() and x.storage_offset() == 0 and whole):
        return op.unknown("as_strided on a view")
    c = _self(op).contiguous()
    size, stride = op.a("size"), op.a("stride")
    off = op.real.get("storage_offset") or 0
    parts = [c[..., k].contiguous().as_strided(size, stride, off) for k in range(K)]
    return torch.stack(parts, -1)


@_rule("embedding")
def _r_embedding(op: _Op) -> Any:
    c = op.c("indices")
    if not isinstance(c, torch.Tensor):
        return c
    return c.unsqueeze(-2).expand(*op.out.shape, K)


# --------------------------------------------------------------------------------------------------- 2. same shape
_ELEMENTWISE = (
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
    "float_power", "maximum", "minimum", "fmax", "fmin", "atan2", "hypot", "copysign", "xlogy", "lerp",
    "addcmul", "addcdiv", "clamp", "clip", "clamp_min", "clamp_max", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "threshold",
    "prelu", "_prelu_kernel", "heaviside", "logaddexp", "logaddexp2", "max.other", "min.other", "nan_to_num",
)


@_rule(*_ELEMENTWISE)
def _r_elementwise(op: _Op) -> Any:
    codes = [c for n, c in op.codes.items()
             if n not in _INDEX_ARGS and isinstance(op.real.get(n), torch.Tensor)]
    return _combine(codes, tuple(op.out.shape), op.mixer)


@_rule("native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
       "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
       "_batch_norm_with_update", "_batch_norm_no_update", "cudnn_batch_norm", "miopen_batch_norm",
       self_only=True)
def _r_norm_tuple(op: _Op) -> Any:
    c = _self(op)
    return [c] + [None] * (len(op.out) - 1)


# --------------------------------------------------------------------------------------------------- 3. contractions
def _rows(a: torch.Tensor, out_shape: tuple[int, ...], squeeze: bool = False) -> torch.Tensor:
    """Each output row keeps the centroid of the row's positions over the contracted (last) dim."""
    r = _nanmean(a, [-1])
    if squeeze:
        r = r.squeeze(-2)
    return _expand(r, out_shape)


def _uniform(c: torch.Tensor, dim: int) -> bool:
    if not bool(torch.isfinite(c).all()):
        return False
    return bool((c.amax(dim) - c.amin(dim)).abs().max() <= TOL) if c.numel() else True


def _matmul_codes(a: Any, b: Any, ra: torch.Tensor, rb: torch.Tensor, out_shape: tuple[int, ...]) -> Any:
    if not isinstance(a, torch.Tensor):
        return a  # None (learned queries carry no position) or unknown
    if ra.dim() == 1:
        return _expand(_nanmean(a, [-1]).reshape(K), out_shape)
    rows = _nanmean(a, [-1])  # (..., n, 1, K)
    if isinstance(b, torch.Tensor) and rb.dim() >= 2 and _uniform(rows, -3):
        # every row of the first operand carries the same position (a channel-by-channel attention such as
        # XCiT's): the output keeps the columns of the second operand when those carry positions
        cols = _nanmean(b, [-2])  # (..., 1, m, K)
        if not _uniform(cols, -2):
            return _expand(cols, out_shape)
    if rb.dim() == 1:
        rows = rows.squeeze(-2)
    return _expand(rows, out_shape)


@_rule("linear")
def _r_linear(op: _Op) -> Any:
    a = op.c("input")
    return _rows(a, tuple(op.out.shape)) if isinstance(a, torch.Tensor) else a


@_rule("addmm", "addmv", "addbmm")
def _r_addmm(op: _Op) -> Any:
    a = op.c("mat1") if "mat1" in op.names else op.c("mat") if "mat" in op.names else op.c("batch1")
    return _rows(a, tuple(op.out.shape)) if isinstance(a, torch.Tensor) else a


@_rule("mm", "bmm", "matmul", "mv")
def _r_matmul(op: _Op) -> Any:
    other = "mat2" if "mat2" in op.names else "vec" if "vec" in op.names else "other"
    return _matmul_codes(op.c("self"), op.c(other), op.a("self"), op.a(other), tuple(op.out.shape))


@_rule("baddbmm")
def _r_baddbmm(op: _Op) -> Any:
    return _matmul_codes(op.c("batch1"), op.c("batch2"), op.a("batch1"), op.a("batch2"), tuple(op.out.shape))


@_rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
       "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
       "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
       "_scaled_dot_product_fused_attention_overrideable")
def _r_sdpa(op: _Op) -> Any:
    q = op.c("query")
    if not isinstance(q, torch.Tensor):
        return q
    rows = _nanmean(q, [-1])
    qshape = tuple(op.a("query").shape)
    outs = op.out if isinstance(op.out, (tuple, list)) else [op.out]
    res = []
    for o in outs:
        if isinstance(o, torch.Tensor) and o.dim() == len(qshape) and tuple(o.shape[:-1]) == qshape[:-1]:
            res.append(_expand(rows, o.shape))
        elif isinstance(o, torch.Tensor) and tuple(o.shape) == qshape[:-1]:
            res.append(rows.squeeze(-2))
        else:
            res.append(None)
    return res if isinstance(op.out, (tuple, list)) else res[0]


@_rule("einsum")
def _r_einsum(op: _Op) -> Any:
    eq = op.a("equation").replace(" ", "")
    tensors = op.a("tensors")
    codes = op.c("tensors")
    if not isinstance(codes[0], torch.Tensor):
        return codes[0] if isinstance(codes[0], _Unknown) else None
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    free = [ch for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if ch not in eq]
    ell = max((t.dim() - (len(s) - 3) for s, t in zip(ins, tensors) if "..." in s), default=0)
    ell_letters = "".join(free[:ell])

    def expand_ell(s: str, rank: int) -> str:
        if "..." not in s:
            return s
        n = rank - (len(s) - 3)
        return s.replace("...", ell_letters[ell - n:] if n else "")

    ins = [expand_ell(s, t.dim()) for s, t in zip(ins, tensors)]
    if not arrow:
        counts = {ch: lhs.count(ch) for ch in set(lhs.replace(",", "").replace(".", ""))}
        once = sorted(ch for ch, n in counts.items() if n == 1 and ch not in ell_letters)
        rhs = ell_letters + "".join(once)
    else:
        rhs = expand_ell(rhs, len(rhs) - 3 + ell if "..." in rhs else len(rhs))
    s0 = ins[0]
    if len(set(s0)) != len(s0):
        return op.unknown("an einsum with a repeated index")
    c = codes[0]
    if any(ch not in rhs for ch in s0):
        c = _nanmean(c, [i for i, ch in enumerate(s0) if ch not in rhs])
    kept = [ch for ch in s0 if ch in rhs]
    c = c.reshape(*[c.shape[i] for i, ch in enumerate(s0) if ch in rhs], K)
    c = c.permute(*[kept.index(ch) for ch in rhs if ch in kept], len(kept))
    shape = []
    it = iter(c.shape[:-1])
    for ch in rhs:
        shape.append(next(it) if ch in kept else 1)
    return _expand(c.reshape(*shape, K), op.out.shape)


# --------------------------------------------------------------------------------------------------- 4. spatial ops
def _tup(v: Any, n: int) -> list[int]:
    if isinstance(v, (list, tuple)):
        v = list(v)
        return v * n if len(v) == 1 else v
    return [int(v)] * n


def _per_channel(c: torch.Tensor, n: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` to codes laid out (1, L, *spatial, K), L the product of the leading (channel) dims."""
    rank = c.dim() - 1
    lead = tuple(c.shape[:rank - n])
    small, _ = _compact([c], skip=range(rank - n, rank))
    s = small[0]
    slead = tuple(s.shape[:rank - n])
    t = s.reshape(1, math.prod(slead), *s.shape[rank - n:])
    r = fn(t)
    r = r.reshape(*slead, *r.shape[2:])
    return r.expand(*lead, *r.shape[len(slead):])


def _chan_apply(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(1, L, *sp, K) -> run ``fn`` on (1, L*K, *sp) -> back; for gathers (nearest, reflect pads)."""
    _, l_, *sp, _k = t.shape
    u = t.movedim(-1, 2).reshape(1, l_ * K, *sp)
    r = fn(u)
    return r.reshape(1, l_, K, *r.shape[2:]).movedim(2, -1)


def _split_codes(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fin = torch.isfinite(u)
    return torch.where(fin, u, 0.0), fin.to(_DT), torch.isposinf(u).to(_DT)


def _ratio(s: torch.Tensor, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = s / m.clamp_min(1e-12)
    out = out.masked_fill(m < 1e-9, _NAN)
    return out.masked_fill(x > 1e-9, _INF)


def _linear_map(u: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Weighted nan-mean through a linear op with non-negative weights (pools, interpolation, fold)."""
    s, m, x = _split_codes(u)
    return _ratio(fn(s), fn(m), fn(x))


def _chan_linear(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return _chan_apply(t, lambda u: _linear_map(u, fn))


def _extrapolate(u: torch.Tensor, axis: int, left: int, right: int) -> torch.Tensor:
    """Pad ``axis`` by continuing the lattice linearly (border windows keep their centre on the lattice)."""
    if left <= 0 and right <= 0:
        return u
    n = u.shape[axis]
    first, last = u.narrow(axis, 0, 1), u.narrow(axis, n - 1, 1)
    d0 = first - u.narrow(axis, 1, 1) if n > 1 else torch.zeros_like(first)
    d1 = last - u.narrow(axis, n - 2, 1) if n > 1 else torch.zeros_like(last)
    view = [1] * u.dim()
    parts = []
    if left > 0:
        view[axis] = left
        parts.append(first + d0 * torch.arange(left, 0, -1, dtype=_DT, device=u.device).view(view))
    parts.append(u)
    if right > 0:
        view[axis] = right
        parts.append(last + d1 * torch.arange(1, right + 1, dtype=_DT, device=u.device).view(view))
    return torch.cat(parts, axis)


def _window(t: torch.Tensor, kernel: list[int], stride: list[int], dilation: list[int],
            pads: list[tuple[int, int]], out_sp: tuple[int, ...]) -> torch.Tensor:
    """Position of each window, per channel: ``t`` (1, L, *sp, K) -> (1, L, *out_sp, K).

    A window sits at its centre: the mean of its central taps (one per odd, two per even kernel side),
    which on a lattice equals the centroid of the whole window and does not move when padding or a
    partial window cuts cells off. The window's own padding continues the lattice; where the central taps
    hold no position (padding added by an earlier op), the centroid of the cells that do is used."""
    n = len(kernel)
    _, l_, *sp, _k = t.shape
    u = t.movedim(-1, 2).reshape(1, l_ * K, *sp)
    for i, (lo, hi) in enumerate(pads):
        u = _extrapolate(u, 2 + i, lo, hi)
    extra = []
    for i in range(n):  # ceil_mode windows that run past the end see fewer cells
        need = (out_sp[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1 - u.shape[2 + i]
        extra.append(max(0, need))
    if any(extra):
        pad = []
        for e in reversed(extra):
            pad += [0, e]
        u = torch.constant_pad_nd(u, pad, _NAN)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    w = torch.ones(l_ * K, 1, *kernel, dtype=_DT, device=u.device)
    centre = torch.zeros_like(w)
    centre[(slice(None), slice(None)) + tuple(slice((k - 1) // 2, k // 2 + 1) for k in kernel)] = 1.0

    def window(v: torch.Tensor, kern: torch.Tensor) -> torch.Tensor:
        return conv(v, kern, stride=stride, dilation=dilation, groups=l_ * K)

    r = _linear_map(u, lambda v: window(v, centre))
    if bool(torch.isnan(r).any()):
        r = torch.where(torch.isnan(r), _linear_map(u, lambda v: window(v, w)), r)
    r = r[(slice(None), slice(None)) + tuple(slice(0, o) for o in out_sp)]
    return r.reshape(1, l_, K, *r.shape[2:]).movedim(2, -1)


@_rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
       "conv_transpose3d", "mkldnn_convolution", "_conv_depthwise2d", "conv_tbc")
def _r_conv(op: _Op) -> Any:
    c = op.c("input") if "input" in op.names else op.c("self")
    if not isinstance(c, torch.Tensor):
        return c
    x = op.a("input") if "input" in op.names else op.a("self")
    w = op.a("weight")
    n = w.dim() - 2
    if n not in (1, 2, 3) or op.name == "conv_tbc":
        return op.unknown()
    kernel = list(w.shape[2:])
    transposed = op.name.startswith("conv_transpose") or bool(op.real.get("transposed", False))
    stride, dilation = _tup(op.a("stride", 1), n), _tup(op.a("dilation", 1), n)
    groups = int(op.a("groups", 1))
    out = op.out
    if x.dim() == n + 1:
        c, out_shape = c.unsqueeze(0), (1, *out.shape)
    else:
        out_shape = tuple(out.shape)
    b, cin = c.shape[:2]
    cout = out_shape[1]
    g = c.reshape(b, groups, cin // groups, *c.shape[2:])
    g = _nanmean(g, [2]).squeeze(2)  # (b, groups, *sp, K): centroid over each group's input channels
    out_sp = tuple(out_shape[2:])
    if transposed:
        padding, out_pad = _tup(op.a("padding", 0), n), _tup(op.a("output_padding", 0), n)
        convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]

        def fn(t: torch.Tensor) -> torch.Tensor:
            ones = torch.ones(t.shape[1], 1, *kernel, dtype=_DT, device=t.device)
            return convt(t, ones, stride=stride, padding=padding, output_padding=out_pad, groups=t.shape[1],
                         dilation=dilation)

        r = _per_channel(g, n, lambda t: _chan_linear(t, fn))
    else:
        pads = _conv_pads(op.a("padding", 0), kernel, dilation, n)
        r = _per_channel(g, n, lambda t: _window(t, kernel, stride, dilation, pads, out_sp))
    if tuple(r.shape[2:-1]) != out_sp:
        return op.unknown()
    r = _reshape(r.unsqueeze(2).expand(b, groups, cout // groups, *out_sp, K), (b, cout, *out_sp))
    return r.squeeze(0) if x.dim() == n + 1 else r


def _conv_pads(padding: Any, kernel: list[int], dilation: list[int], n: int) -> list[tuple[int, int]]:
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        tot = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in tot]
    return [(p, p) for p in _tup(padding, n)]


@_rule("avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
       "max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool1d_with_indices", "lp_pool1d",
       "lp_pool2d", self_only=True)
def _r_pool(op: _Op) -> Any:
    c = _self(op)
    if not isinstance(c, torch.Tensor):
        return c
    n = int(op.name.split("_pool")[1][0])
    kernel = _tup(op.a("kernel_size"), n)
    stride = _tup(op.a("stride") or kernel, n)
    dilation = _tup(op.a("dilation", 1), n)
    pads = [(p, p) for p in _tup(op.a("padding", 0), n)]
    outs = op.out if isinstance(op.out, (tuple, list)) else [op.out]
    out_sp = tuple(outs[0].shape[-n:])
    r = _per_channel(c, n, lambda t: _window(t, kernel, stride, dilation, pads, out_sp))
    if tuple(r.shape[:-1]) != tuple(outs[0].shape):
        return op.unknown()
    return [r] * len(outs) if isinstance(op.out, (tuple, list)) else r


@_rule("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d",
       "_adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
       self_only=True)
def _r_adaptive_pool(op: _Op) -> Any:
    c = _self(op)
    if not isinstance(c, torch.Tensor):
        return c
    n = int(op.name.split("_pool")[1][0])
    outs = op.out if isinstance(op.out, (tuple, list)) else [op.out]
    size = list(outs[0].shape[-n:])
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[n - 1]
    r = _per_channel(c, n, lambda t: _chan_linear(t, lambda u: pool(u, size)))
    return [r] * len(outs) if isinstance(op.out, (tuple, list)) else r


@_rule("upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d",
       "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", self_only=True)
def _r_interpolate(op: _Op) -> Any:
    """Each output cell sits where it samples the input: linear interpolation of the codes at the sampling
    coordinate (bicubic and antialiased kernels reproduce a lattice the same way), with the border
    continuing the lattice instead of clamping."""
    c = _self(op)
    if not isinstance(c, torch.Tensor):
        return c
    n = int(op.name.removesuffix("_aa")[-2])
    x = _self_real(op)
    align = bool(op.a("align_corners", False))
    factors = op.real.get("scale_factors")
    if factors is None:
        factors = [op.real.get(k) for k in ("scales_d", "scales_h", "scales_w")[3 - n:]] if n > 1 else \
            [op.real.get("scales")]
    rank = x.dim()
    for i in range(n):
        axis = rank - n + i
        size_in, size_out = x.shape[axis], op.out.shape[axis]
        f = factors[i] if factors and i < len(factors) else None
        if align:
            scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
            src = torch.arange(size_out, dtype=_DT, device=op.dev) * scale
        else:
            scale = 1.0 / f if f else size_in / size_out
            src = (torch.arange(size_out, dtype=_DT, device=op.dev) + 0.5) * scale - 0.5
        c = _interp_axis(c, axis, src)
    return c


def _interp_axis(c: torch.Tensor, axis: int, src: torch.Tensor) -> torch.Tensor:
    if _bcast(c, axis):
        return c.narrow(axis, 0, 1).expand(*c.shape[:axis], src.numel(), *c.shape[axis + 1:])
    pad = 2 + int(max(0.0, float(-src.min()), float(src.max()) - (c.shape[axis] - 1)))
    u = _extrapolate(c.movedim(axis, 0), 0, pad, pad)
    i0 = torch.floor(src)
    frac = (src - i0).view(-1, *([1] * (u.dim() - 1)))
    i0 = i0.to(torch.int64) + pad
    a, b = u.index_select(0, i0), u.index_select(0, i0 + 1)
    out = torch.where(frac == 0, a, (1 - frac) * a + frac * b)
    return out.movedim(0, axis)


@_rule("lstm", "gru", "rnn_tanh", "rnn_relu")
def _r_rnn(op: _Op) -> Any:
    """A recurrent layer's output at step t belongs to step t (as attention rows belong to their query)."""
    a = op.c("input")
    if not isinstance(a, torch.Tensor):
        return a
    return [_rows(a, tuple(op.out[0].shape))] + [None] * (len(op.out) - 1)


# reductions: the result keeps the centroid of the reduced elements' positions
@_rule("mean", "sum", "nansum", "nanmean", "amax", "amin", "max", "min", "var", "std", "var_mean",
       "std_mean", "logsumexp", "linalg_vector_norm", "norm", "prod", "argmax", "argmin", "all", "any",
       "median", "nanmedian", "kthvalue", "mode", "count_nonzero", "aminmax", self_only=True)
def _r_reduce(op: _Op) -> Any:
    c = _self(op)
    if not isinstance(c, torch.Tensor):
        return c
    rank = op.rank
    dim = op.real.get("dim")
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = list(range(rank))
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
    r = _nanmean(c, dims) if rank else c
    outs = op.out if isinstance(op.out, (tuple, list)) else [op.out]
    res = []
    for o in outs:
        if not isinstance(o, torch.Tensor):
            res.append(None)
        elif o.numel() == math.prod(r.shape[:-1]):
            res.append(_reshape(r, o.shape))
        else:
            return op.unknown()
    return res if isinstance(op.out, (tuple, list)) else res[0]


@_rule("sort", "topk", "argsort", "msort", self_only=True)
def _r_sort(op: _Op) -> Any:
    """Sorting moves elements: the values (and indices) take the codes of the elements they came from."""
    c = _self(op)
    if not isinstance(c, torch.Tensor):
        return c
    outs = op.out if isinstance(op.out, (tuple, list)) else [op.out]
    idx = outs[-1]
    dim = op.nd(op.real.get("dim", -1))
    g = _self(op).gather(dim, idx.unsqueeze(-1).expand(*idx.shape, K)) if idx.dim() else c
    return [g] * len(outs) if isinstance(op.out, (tuple, list)) else g


# --------------------------------------------------------------------------------------------------- 5. default
def _default(op: _Op, coded: list[Any]) -> Any:
    outs = op.out if isinstance(op.out, (tuple, list)) else [op.out]
    res = []
    for o in outs:
        if not isinstance(o, torch.Tensor):
            res.append(None)
            continue
        same = [c for c in coded if _real_shape(c) == tuple(o.shape)]
        if not same:
            return op.unknown()
        res.append(_combine(same, tuple(o.shape), op.mixer))
    return res if isinstance(op.out, (tuple, list)) else res[0]


def _lookup(node: fx.Node) -> Rule | None:
    name = op_name(node)
    overload = getattr(node.target, "_overloadname", "")
    for key in (f"{name}.{overload}", name):
        if key in _RULES:
            return _RULES[key]
    if name.endswith("_") and not name.startswith("_"):
        return _RULES.get(name[:-1])
    return None


# --------------------------------------------------------------------------------------------------- the check
def _nan_span(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, span) over ``dim`` ignoring NaN: value NaN where all are NaN."""
    nan = torch.isnan(t)
    lo = torch.where(nan, _INF, t).amin(dim)
    hi = torch.where(nan, -_INF, t).amax(dim)
    allnan = nan.all(dim)
    span = torch.where(allnan, 0.0, hi - lo)
    return lo.masked_fill(allnan, _NAN), span


def _rint(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v / TOL).to(torch.int64)


def _even(v: torch.Tensor) -> float | None:
    """The common positive step of an increasing sequence, or None."""
    if v.numel() < 2:
        return None
    d = v[1:] - v[:-1]
    step = float(d[0])
    if step <= TOL or bool(((d - step).abs() > TOL).any()):
        return None
    return step


def _raster(y: torch.Tensor, x: torch.Tensor) -> tuple[int, int, float, float] | None:
    """(H, W, dy, dx) if the positions are row-major on an evenly spaced lattice with H, W >= 2."""
    m = y.numel()
    w = int(((y - y[0]).abs() <= TOL).to(torch.int64).cumprod(0).sum())
    if w < 2 or m % w:
        return None
    h = m // w
    if h < 2:
        return None
    yy, xx = y.view(h, w), x.view(h, w)
    if bool(((yy - yy[:, :1]).abs() > TOL).any()) or bool(((xx - xx[:1]).abs() > TOL).any()):
        return None
    dx, dy = _even(xx[0]), _even(yy[:, 0])
    if dx is None or dy is None:
        return None
    return h, w, dy, dx


def _lattice(y: torch.Tensor, x: torch.Tensor) -> tuple[int, int, float, float, torch.Tensor] | None:
    """(H, W, dy, dx, raster index of each token) if the positions are the cells of a lattice in any order."""
    uy, ux = torch.unique(_rint(y)), torch.unique(_rint(x))
    h, w = uy.numel(), ux.numel()
    if h < 2 or w < 2 or h * w != y.numel():
        return None
    dy, dx = _even(uy.to(_DT) * TOL), _even(ux.to(_DT) * TOL)
    if dy is None or dx is None:
        return None
    iy = torch.searchsorted(uy, _rint(y))
    ix = torch.searchsorted(ux, _rint(x))
    perm = iy * w + ix
    if torch.unique(perm).numel() != perm.numel():
        return None
    return h, w, dy, dx, perm


def _tiles(t: torch.Tensor, extra_kind: str | None) -> str:
    """Reason for coded tokens carrying several extra (frame / tile) indices."""
    e = t[:, 1]
    vals = torch.unique(_rint(e))
    k = vals.numel()
    unit = "frame" if extra_kind == "time" else "tile"
    change = int((_rint(e[1:]) != _rint(e[:-1])).sum())
    blocks = None
    if change == k - 1 and t.shape[0] % k == 0:
        n = t.shape[0] // k
        grids = [_raster(t[i * n:(i + 1) * n, 2], t[i * n:(i + 1) * n, 3]) for i in range(k)]
        if all(g is not None for g in grids) and len({g[:2] for g in grids}) == 1:
            blocks = grids[0][:2]
    if extra_kind == "time":
        if blocks:
            return (f"the token axis merges time and space: {k} frames of {blocks[0]}x{blocks[1]} tokens "
                    f"follow each other on one axis")
        return f"the token axis merges time and space: tokens of {k} frames are interleaved on one axis"
    if blocks:
        return (f"{k} grids of {blocks[0]}x{blocks[1]} tokens (one per {unit}) are concatenated on one token "
                f"axis")
    return f"tokens of {k} {unit}s (or grids) are interleaved on one token axis"


def _check(codes: Any, shape: tuple[int, ...], layout: str, batch: int, extra_kind: str | None,
           note: str | None) -> GridProof:
    if isinstance(codes, _Unknown):
        return GridProof(False, codes.reason)
    if codes is None:
        return GridProof(False, "no token entering the MLP carries an image position (learned queries or "
                                "constant tokens only)")
    if layout == "BHWC":
        if len(shape) != 4:
            return GridProof(False, f"the MLP input has shape {shape}, not (B, H, W, C)")
        codes = _reshape(codes, (shape[0], shape[1] * shape[2], shape[3]))
    elif len(shape) != 3:
        return GridProof(False, f"the MLP input has shape {shape}, not (B, N, C)")
    b, n, ch = _real_shape(codes)
    if bool(torch.isposinf(codes).any()):
        kind, _, where = (note or "positions|").partition("|")
        at = f" (at {where})" if where else ""
        return GridProof(False, f"tokens of different {kind} are mixed elementwise{at}")
    if _bcast(codes, 2):
        tok = codes.select(2, 0)
    else:
        tok, span = _nan_span(codes, 2)
        if bool((span > TOL).any()):
            return GridProof(False, "the token axis is not the token identity: positions vary along the "
                                    "channel axis (the grid runs along the channels, or tokens are mixed "
                                    "into channels)")
    coded = torch.isfinite(tok).all(-1)
    if not bool(coded.any()):
        return GridProof(False, "no token entering the MLP carries an image position (learned or constant "
                                "tokens only)")
    bcode = tok[..., 0]
    want = torch.arange(b, dtype=_DT, device=tok.device).view(b, 1).expand(b, n)
    if bool(((bcode - want).abs() > TOL)[coded].any()):
        if b != batch:
            return GridProof(False, f"the MLP sees {b} sequences of {n} tokens, not the model's batch of "
                                    f"{batch}: windows or patches are folded into the batch")
        return GridProof(False, "tokens of several images are mixed in one sequence (the batch axis is not "
                                "the image index)")
    if b != batch:
        return GridProof(False, f"the MLP sees {b} sequences, not the model's batch of {batch}")
    same = bool((coded == coded[:1]).all())
    if same and b > 1:
        sp = tok[..., 1:]
        sp0 = sp[:1].expand_as(sp)
        same = bool(((sp - sp0).abs() <= TOL)[coded].all())
    if not same:
        return GridProof(False, "the token order differs between images (tokens are shuffled or selected per "
                                "image, as by random masking)")
    t, cm = tok[0], coded[0]
    ct = t[cm]
    if torch.unique(_rint(ct[:, 1])).numel() > 1:
        return GridProof(False, _tiles(ct, extra_kind))
    idx = torch.nonzero(cm).flatten()
    start, end = int(idx[0]), int(idx[-1]) + 1
    if end - start != idx.numel():
        gap = end - start - idx.numel()
        return GridProof(False, f"the image tokens are not one contiguous run: {gap} tokens without an image "
                                f"position sit among them")
    prefix, suffix = start, n - end
    y, x = t[start:end, 2], t[start:end, 3]
    m = end - start
    r = _raster(y, x)
    if layout == "BHWC" and r is not None and (r[0], r[1]) != (shape[1], shape[2]):
        return GridProof(False, f"the (B, H, W, C) axes are not the grid's rows and columns: the {m} tokens "
                                f"form a raster {r[0]}x{r[1]} grid only when flattened")
    if r is not None:
        return GridProof(True, "", prefix, suffix, (r[0], r[1]), (r[2], r[3]))
    lat = _lattice(y, x)
    if lat is not None:
        h, w, dy, dx, perm = lat
        what = "the (B, H, W, C) tokens" if layout == "BHWC" else "the tokens"
        col, row = torch.div(torch.arange(m, device=perm.device), h, rounding_mode="floor"), \
            torch.arange(m, device=perm.device) % h
        how = ("in column-major (transposed) order" if torch.equal(perm, row * w + col)
               else "not in raster order (blocks, windows or mask units)")
        return GridProof(False, f"{what} are a permutation of a {h}x{w} grid, {how}", prefix, suffix, (h, w),
                         (dy, dx), tuple(int(p) for p in perm))
    pos = torch.stack([_rint(y), _rint(x)], -1)
    distinct = torch.unique(pos, dim=0).shape[0]
    ny, nx = torch.unique(pos[:, 0]).numel(), torch.unique(pos[:, 1]).numel()
    if distinct < m:
        return GridProof(False, f"not a grid: the {m} tokens have only {distinct} distinct positions (tokens "
                                f"are duplicated or mixed)")
    if ny == 1 or nx == 1:
        line = "row" if ny == 1 else "column"
        return GridProof(False, f"a 1-D sequence: the {m} tokens lie on one {line} of the image")
    return GridProof(False, f"not a grid: the {m} token positions ({ny} distinct rows, {nx} distinct "
                            f"columns) do not form an evenly spaced lattice")


# --------------------------------------------------------------------------------------------------- interpreter
class _Runner:
    """Runs a graph on real values, carrying position codes for everything that depends on the image."""

    def __init__(self, batch: int, extra_kind: str | None, protected: set[int], device: torch.device,
                 real_all: bool) -> None:
        self.batch = batch
        self.extra_kind = extra_kind
        self.protected = protected
        self.device = device
        self.real_all = real_all  # False: only values that indices, masks or scalars depend on are computed
        self.mixer = _Mixer()
        self.proofs: dict[fx.Node, GridProof] = {}

    @staticmethod
    def _needed(nodes: list[fx.Node]) -> set[fx.Node]:
        """Nodes whose real values matter: indices, masks, sort orders, scalars read from data, and what they
        are computed from. Every other op runs on meta tensors (shapes only)."""
        needed: set[fx.Node] = set()
        for node in reversed(nodes):
            if node.op != "call_function":
                continue
            target = node.target
            schema = getattr(target, "_schema", None)
            name = op_name(node)
            if name in _SHAPE_OPS:
                continue  # sizes read from a meta tensor are the real sizes
            opaque = schema is None and target is not operator.getitem and not _is_python_op(target)
            if node in needed or opaque:
                needed.update(node.all_input_nodes)
                needed.add(node)
                continue
            if schema is None:
                continue
            mutated = [a for j, a in enumerate(schema.arguments) if a.alias_info is not None
                       and a.alias_info.is_write and _arg_node(node, j, a.name) in needed]
            if name in _VALUE_OPS or mutated or any(r.type.kind() not in _TENSOR_KINDS for r in schema.returns):
                # (an in-place op on a tensor whose data is read later must really run)
                needed.update(node.all_input_nodes)
                needed.add(node)
                continue
            for j, a in enumerate(schema.arguments):
                if a.name in _VALUE_ARGS:
                    v = node.args[j] if j < len(node.args) else node.kwargs.get(a.name)
                    for n in _nodes_in(v):
                        needed.add(n)
        return needed

    def run(self, gm: fx.GraphModule, inputs: list[Any], in_codes: list[Any],
            targets: dict[fx.Node, str] | None = None) -> tuple[Any, Any]:
        graph = gm.graph
        nodes = list(graph.nodes)
        targets = targets or {}
        needed = set() if self.real_all else self._needed(nodes)
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last[a] = i
        val: dict[fx.Node, Any] = {}
        code: dict[fx.Node, Any] = {}
        note: dict[fx.Node, str] = {}
        it = iter(zip(inputs, in_codes))
        out_val = out_code = None
        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                v, c = next(it, (None, None))
                val[node] = v
                if c is not None:
                    code[node] = c
            elif node.op == "get_attr":
                obj: Any = gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                val[node] = obj
                if isinstance(obj, torch.Tensor):
                    self.protected.add(obj.untyped_storage().data_ptr())
            elif node.op == "call_function":
                try:
                    self._call(gm, node, val, code, note, self.real_all or node in needed)
                except (_Stop, _Retry):
                    raise
                except Exception as e:  # the graph no longer runs: nothing after this can be proven
                    raise _Stop(f"could not re-run the traced graph at {_where(node)} ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
            elif node.op == "output":
                out_val = fx.node.map_arg(node.args[0], lambda n: val.get(n))
                out_code = fx.node.map_arg(node.args[0], lambda n: code.get(n))
            else:
                raise _Stop(f"cannot run graph node {node.op} {node.target}")
            if node in targets:
                v = val.get(node)
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else ()
                self.proofs[node] = _check(code.get(node), shape, targets[node], self.batch, self.extra_kind,
                                      note.get(node))
            for a in node.all_input_nodes:
                if last.get(a) == i:
                    val.pop(a, None)
                    code.pop(a, None)
                    note.pop(a, None)
            if not node.users and node.op != "output":
                val.pop(node, None)
                code.pop(node, None)
                note.pop(node, None)
        return out_val, out_code

    # -- one op
    def _call(self, gm: fx.GraphModule, node: fx.Node, val: dict, code: dict, note: dict, real: bool) -> None:
        target = node.target
        args = fx.node.map_arg(node.args, lambda n: val[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: val[n])
        seen_args, seen_kwargs = args, kwargs  # what the position rules see: indices and masks are real here
        coded_inputs = [n for n in node.all_input_nodes if code.get(n) is not None]
        if isinstance(target, torch._ops.HigherOrderOperator):
            if not real:
                args, kwargs = _to_meta(target, args, kwargs)
            self._hop(node, args, kwargs, val, code, coded_inputs)
            return
        schema = getattr(target, "_schema", None)
        written: list[tuple[int | str, fx.Node]] = []  # in-place ops: the arguments they write
        if schema is not None:
            for j, a in enumerate(schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    src = node.args[j] if j < len(node.args) else node.kwargs.get(a.name)
                    if isinstance(src, fx.Node):
                        written.append((j if j < len(node.args) else a.name, src))
        if not real and _concrete(node.meta.get("val")):
            # nothing downstream reads this value's data: the traced shapes are all the rules need
            out = node.meta["val"]
            val[node] = out
            if coded_inputs:
                self._after(node, seen_args, seen_kwargs, out, code, note, written)
            return
        if not real:
            try:
                args, kwargs = _to_meta(target, args, kwargs)
            except Exception as e:
                raise _Retry from e
        if written:  # never mutate parameters, buffers, constants or the caller's inputs
            args, kwargs = list(args), dict(kwargs)
            for key, src in written:
                v = args[key] if isinstance(key, int) else kwargs[key]
                if isinstance(v, torch.Tensor) and v.device.type != "meta" \
                        and v.untyped_storage().data_ptr() in self.protected:
                    v = v.clone()
                    if isinstance(key, int):
                        args[key] = v
                    else:
                        kwargs[key] = v
                    val[src] = v
            args = tuple(args)
        try:
            out = target(*args, **kwargs)
        except Exception as e:
            if not real:
                raise _Retry from e
            raise
        val[node] = out
        if coded_inputs:
            self._after(node, seen_args, seen_kwargs, out, code, note, written)

    def _after(self, node: fx.Node, args: tuple, kwargs: dict, out: Any, code: dict, note: dict,
               written: list) -> None:
        """Codes of ``node`` from its inputs' codes (at least one input has codes)."""
        coded_inputs = [n for n in node.all_input_nodes if code.get(n) is not None]
        self.mixer.mixed = ""
        c = self._codes(node, args, kwargs, out, code)
        if c is not None:
            code[node] = c
        origin = next((note[n] for n in coded_inputs if n in note), None)
        if self.mixer.mixed and origin is None:
            origin = f"{self.mixer.mixed}|{_where(node)}"
        if origin is not None:
            note[node] = origin
        for _, src in written:  # later readers of a mutated tensor see its new positions
            if c is None:
                code.pop(src, None)
            else:
                code[src] = c

    def _codes(self, node: fx.Node, args: tuple, kwargs: dict, out: Any, code: dict) -> Any:
        cargs = fx.node.map_arg(node.args, lambda n: code.get(n))
        ckwargs = fx.node.map_arg(node.kwargs, lambda n: code.get(n))
        if node.target is operator.getitem:
            src = cargs[0]
            if isinstance(src, (list, tuple)):
                return src[args[1]]
            return src if src is None or isinstance(src, _Unknown) else _Unknown(
                f"cannot follow an indexing of {_where(node)}")
        if not hasattr(node.target, "_schema"):
            if isinstance(out, torch.Tensor):
                return _Unknown(f"cannot follow {getattr(node.target, '__name__', node.target)} "
                                f"({_where(node)}), so the token positions after it are unknown")
            return None
        op = _Op(node, args, kwargs, cargs, ckwargs, out, self.mixer, self.device)
        relevant = []
        for name, c in op.codes.items():
            if name in _INDEX_ARGS:
                continue
            for x in (c if isinstance(c, (list, tuple)) else [c]):
                if isinstance(x, _Unknown):
                    return x
                if isinstance(x, torch.Tensor):
                    relevant.append(x)
        rule = _lookup(node)
        if not relevant and rule is not _r_embedding:
            return None
        if rule in _SELF_ONLY and not isinstance(_self(op), torch.Tensor):
            return None  # e.g. type_as / expand_as of a constant to the shape of an image tensor
        try:
            return _default(op, relevant) if rule is None else rule(op)
        except Exception as e:  # a rule that cannot handle this use of its op: unprovable, not fatal
            return op.unknown(f"op {op.name} ({type(e).__name__} in its position rule)")

    def _hop(self, node: fx.Node, args: tuple, kwargs: dict, val: dict, code: dict, coded: list) -> None:
        name = getattr(node.target, "__name__", str(node.target))
        sub = next((i for i, a in enumerate(args) if isinstance(a, fx.GraphModule)), None)
        if name in ("wrap_with_set_grad_enabled", "wrap_with_autocast") and sub is not None:
            operands = list(args[sub + 1:])
            ocodes = [code.get(a) if isinstance(a, fx.Node) else None for a in node.args[sub + 1:]]
            ctx: Any = contextlib.nullcontext()
            if name == "wrap_with_autocast":
                dev, dtype, enabled, cache = args[:4]
                ctx = torch.autocast(dev, dtype=dtype, enabled=enabled, cache_enabled=cache)
            saved, self.real_all = self.real_all, True  # the wrapped region runs as one opaque op: for real
            try:
                with ctx:
                    out, oc = self.run(args[sub], operands, ocodes)
            finally:
                self.real_all = saved
            val[node] = out
            if any(c is not None for c in ocodes):
                code[node] = list(oc) if isinstance(oc, (list, tuple)) else oc
            return
        val[node] = node.target(*args, **kwargs)
        if coded:
            code[node] = _Unknown(f"cannot follow {name} ({_where(node)}), so the token positions after it "
                                  f"are unknown")


class _Stop(Exception):
    pass


class _Retry(Exception):
    """An op could not run on meta tensors: run the whole graph again on real values."""


_SHAPE_OPS = frozenset({"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "stride", "dim",
                        "numel", "_assert_tensor_metadata"})
_VALUE_OPS = frozenset({
    "nonzero", "nonzero_static", "nonzero_numpy", "argwhere", "masked_select", "unique", "_unique",
    "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc", "_local_scalar_dense", "item",
    "equal", "is_nonzero", "allclose", "sort", "topk", "argsort", "msort", "as_strided", "as_strided_copy",
    "repeat_interleave", "_assert_async", "tolist",
})
_VALUE_ARGS = _INDEX_ARGS | {"repeats", "start", "length", "end", "tensor_indices_or_sections"}
_TENSOR_KINDS = frozenset({"TensorType", "ListType", "OptionalType"})
_META = torch.device("meta")


def _is_python_op(target: Any) -> bool:
    """Arithmetic on Python numbers / SymInts (sizes), which a meta run computes exactly."""
    return getattr(target, "__module__", None) in ("_operator", "operator", "math") or target in (
        torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not)


def _arg_node(node: fx.Node, j: int, name: str) -> Any:
    return node.args[j] if j < len(node.args) else node.kwargs.get(name)


def _nodes_in(v: Any) -> list[fx.Node]:
    if isinstance(v, fx.Node):
        return [v]
    if isinstance(v, (list, tuple)):
        return [n for x in v for n in _nodes_in(x)]
    return []


def _concrete(v: Any) -> bool:
    """A traced value whose shapes are plain ints (tensors, or tuples / lists of tensors and None)."""
    if isinstance(v, torch.Tensor):
        return all(isinstance(s, int) for s in v.shape)
    if isinstance(v, (tuple, list)):
        return len(v) > 0 and all(x is None or _concrete(x) for x in v)
    return isinstance(v, (int, float, bool)) and not isinstance(v, torch.SymInt)


def _to_meta(target: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def conv(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.device.type != "meta":  # real or a traced (fake) value
            return torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=_META)
        return v

    args = pytree.tree_map(conv, args)
    kwargs = pytree.tree_map(conv, kwargs)
    schema = getattr(target, "_schema", None)
    if schema is not None:  # factories and device moves run on meta too
        for j, a in enumerate(schema.arguments):
            if a.name == "device":
                if j < len(args) and args[j] is not None:
                    args = (*args[:j], _META, *args[j + 1:])
                elif kwargs.get("device") is not None:
                    kwargs = {**kwargs, "device": _META}
    return args, kwargs


# --------------------------------------------------------------------------------------------------- entry point
def _image_codes(img: torch.Tensor) -> torch.Tensor:
    """(B, [extra dims...], C, H, W) -> codes (batch, extra, y, x), broadcast over the channels."""
    b, h, w = img.shape[0], img.shape[-2], img.shape[-1]
    extra = tuple(img.shape[1:-3])
    e = math.prod(extra)
    dev = img.device
    c = torch.empty(b, e, 1, h, w, K, dtype=_DT, device=dev)
    c[..., 0] = torch.arange(b, dtype=_DT, device=dev).view(b, 1, 1, 1, 1)
    c[..., 1] = torch.arange(e, dtype=_DT, device=dev).view(1, e, 1, 1, 1)
    c[..., 2] = torch.arange(h, dtype=_DT, device=dev).view(1, 1, 1, h, 1)
    c[..., 3] = torch.arange(w, dtype=_DT, device=dev).view(1, 1, 1, 1, w)
    c = c.reshape(b, *extra, 1, h, w, K)
    return c.expand(*img.shape, K)


def _flat_inputs(program: Any, example: Any,
                 image_index: int | None) -> tuple[fx.GraphModule, list[Any], int | None]:
    """The graph module, its placeholder values in order, and which one is the image."""
    from torch.export import ExportedProgram
    from torch.export.graph_signature import InputKind

    if isinstance(program, ExportedProgram):
        gm = program.graph_module
        kwargs = example.kwargs
        in_spec = program.call_spec.in_spec
        if in_spec is not None:
            with contextlib.suppress(Exception):
                from torch.export._tree_utils import reorder_kwargs

                kwargs = reorder_kwargs(kwargs, in_spec)
        leaves, _ = pytree.tree_flatten_with_path((tuple(example.args), kwargs))
        user = iter(leaves)
        values: list[Any] = []
        img_at = None
        for spec in program.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                kp, v = next(user, (None, None))
                if kp is not None and example.image_key is not None and tuple(kp) == tuple(example.image_key):
                    img_at = len(values)
                values.append(v)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                if spec.persistent is False or spec.target not in program.state_dict:
                    values.append(program.constants[spec.target])
                else:
                    values.append(program.state_dict[spec.target])
            elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
                values.append(program.constants[spec.target])
            else:
                values.append(None)
        return gm, values, img_at if image_index is None else image_index
    if not isinstance(program, fx.GraphModule):
        raise TypeError(f"prove_grids needs an ExportedProgram or an fx.GraphModule, got "
                        f"{type(program).__name__}")
    if hasattr(example, "args") and hasattr(example, "kwargs"):
        leaves, _ = pytree.tree_flatten_with_path((tuple(example.args), example.kwargs))
        values = [v for _, v in leaves]
        if image_index is None and getattr(example, "image_key", None) is not None:
            key = tuple(example.image_key)
            image_index = next((i for i, (kp, _) in enumerate(leaves) if tuple(kp) == key), None)
    else:
        values = list(example)
    if image_index is None:
        image_index = next((i for i, v in enumerate(values) if isinstance(v, torch.Tensor)
                            and v.is_floating_point() and 4 <= v.dim() <= 6), None)
    return program, values, image_index


def prove_grids(program: Any, example: Any, nodes: dict[fx.Node, str], *,
                image_index: int | None = None) -> dict[fx.Node, GridProof]:
    """Prove, for each MLP input node, that its tokens are a raster-order 2-D grid of the input image.

    ``program`` is the ``torch.export.ExportedProgram`` of :func:`localify._trace.trace_model`, with
    ``example`` its :class:`~localify._trace.ExampleInputs`; or any ``fx.GraphModule`` (a make_fx trace),
    with ``example`` an ``ExampleInputs`` flattened as its placeholders or the list of its flat placeholder
    values (``image_index`` then says which one is the image; by default the first floating 4-D to 6-D
    tensor). The image is (B, C, H, W), a video (B, T, C, H, W) or tiles (B, I, T, C, H, W).
    ``nodes`` maps each MLP input node to its layout, ``"BNC"`` (B, N, C) or ``"BHWC"`` (B, H, W, C).

    Returns a :class:`GridProof` per node: ``ok`` with the prefix / suffix token counts, the (H, W) grid
    and its pixel stride, or the reason it is not a raster grid (with ``permutation`` when the tokens are
    a raster grid's cells in another order: ``permutation[i]`` is token i's index in raster order).

    One run of the graph proves all nodes. The model is not changed; nothing is printed.
    """
    for n, layout in nodes.items():
        if layout not in LAYOUTS:
            raise ValueError(f"layout of {n} must be one of {LAYOUTS}, got {layout!r}")
    gm, values, img_at = _flat_inputs(program, example, image_index)
    graph_nodes = set(gm.graph.nodes)
    result: dict[fx.Node, GridProof] = {}
    missing = [n for n in nodes if n not in graph_nodes]
    for n in missing:
        result[n] = GridProof(False, "the node is not part of the traced graph")
    img = values[img_at] if img_at is not None and img_at < len(values) else None
    if not isinstance(img, torch.Tensor) or not (4 <= img.dim() <= 6) or not img.is_floating_point():
        what = "no image input" if img is None else f"an image of shape {tuple(getattr(img, 'shape', ()))}"
        for n in nodes:
            result.setdefault(n, GridProof(False, f"cannot place position codes: {what}, expected "
                                                  f"(B, C, H, W), (B, T, C, H, W) or (B, I, T, C, H, W)"))
        return result
    extra_kind = "time" if img.dim() == 5 else "tile" if img.dim() == 6 else None
    protected = {v.untyped_storage().data_ptr() for v in values if isinstance(v, torch.Tensor)}
    codes: list[Any] = [None] * len(values)
    targets = {n: nodes[n] for n in nodes if n in graph_nodes}
    reason = "the MLP input was never computed when re-running the graph"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        codes[img_at] = _image_codes(img)
        for real_all in (False, True):
            runner = _Runner(int(img.shape[0]), extra_kind, protected, img.device, real_all)
            try:
                runner.run(gm, values, codes, targets)
            except _Retry:
                continue
            except _Stop as e:
                reason = str(e)
            break
    result.update(runner.proofs)
    for n in targets:
        result.setdefault(n, GridProof(False, reason))
    return result
