"""Facts about an exported aten graph that every analysis pass shares: op tables, node helpers, the graph index.

Both passes (:mod:`localify._match` and :mod:`localify._tokens`) read the graph only through these helpers,
so that an op spelled differently by another tracer or torch version is taught here, once.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

__all__ = ["ACTIVATIONS", "POINTWISE", "LAYOUT", "SPLITS", "REORDER", "GraphIndex", "op_name", "val_shape", "tensor_args",
           "module_stack", "owner", "reshape_groups"]

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
LAYOUT = {  # ops that only re-view or re-shape a tensor
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


def reshape_groups(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
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
