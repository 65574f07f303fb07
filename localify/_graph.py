"""Graph analysis on an exported fx graph: op tables, MLP matching and the token-axis walk.

Two passes, both by dataflow, never by module name:

* :func:`match_mlps` finds every ``Linear(C->H) -> activation or gate [-> dropout/norm] -> Linear(H->C')``.
* :func:`token_layout` walks back from an MLP's input along its token axis until the tokens are created
  by flattening a spatial feature map (or by an unfold), counting the tokens concatenated before and after
  the grid on the way (class, distillation, register, detection tokens).
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["GraphIndex", "MLPMatch", "Found", "NoGrid", "match_mlps", "token_layout", "op_name"]

# --------------------------------------------------------------------------------------------------- op tables
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_": "gelu",
    "silu": "silu",
    "silu_": "silu",
    "relu": "relu",
    "relu_": "relu",
    "relu6": "relu6",
    "hardtanh": "relu6",
    "hardtanh_": "relu6",
    "hardswish": "hardswish",
    "hardswish_": "hardswish",
    "hardsigmoid": "hardsigmoid",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "elu": "elu",
    "leaky_relu": "leaky_relu",
    "mish": "mish",
    "softplus": "softplus",
    "erf": "gelu(erf)",
    "celu": "celu",
    "selu": "selu",
    "prelu": "prelu",
}
# ops that act on each token on its own (elementwise, norms over channels, casts, dropout)
POINTWISE = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "pow", "sqrt", "rsqrt", "exp",
    "clone", "contiguous", "alias", "detach", "dropout", "dropout_", "native_dropout", "feature_dropout",
    "alpha_dropout", "_to_copy", "to", "type_as", "layer_norm", "native_layer_norm", "rms_norm",
    "group_norm", "clamp", "clamp_", "clamp_min", "clamp_max", "abs", "square", "where", "mean", "sum",
    "var", "var_mean", "rsub", "reciprocal", "lerp", "addcmul", "masked_fill", "nan_to_num",
}
LAYOUT = {
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "movedim", "view_as", "reshape_as", "expand", "expand_as", "narrow",
}
SPLITS = {"split", "split_with_sizes", "chunk", "unbind", "tensor_split"}
REORDER = {
    "gather", "index", "index_select", "take", "take_along_dim", "scatter", "scatter_add", "index_put",
    "index_put_", "masked_select", "nonzero", "sort", "argsort", "flip", "roll", "masked_scatter",
}


def op_name(node: fx.Node) -> str:
    """Short op name of a call_function node: ``aten.gelu.default`` -> ``gelu``."""
    if node.op != "call_function":
        return node.op
    t = node.target
    if t is operator.getitem:
        return "getitem"
    name = getattr(t, "_opname", None) or getattr(t, "__name__", None) or str(t)
    return str(name).split(".")[-1]


def val_shape(node: Any) -> tuple[int, ...] | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(v, torch.Tensor):
        try:
            return tuple(int(s) for s in v.shape)
        except Exception:
            return None
    return None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)

    for a in node.args:
        visit(a)
    for a in node.kwargs.values():
        visit(a)
    return out


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(path, class_name), ...]`` from the outermost to the innermost module owning ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((_clean_path(path), cls_name.split(".")[-1]))
    return out


def _clean_path(path: str) -> str:
    # strict-mode export spells paths as L['self'].blocks[0].mlp; non-strict as blocks.0.mlp
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
        path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path


def owner(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


# --------------------------------------------------------------------------------------------------- index
@dataclass
class GraphIndex:
    """Precomputed facts about the graph shared by the passes."""

    graph: fx.Graph
    param_names: dict[str, str]
    user_inputs: set[str]
    batch: int
    order: dict[fx.Node, int] = field(default_factory=dict)
    _const: dict[fx.Node, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}

    def is_const(self, node: fx.Node) -> bool:
        """True if ``node`` depends on parameters, buffers and constants only (no model input)."""
        hit = self._const.get(node)
        if hit is not None:
            return hit
        if node.op == "placeholder":
            res = node.name not in self.user_inputs
        elif node.op == "get_attr":
            res = True
        else:
            args = tensor_args(node)
            res = all(self.is_const(a) for a in args)
        self._const[node] = res
        return res

    def param_of(self, node: fx.Node) -> str | None:
        if node.op == "placeholder":
            return self.param_names.get(node.name)
        if node.op == "get_attr":
            return str(node.target)
        return None


# --------------------------------------------------------------------------------------------------- MLP match
@dataclass
class MLPMatch:
    """One transformer MLP found in the graph."""

    fc1: list[fx.Node]  # first-layer linear nodes (two for SwiGLU-style, one otherwise)
    fc2: fx.Node
    body: set[fx.Node]
    activation: str
    gated: bool
    has_dwconv: bool

    @property
    def input(self) -> fx.Node:
        return _strip_slices(self.fc1[0].args[0])


def _strip_slices(node: fx.Node) -> fx.Node:
    """The tensor a chain of token slices was taken from (a converted fc1 projects slices of its input)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) in ("slice", "narrow"):
        node = node.args[0]
    return node


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) == "linear"


def _is_dwconv(node: fx.Node) -> bool:
    if op_name(node) not in ("conv2d", "convolution", "conv1d"):
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if op_name(node) == "convolution":
        groups = node.args[8] if len(node.args) > 8 else 1
    shp = val_shape(node.args[0])
    return isinstance(groups, int) and groups > 1 and shp is not None and shp[1] == groups


def _body_step(idx: GraphIndex, node: fx.Node) -> bool:
    """Whether ``node`` may sit between the two linears of an MLP."""
    name = op_name(node)
    if name in ACTIVATIONS or name in LAYOUT or name in SPLITS or name == "getitem":
        return True
    if _is_dwconv(node):
        return True
    if name in ("add", "sub", "add_", "sub_"):
        # a residual add of two data tensors ends an MLP; adding a constant does not
        return sum(1 for a in tensor_args(node) if not idx.is_const(a)) <= 1
    if name in ("slice", "cat", "batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"):
        return True
    return name in POINTWISE


def match_mlps(idx: GraphIndex) -> list[MLPMatch]:
    """Every ``Linear -> act/gate -> Linear`` in the graph, in execution order of the second linear."""
    linears = [n for n in idx.graph.nodes if _is_linear(n)]
    reach: dict[fx.Node, set[fx.Node]] = {}
    frontier: dict[fx.Node, set[fx.Node]] = {}
    for l1 in linears:
        seen: set[fx.Node] = set()
        front: set[fx.Node] = set()
        stack = list(l1.users)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if _is_linear(n):
                front.add(n)
                continue
            if n.op != "call_function" or not _body_step(idx, n):
                continue
            stack.extend(n.users)
        reach[l1] = seen
        frontier[l1] = front

    matches: list[MLPMatch] = []
    for l2 in linears:
        first = [l1 for l1 in linears if l2 in frontier[l1] and l1 is not l2]
        if not first:
            continue
        allowed = set().union(*(reach[l1] for l1 in first))
        # walk back from fc2: every path must end at one of the first-layer linears or a constant
        body: set[fx.Node] = set()
        ok = True
        stack = [l2.args[0]]
        found_first: set[fx.Node] = set()
        while stack and ok:
            n = stack.pop()
            if n in first:
                found_first.add(n)
                continue
            if n in body or idx.is_const(n):
                continue
            if n not in allowed or n.op != "call_function":
                ok = False
                break
            body.add(n)
            stack.extend(tensor_args(n))
        if not ok or not found_first:
            continue
        first = [n for n in first if n in found_first]
        by_weight: dict[Any, fx.Node] = {}
        for n in sorted(first, key=idx.order.__getitem__):
            by_weight.setdefault(n.args[1], n)  # one node per projection (a converted fc1 runs it twice)
        first = list(by_weight.values())
        inputs = {_strip_slices(n.args[0]) for n in first}
        if len(inputs) != 1:
            continue
        acts = [op_name(n) for n in sorted(body, key=idx.order.__getitem__) if op_name(n) in ACTIVATIONS]
        gated = any(
            op_name(n) in ("mul", "mul_") and sum(1 for a in tensor_args(n) if not idx.is_const(a)) == 2
            for n in body
        )
        if not acts and not gated:
            continue  # two stacked linears without a nonlinearity are not an MLP
        act = _act_name(body, acts, gated)
        has_dw = any(_is_dwconv(n) for n in body)
        matches.append(MLPMatch(sorted(first, key=idx.order.__getitem__), l2, body, act, gated, has_dw))
    matches.sort(key=lambda m: idx.order[m.fc1[0]])
    return matches


def _act_name(body: set[fx.Node], acts: list[str], gated: bool) -> str:
    if not acts:
        return "glu(linear)"
    first = acts[0]
    name = ACTIVATIONS[first]
    if first.startswith("gelu"):
        for n in body:
            if op_name(n).startswith("gelu") and n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none") == "tanh":
                name = "gelu_tanh"
    if first == "sigmoid":
        name = "quick_gelu" if any(op_name(n) in ("mul", "mul_") for n in body) else "sigmoid"
    if gated:
        return {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu"}.get(name, f"glu({name})")
    return name


# --------------------------------------------------------------------------------------------------- token walk
@dataclass(frozen=True)
class Found:
    """Tokens at this point are ``prefix`` extra tokens, a row-major ``grid``, then ``suffix`` tokens."""

    prefix: int
    suffix: int
    grid: tuple[int, int]
    origin: fx.Node
    kind: str  # "flatten" (a feature map flattened to tokens) or "unfold" (im2col)
    spatial: tuple[int, int]  # the spatial size a run-time source must report (== grid for "flatten")
    unfold: tuple | None = None  # (kernel, dilation, padding, stride) for "unfold"


@dataclass(frozen=True)
class NoGrid:
    reason: str
    folded: bool = False


CONST = "const"
_Result = Found | NoGrid | str | None  # None: unknown (e.g. an op the walk does not follow)


def _reshape_groups(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up input and output dims of a reshape into groups with equal products."""
    groups = []
    i = o = 0
    while i < len(ins) or o < len(outs):
        gi, go = [], []
        pi = po = 1
        # consume at least one dim from each side (size-1 dims attach to the current group)
        if i < len(ins):
            gi.append(i)
            pi *= ins[i]
            i += 1
        if o < len(outs):
            go.append(o)
            po *= outs[o]
            o += 1
        while pi != po:
            if pi < po and i < len(ins):
                gi.append(i)
                pi *= ins[i]
                i += 1
            elif po < pi and o < len(outs):
                go.append(o)
                po *= outs[o]
                o += 1
            else:
                return None
        # absorb trailing size-1 dims into this group
        while i < len(ins) and ins[i] == 1 and (o >= len(outs) or outs[o] != 1):
            gi.append(i)
            i += 1
        while o < len(outs) and outs[o] == 1 and (i >= len(ins) or ins[i] != 1):
            go.append(o)
            o += 1
        groups.append((gi, go))
    return groups


class TokenWalker:
    """Walk back from a tensor along its token axis (memoised over ``(node, dim, fold)``)."""

    def __init__(self, idx: GraphIndex) -> None:
        self.idx = idx
        self.memo: dict[tuple, _Result] = {}

    def walk(self, node: fx.Node, dim: int, fold: tuple[int, int] | None = None) -> _Result:
        key = (node, dim, fold)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = None  # cycle guard (graphs are acyclic, but be safe)
        res = self._walk(node, dim, fold)
        self.memo[key] = res
        return res

    # -- helpers
    def _where(self, node: fx.Node) -> str:
        o = owner(node)
        return f"{op_name(node)} in {o or 'the top-level module'}"

    def _combine(self, results: Iterable[_Result]) -> _Result:
        results = list(results)
        found = [r for r in results if isinstance(r, Found)]
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
        idx = self.idx
        if idx.is_const(node):
            return CONST
        if node.op == "placeholder":
            return NoGrid("the tokens are a model input, not built from a patch grid inside the model")
        if node.op != "call_function":
            return None
        name = op_name(node)
        shape = val_shape(node)
        if name == "getitem":
            return self._getitem(node, dim, fold)
        if shape is None:
            return None
        if dim < 0 or dim >= len(shape):
            return None
        if name in REORDER:
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if src is not None and val_shape(src) is not None and name in ("roll", "flip"):
                dims = node.args[2] if len(node.args) > 2 else node.args[1] if name == "flip" else None
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if dims and all((d % len(shape)) != dim for d in dims):
                    return self.walk(src, dim, fold)
            return NoGrid(f"tokens are reordered or selected by {self._where(node)} (no fixed grid order)")
        if name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
                    "view_as", "reshape_as"):
            return self._reshape(node, dim, fold, shape)
        if name in ("permute", "transpose", "t", "movedim"):
            return self._permute(node, dim, fold, shape)
        if name == "expand" or name == "expand_as":
            src = node.args[0]
            sshape = val_shape(src)
            if sshape is None:
                return None
            off = len(shape) - len(sshape)
            if dim - off >= 0 and sshape[dim - off] == shape[dim]:
                return self.walk(src, dim - off, fold)
            return CONST if idx.is_const(src) else NoGrid(f"tokens are broadcast copies ({self._where(node)})")
        if name == "cat":
            return self._cat(node, dim, fold, shape)
        if name == "slice":
            return self._slice(node, dim, fold, shape)
        if name == "narrow":
            src, ndim, start, length = node.args[:4]
            if ndim % len(shape) != dim:
                return self.walk(src, dim, fold)
            if fold is not None:
                return None
            return self._slice_result(self.walk(src, dim), start, start + length, node)
        if name == "select":
            src, sdim = node.args[0], node.args[1] % (len(shape) + 1)
            return self.walk(src, dim + (1 if dim >= sdim else 0), fold)
        if name == "im2col":
            return self._im2col(node, dim, fold)
        return self._generic(node, dim, fold, shape)

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
        groups = _reshape_groups(ishape, shape)
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
        return Found(0, 0, grid, src, "flatten", grid)

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
        found = [i for i, r in enumerate(results) if isinstance(r, Found)]
        if len(found) == 1:
            k = found[0]
            f = results[k]
            return Found(f.prefix + sum(sizes[:k]), f.suffix + sum(sizes[k + 1:]), f.grid, f.origin, f.kind,
                         f.spatial, f.unfold)
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
        if not isinstance(res, Found):
            return res
        g = res.grid[0] * res.grid[1]
        lo, hi = res.prefix, res.prefix + g
        if start <= lo and end >= hi:
            return Found(lo - start, end - hi, res.grid, res.origin, res.kind, res.spatial, res.unfold)
        if end <= lo or start >= hi:
            return NoGrid(f"only the {end - start} extra token(s) outside the patch grid reach this point "
                          f"({self._where(node)})")
        return NoGrid(f"a slice cuts through the patch grid ({self._where(node)})")

    def _im2col(self, node: fx.Node, dim: int, fold) -> _Result:
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
        grid = tuple(
            (spatial[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2)
        )
        return Found(0, 0, grid, src, "unfold", spatial, (kernel, dilation, padding, stride))


def token_layout(idx: GraphIndex, x: fx.Node, walker: TokenWalker | None = None) -> Found | NoGrid:
    """Layout of the tokens entering an MLP whose input is ``x`` (B, N, C).

    Pass one ``walker`` for all the MLPs of a graph: its memo makes the walks linear in the graph size."""
    walker = walker or TokenWalker(idx)
    shape = val_shape(x)
    if shape is None or len(shape) < 3:
        return NoGrid(f"the MLP input has shape {shape}: no token axis")
    if shape[1] == 1:
        return NoGrid("the MLP runs on a single token (such as a class token alone): no patch grid")
    if len(shape) == 4:  # (B, H, W, C): the grid is the input's own spatial dims
        if shape[0] != idx.batch:
            return NoGrid(f"the MLP sees {shape[0]} feature maps of {shape[1]}x{shape[2]}, not the model's batch "
                          f"of {idx.batch}: windows or patches are folded into the batch", folded=True)
        if shape[2] == 1:
            return NoGrid(f"the MLP input has shape {shape}: no 2-D grid")
        return Found(0, 0, (shape[1], shape[2]), x, "bhwc", (shape[1], shape[2]))
    if len(shape) > 4:
        return NoGrid(f"the MLP input has shape {shape}: not (B, N, C) or (B, H, W, C)")
    if shape[0] != idx.batch:
        res = walker.walk(x, 1)
        if isinstance(res, NoGrid):
            return res
        return NoGrid(
            f"the MLP sees {shape[0]} sequences of {shape[1]} tokens, not the model's batch of {idx.batch}: "
            "patches or windows are folded into the batch", folded=True)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * len(idx.order) + 1000))
    try:
        res = walker.walk(x, 1)
    finally:
        sys.setrecursionlimit(limit)
    if isinstance(res, (Found, NoGrid)):
        if isinstance(res, Found) and res.prefix + res.suffix + math.prod(res.grid) != shape[1]:
            return NoGrid(f"inconsistent token count: {res.prefix} + {res.grid} + {res.suffix} != {shape[1]}")
        return res
    if res == CONST:
        return NoGrid("the MLP's tokens do not depend on the image (learned tokens only)")
    return NoGrid(f"the {shape[1]} tokens entering the MLP could not be traced back to a patch grid")
