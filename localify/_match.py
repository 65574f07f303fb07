"""The MLP matcher: every ``Linear(C->H) -> activation or gate [-> norm/dropout] -> Linear(H->C')`` of a graph.

Matching is by dataflow only, never by module name. From each linear, the ops an MLP body may contain are
followed forward to the next linears; a candidate second linear is accepted when every path back from it ends
at one of those first linears (or at a constant) and the body holds a nonlinearity.

* A ``mul`` of two data tensors is a **gate** (GLU, SwiGLU) only when its operands come from different
  projections or different chunks of one projection. ``x * sigmoid(1.702 x)`` (QuickGELU) and
  ``x * sigmoid(x)`` (SiLU written out) multiply a tensor by a function of itself: an activation.
* Norms between the activation and the second linear (LayerNorm, BatchNorm, ConvNeXt-V2's GRN) do not hide
  an MLP.
* A first projection whose output also feeds ops outside the MLP (timm's parallel blocks pack q, k, v and
  fc1 in one Linear) is flagged ``shared``: converting it would put a depth-wise conv over q, k and v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx

from ._ops import ACTIVATIONS, LAYOUT, POINTWISE, SPLITS, GraphIndex, op_name, tensor_args, val_shape

__all__ = ["MLPMatch", "match_mlps", "strip_slices"]

MULS = ("mul", "mul_")
ADDS = ("add", "sub", "add_", "sub_")
NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "linalg_vector_norm", "norm",
         "_native_batch_norm_legit_functional", "_native_batch_norm_legit"}
GATED_NAMES = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu"}


@dataclass
class MLPMatch:
    """One transformer MLP found in the graph."""

    fc1: list[fx.Node]  # first-layer linear nodes (two for SwiGLU-style, one otherwise)
    fc2: fx.Node
    body: set[fx.Node]
    activation: str
    gated: bool
    has_dwconv: bool
    shared: bool = False  # a first projection's output also feeds ops outside this MLP

    @property
    def input(self) -> fx.Node:
        """The tensor the first projection reads: the MLP's tokens, slices included (an MLP on ``x[:, :1]``
        sees one token, not the whole sequence)."""
        return self.fc1[0].args[0]


def strip_slices(node: fx.Node) -> fx.Node:
    """The tensor a chain of token slices was taken from (a converted fc1 projects slices of its input)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) in ("slice", "narrow"):
        node = node.args[0]
    return node


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) == "linear"


def is_dwconv(node: fx.Node) -> bool:
    """A grouped convolution with one group per input channel."""
    name = op_name(node)
    if name not in ("conv2d", "convolution", "conv1d"):
        return False
    if name == "convolution":
        groups = node.args[8] if len(node.args) > 8 else 1
    else:
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    shp = val_shape(node.args[0])
    return isinstance(groups, int) and groups > 1 and shp is not None and shp[1] == groups


def _body_step(node: fx.Node) -> bool:
    """Whether ``node`` may sit between the two linears of an MLP (the backward walk checks where its
    operands come from: an add whose other operand comes from outside, such as a residual, ends the MLP)."""
    name = op_name(node)
    return (name in ACTIVATIONS or name in LAYOUT or name in SPLITS or name in POINTWISE or name in NORMS
            or name in ("getitem", "slice", "cat", "addcmul") or is_dwconv(node))


def _forward_reach(linears: list[fx.Node]) -> tuple[dict, dict]:
    """For each linear: the body ops reachable from it, and the linears those ops feed."""
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
            elif n.op == "call_function" and _body_step(n):
                stack.extend(n.users)
        reach[l1] = seen
        frontier[l1] = front
    return reach, frontier


def _body_back(idx: GraphIndex, l2: fx.Node, first: list[fx.Node], allowed: set[fx.Node]
               ) -> tuple[set[fx.Node], set[fx.Node]] | None:
    """Walk back from fc2: every path must end at a first-layer linear or a constant. (body, firsts) or None."""
    body: set[fx.Node] = set()
    found: set[fx.Node] = set()
    stack = [l2.args[0]]
    while stack:
        n = stack.pop()
        if n in first:
            found.add(n)
            continue
        if n in body or idx.is_const(n):
            continue
        if n not in allowed or n.op != "call_function":
            return None
        body.add(n)
        stack.extend(tensor_args(n))
    return (body, found) if found else None


def _roots(idx: GraphIndex, node: fx.Node, first: set[fx.Node], memo: dict) -> frozenset:
    """Which projection (and which chunk of it) a body tensor is computed from: ``{(fc1_node, chunk)}``."""
    if node in memo:
        return memo[node]
    memo[node] = frozenset()  # acyclic, but guard anyway
    if node in first:
        res = frozenset({(node, None)})
    elif idx.is_const(node) or node.op != "call_function":
        res = frozenset()
    elif op_name(node) == "getitem" and op_name(node.args[0]) in SPLITS:
        res = frozenset((r, node.args[1]) for r, _ in _roots(idx, node.args[0].args[0], first, memo))
    elif op_name(node) in ("slice", "narrow"):
        key = tuple(a for a in node.args[1:] if isinstance(a, int))
        res = frozenset((r, key) for r, _ in _roots(idx, node.args[0], first, memo))
    else:
        res = frozenset().union(*(_roots(idx, a, first, memo) for a in tensor_args(node)))
    memo[node] = res
    return res


def _is_gate(idx: GraphIndex, node: fx.Node, first: set[fx.Node], memo: dict) -> bool:
    data = [a for a in tensor_args(node) if not idx.is_const(a)]
    if op_name(node) not in MULS or len(data) != 2:
        return False
    return _roots(idx, data[0], first, memo) != _roots(idx, data[1], first, memo)


def _shared(fc1: list[fx.Node], body: set[fx.Node], l2: fx.Node) -> bool:
    """Whether a first projection's output, or a body op computed from it (a split of a packed projection),
    also feeds a consumer outside the MLP."""
    stack = [u for n in fc1 for u in n.users]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen or n is l2:
            continue
        seen.add(n)
        if n in body:
            stack.extend(n.users)
        elif hasattr(n.meta.get("val"), "shape") or isinstance(n.meta.get("val"), (list, tuple)):
            return True  # (sym_size and the like read shapes, not values)
    return False


def match_mlps(idx: GraphIndex) -> list[MLPMatch]:
    """Every ``Linear -> act/gate -> Linear`` in the graph, in execution order of the first linear."""
    linears = [n for n in idx.graph.nodes if _is_linear(n)]
    reach, frontier = _forward_reach(linears)
    matches: list[MLPMatch] = []
    for l2 in linears:
        first = [l1 for l1 in linears if l2 in frontier[l1] and l1 is not l2]
        if not first:
            continue
        back = _body_back(idx, l2, first, set().union(*(reach[l1] for l1 in first)))
        if back is None:
            continue
        body, found = back
        by_weight: dict[Any, fx.Node] = {}
        for n in sorted(found, key=idx.order.__getitem__):
            by_weight.setdefault(n.args[1], n)  # one node per projection (a converted fc1 runs it twice)
        first = list(by_weight.values())
        if len({strip_slices(n.args[0]) for n in first}) != 1:
            continue
        ordered = sorted(body, key=idx.order.__getitem__)
        acts = [op_name(n) for n in ordered if op_name(n) in ACTIVATIONS]
        memo: dict = {}
        firsts = set(found)
        gated = any(_is_gate(idx, n, firsts, memo) for n in ordered)
        if not acts and not gated:
            continue  # two stacked linears without a nonlinearity are not an MLP
        matches.append(MLPMatch(first, l2, body, _act_name(ordered, acts, gated), gated,
                                any(is_dwconv(n) for n in body), _shared(list(found), body, l2)))
    matches.sort(key=lambda m: idx.order[m.fc1[0]])
    return matches


def _act_name(body: list[fx.Node], acts: list[str], gated: bool) -> str:
    if not acts:
        return "glu(linear)"
    first = acts[0]
    name = ACTIVATIONS[first]
    if first.startswith("gelu"):
        for n in body:
            approx = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
            if op_name(n).startswith("gelu") and approx == "tanh":
                name = "gelu_tanh"
    if first == "sigmoid" and any(op_name(n) in MULS for n in body):
        # x * sigmoid(a * x): QuickGELU when the sigmoid's input is scaled, SiLU otherwise
        sig = next(n for n in body if op_name(n) == "sigmoid")
        scaled = isinstance(sig.args[0], fx.Node) and op_name(sig.args[0]) in MULS
        name = "quick_gelu" if scaled else "silu"
    if gated:
        return GATED_NAMES.get(name, f"glu({name})")
    return name
