"""The token walk: how the tokens entering an MLP were made, followed back through the graph along the token axis.

From an MLP's input the walk follows the token axis backwards (reshapes, permutes, concatenations, slices,
elementwise ops) until the tokens are created by flattening a spatial feature map or by an unfold, counting the
tokens concatenated before and after the grid on the way (class, distillation, register, detection tokens).
Each op kind has one handler in :data:`HANDLERS`; results are memoised per ``(node, axis)`` so that walking
every MLP of a graph, in order, is linear in its size, and the depth of one walk is bounded (no recursion
limit is changed).

The walk is structural: it says where a grid *would* be. :mod:`localify._proof` proves it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum

from torch import fx

from ._grid import unfold_grid
from ._ops import REORDER, SPLITS, GraphIndex, op_name, owner, reshape_groups, tensor_args, val_shape

__all__ = ["Origin", "TokenGrid", "NoGrid", "TokenWalker", "token_layout"]

MAX_DEPTH = 120  # ops followed back from one MLP input before giving up (memoised walks are short; each op
#                 is ~3 Python frames, well inside the default recursion limit)


class _TooDeep(Exception):
    pass


class Origin(str, Enum):
    """How the grid tokens were made from a spatial map."""

    FLATTEN = "flatten"  # a (B, C, H, W) / (B, H, W, C) feature map flattened to tokens
    UNFOLD = "unfold"  # an im2col (nn.Unfold) of a feature map: one token per patch position
    BHWC = "bhwc"  # the MLP runs on the (B, H, W, C) map itself


@dataclass(frozen=True)
class TokenGrid:
    """Tokens at this point are ``prefix`` extra tokens, a row-major ``grid``, then ``suffix`` tokens."""

    prefix: int
    suffix: int
    grid: tuple[int, int]
    origin: fx.Node
    kind: Origin
    spatial: tuple[int, int]  # the spatial size a run-time source must report (== grid for FLATTEN)
    unfold: tuple | None = None  # (kernel, dilation, padding, stride) for UNFOLD

    def shifted(self, before: int, after: int) -> TokenGrid:
        """The same grid with ``before`` more prefix and ``after`` more suffix tokens (negative: fewer)."""
        return replace(self, prefix=self.prefix + before, suffix=self.suffix + after)


@dataclass(frozen=True)
class NoGrid:
    reason: str
    folded: bool = False


CONST = "const"
_Result = TokenGrid | NoGrid | str | None  # None: unknown (e.g. an op the walk does not follow)


class TokenWalker:
    """Walk back from a tensor along its token axis (memoised over ``(node, dim, fold)``)."""

    def __init__(self, idx: GraphIndex) -> None:
        self.idx = idx
        self.memo: dict[tuple, _Result] = {}
        self.depth = 0

    def walk(self, node: fx.Node, dim: int, fold: tuple[int, int] | None = None) -> _Result:
        key = (node, dim, fold)
        if key in self.memo:
            return self.memo[key]
        if self.depth >= MAX_DEPTH:
            raise _TooDeep
        self.memo[key] = None  # cycle guard (graphs are acyclic, but be safe)
        self.depth += 1
        try:
            res = self._walk(node, dim, fold)
        except _TooDeep:
            del self.memo[key]
            raise
        finally:
            self.depth -= 1
        self.memo[key] = res
        return res

    # -- helpers
    def _where(self, node: fx.Node) -> str:
        o = owner(node)
        return f"{op_name(node)} in {o or 'the top-level module'}"

    def _combine(self, results: Iterable[_Result]) -> _Result:
        results = list(results)
        found = [r for r in results if isinstance(r, TokenGrid)]
        if found:
            first = found[0]
            if all((f.prefix, f.suffix, f.grid) == (first.prefix, first.suffix, first.grid) for f in found):
                return first
            return NoGrid("token layouts reaching this point disagree: " + ", ".join(
                f"{f.prefix}+{f.grid[0]}x{f.grid[1]}+{f.suffix}" for f in found))
        for r in results:
            if isinstance(r, NoGrid):
                return r
        if results and all(r == CONST for r in results):
            return CONST
        return None

    def _walk(self, node: fx.Node, dim: int, fold: tuple[int, int] | None) -> _Result:
        if self.idx.is_const(node):
            return CONST
        if node.op == "placeholder":
            return NoGrid("the tokens are a model input, not built from a patch grid inside the model")
        if node.op != "call_function":
            return None
        name = op_name(node)
        if name == "getitem":
            return self._getitem(node, dim, fold)
        shape = val_shape(node)
        if shape is None or not 0 <= dim < len(shape):
            return None
        handler = HANDLERS.get(name)
        if handler is None and name in REORDER:
            handler = TokenWalker._reorder
        return (handler or TokenWalker._generic)(self, node, dim, fold, shape)

    def _reorder(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        name = op_name(node)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is not None and val_shape(src) is not None and name in ("roll", "flip"):
            dims = node.args[2] if len(node.args) > 2 else node.args[1] if name == "flip" else None
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if dims and all((d % len(shape)) != dim for d in dims):
                return self.walk(src, dim, fold)
        return NoGrid(f"tokens are reordered or selected by {self._where(node)} (no fixed grid order)")

    def _expand(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        src = node.args[0]
        sshape = val_shape(src)
        if sshape is None:
            return None
        off = len(shape) - len(sshape)
        if dim - off >= 0 and sshape[dim - off] == shape[dim]:
            return self.walk(src, dim - off, fold)
        return CONST if self.idx.is_const(src) else NoGrid(f"tokens are broadcast copies ({self._where(node)})")

    def _narrow(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        src, ndim, start, length = node.args[:4]
        if ndim % len(shape) != dim:
            return self.walk(src, dim, fold)
        if fold is not None:
            return None
        return self._slice_result(self.walk(src, dim), start, start + length, node)

    def _select(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        src, sdim = node.args[0], node.args[1] % (len(shape) + 1)
        return self.walk(src, dim + (1 if dim >= sdim else 0), fold)

    def _generic(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        n = shape[dim]
        results = []
        for a in tensor_args(node):
            ashape = val_shape(a)
            if ashape is None:
                if a.op == "call_function" and op_name(a) == "getitem":
                    results.append(self.walk(a, dim, fold))
                continue
            adim = dim - (len(shape) - len(ashape))
            if adim >= 0 and ashape[adim] == n and n > 1:
                results.append(self.walk(a, adim, fold))
        return self._combine(results)

    def _getitem(self, node: fx.Node, dim: int, fold) -> _Result:
        src, i = node.args
        if not isinstance(src, fx.Node) or src.op != "call_function":
            return None
        sname = op_name(src)
        base = src.args[0] if src.args else None
        if not isinstance(base, fx.Node):
            return None
        bshape = val_shape(base)
        if bshape is None:
            return None
        if sname in ("native_layer_norm", "var_mean", "native_dropout", "_native_batch_norm_legit_no_training",
                     "max", "min", "sort", "topk", "native_batch_norm"):
            return self.walk(base, dim, fold) if i == 0 else CONST
        if sname == "unbind":
            udim = (src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)) % len(bshape)
            return self.walk(base, dim + (1 if dim >= udim else 0), fold)
        if sname in SPLITS:
            sdim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
            sdim %= len(bshape)
            if sdim != dim:
                return self.walk(base, dim, fold)
            sizes = [val_shape(u)[sdim] for u in sorted(src.users, key=lambda u: u.args[1])
                     if val_shape(u) is not None]
            start = sum(sizes[:i])
            out_n = sizes[i] if i < len(sizes) else 0
            return self._slice_result(self.walk(base, dim, fold), start, start + out_n, node)
        return None

    def _permute(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        src = node.args[0]
        rank = len(shape)
        name = op_name(node)
        if name == "permute":
            perm = [p % rank for p in node.args[1]]
            return self.walk(src, perm[dim], fold)
        if name == "t":
            return self.walk(src, {0: 1, 1: 0}.get(dim, dim), fold)
        if name == "transpose":
            a, b = node.args[1] % rank, node.args[2] % rank
            return self.walk(src, b if dim == a else a if dim == b else dim, fold)
        src_dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dst_dims = node.args[2] if isinstance(node.args[2], (list, tuple)) else [node.args[2]]
        perm = list(range(rank))
        for s in src_dims:
            perm.remove(s % rank)
        order = [None] * rank
        for s, d in zip(src_dims, dst_dims):
            order[d % rank] = s % rank
        it = iter(perm)
        order = [o if o is not None else next(it) for o in order]
        return self.walk(src, order[dim], fold)

    def _reshape(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        src = node.args[0]
        ishape = val_shape(src)
        if ishape is None:
            return None
        groups = reshape_groups(ishape, shape)
        if groups is None:
            return None
        gi, go = next((g for g in groups if dim in g[1]), (None, None))
        if gi is None:
            return None
        ni = [j for j in gi if ishape[j] != 1]
        no = [j for j in go if shape[j] != 1]
        n = shape[dim]
        if fold is None:
            if no == [dim] and len(ni) == 1:
                return self.walk(src, ni[0])
            if no == [dim] and len(ni) == 2:
                a, b = ishape[ni[0]], ishape[ni[1]]
                if ni[1] != ni[0] + 1:
                    return None
                return self._origin(src, ni, (a, b))
            if no == [dim] and len(ni) > 2:
                return NoGrid(f"the token axis merges {len(ni)} dims {tuple(ishape[j] for j in ni)} "
                              f"({self._where(node)}); not a 2-D grid")
            if len(ni) == 1 and len(no) == 2 and no[1] == dim:
                outer = shape[no[0]]
                return self.walk(src, ni[0], (outer, n))
            return None
        outer, inner = fold
        if no == [dim] and len(ni) == 1:
            return self.walk(src, ni[0], fold)
        if no == [dim] and len(ni) == 2 and (ishape[ni[0]], ishape[ni[1]]) == (outer, inner):
            if outer != self.idx.batch:
                return None
            return self.walk(src, ni[1])
        return None

    def _origin(self, src: fx.Node, dims: list[int], grid: tuple[int, int]) -> _Result:
        ishape = val_shape(src)
        if dims[0] == 0:
            return None
        if ishape[0] != self.idx.batch:
            return NoGrid(
                f"tokens of a {grid[0]}x{grid[1]} grid whose batch dimension holds {ishape[0]} items, not the "
                f"model's batch of {self.idx.batch}: patches or windows are folded into the batch",
                folded=True,
            )
        return TokenGrid(0, 0, grid, src, Origin.FLATTEN, grid)

    def _cat(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        tensors = node.args[0]
        cdim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        cdim %= len(shape)
        if cdim != dim:
            return self._combine(
                self.walk(t, dim, fold) for t in tensors if val_shape(t) is not None and val_shape(t)[dim] == shape[dim]
            )
        if fold is not None:
            return None
        sizes = [val_shape(t)[dim] if val_shape(t) is not None else 0 for t in tensors]
        results = [self.walk(t, dim) for t in tensors]
        found = [i for i, r in enumerate(results) if isinstance(r, TokenGrid)]
        if len(found) == 1:
            k = found[0]
            f = results[k]
            return f.shifted(sum(sizes[:k]), sum(sizes[k + 1:]))
        if len(found) > 1:
            return NoGrid(f"tokens of {len(found)} grids are concatenated ({self._where(node)})")
        return self._combine(results)

    def _slice(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        src = node.args[0]
        sdim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
        if sdim != dim:
            return self.walk(src, dim, fold)
        if fold is not None:
            return None
        n_in = val_shape(src)[dim]
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else n_in
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1:
            return NoGrid(f"tokens are strided ({self._where(node)})")
        start = max(0, start + n_in if start < 0 else start)
        end = min(n_in, end + n_in if end < 0 else end)
        return self._slice_result(self.walk(src, dim), start, end, node)

    def _slice_result(self, res: _Result, start: int, end: int, node: fx.Node) -> _Result:
        if not isinstance(res, TokenGrid):
            return res
        g = res.grid[0] * res.grid[1]
        lo, hi = res.prefix, res.prefix + g
        n_total = hi + res.suffix
        if start <= lo and end >= hi:
            return res.shifted(-start, end - n_total)
        if end <= lo or start >= hi:
            return NoGrid(f"only the {end - start} extra token(s) outside the patch grid reach this point "
                          f"({self._where(node)})")
        return NoGrid(f"a slice cuts through the patch grid ({self._where(node)})")

    def _im2col(self, node: fx.Node, dim: int, fold, shape) -> _Result:
        if dim != 2 or fold is not None:
            return None
        src = node.args[0]
        ishape = val_shape(src)
        kernel, dilation, padding, stride = (tuple(a) for a in node.args[1:5])
        if ishape is None or len(ishape) != 4:
            return None
        if ishape[0] != self.idx.batch:
            return NoGrid("an unfold runs on patches folded into the batch dimension", folded=True)
        spatial = (ishape[2], ishape[3])
        geometry = (kernel, dilation, padding, stride)
        return TokenGrid(0, 0, unfold_grid(spatial, geometry), src, Origin.UNFOLD, spatial, geometry)


def token_layout(idx: GraphIndex, x: fx.Node, walker: TokenWalker | None = None) -> TokenGrid | NoGrid:
    """Layout of the tokens entering an MLP whose input is ``x`` (B, N, C).

    Pass one ``walker`` for all the MLPs of a graph: its memo makes the walks linear in the graph size."""
    walker = walker or TokenWalker(idx)
    shape = val_shape(x)
    if shape is None or len(shape) < 3:
        return NoGrid(f"the MLP input has shape {shape}: no token axis")
    if len(shape) == 3 and shape[1] == 1:
        return NoGrid("the MLP runs on a single token (such as a class token alone): no patch grid")
    if len(shape) == 4:  # (B, H, W, C): the grid is the input's own spatial dims
        if shape[0] != idx.batch:
            return NoGrid(f"the MLP sees {shape[0]} feature maps of {shape[1]}x{shape[2]}, not the model's batch "
                          f"of {idx.batch}: windows or patches are folded into the batch", folded=True)
        if shape[1] == 1 or shape[2] == 1:
            return NoGrid(f"the MLP input has shape {shape}: one row of tokens, not a 2-D (B, H, W, C) map")
        return TokenGrid(0, 0, (shape[1], shape[2]), x, Origin.BHWC, (shape[1], shape[2]))
    if len(shape) > 4:
        return NoGrid(f"the MLP input has shape {shape}: not (B, N, C) or (B, H, W, C)")
    if shape[0] != idx.batch:
        res = _walk_from(walker, x)
        if isinstance(res, NoGrid):
            return res
        return NoGrid(
            f"the MLP sees {shape[0]} sequences of {shape[1]} tokens, not the model's batch of {idx.batch}: "
            "patches or windows are folded into the batch", folded=True)
    res = _walk_from(walker, x)
    if isinstance(res, (TokenGrid, NoGrid)):
        if isinstance(res, TokenGrid) and res.prefix + res.suffix + math.prod(res.grid) != shape[1]:
            return NoGrid(f"inconsistent token count: {res.prefix} + {res.grid} + {res.suffix} != {shape[1]}")
        return res
    if res == CONST:
        return NoGrid("the MLP's tokens do not depend on the image (learned tokens only)")
    return NoGrid(f"the {shape[1]} tokens entering the MLP could not be traced back to a patch grid")


def _walk_from(walker: TokenWalker, x: fx.Node) -> _Result:
    try:
        return walker.walk(x, 1)
    except (_TooDeep, RecursionError):  # RecursionError: a caller already deep in the stack
        return NoGrid(f"the tokens entering the MLP could not be followed back to a patch grid within "
                      f"{MAX_DEPTH} ops")


RESHAPES = ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as")
HANDLERS = {
    **dict.fromkeys(RESHAPES, TokenWalker._reshape),
    **dict.fromkeys(("permute", "transpose", "t", "movedim"), TokenWalker._permute),
    **dict.fromkeys(("expand", "expand_as"), TokenWalker._expand),
    "cat": TokenWalker._cat,
    "slice": TokenWalker._slice,
    "narrow": TokenWalker._narrow,
    "select": TokenWalker._select,
    "im2col": TokenWalker._im2col,
}
