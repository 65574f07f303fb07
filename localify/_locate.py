"""``find_mlps``: trace a model and report every transformer MLP, its tokens, and whether it can be converted."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ._graph import (
    Found,
    GraphIndex,
    MLPMatch,
    NoGrid,
    TokenWalker,
    match_mlps,
    module_stack,
    op_name,
    owner,
    token_layout,
)
from ._grid import GridSpec, key_to_json
from ._select import parse_layers
from ._trace import (
    CallRecord,
    Trace,
    accepts_kwarg,
    eval_mode,
    make_example_inputs,
    record_calls,
    trace_model,
)
from .errors import NoMLPFoundError

__all__ = ["TokenLayout", "MLPSite", "Plan", "find_mlps", "analyze"]

# site status values
CONVERTIBLE = "convertible"
NO_GRID = "no_grid"
FOLDED = "folded"
ALREADY_LOCAL = "already_local"
LOCALIFIED = "localified"
UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens entering an MLP are laid out."""

    layout: str  # "BNC": (B, N, C) tokens; "BHWC": (B, H, W, C) feature map
    prefix: int  # tokens before the grid (class, distillation, registers)
    suffix: int  # tokens after the grid (detection tokens)
    grid: tuple[int, int]  # (rows, cols) at the traced input size
    source: GridSpec | None = None  # where the grid is read at run time

    def describe(self) -> str:
        s = f"{self.grid[0]}x{self.grid[1]}"
        if self.prefix:
            s = f"{self.prefix}+{s}"
        if self.suffix:
            s = f"{s}+{self.suffix}"
        return s


@dataclass
class MLPSite:
    """One transformer MLP of the model."""

    block: int  # 1-based transformer block number, in execution order
    block_path: str  # module path of the block holding the MLP
    path: str  # module path of the deepest module holding the whole MLP
    fc1: tuple[str, ...]  # module paths of the first-layer projections (two for SwiGLU)
    fc2: str  # module path of the second projection
    in_features: int
    hidden_features: int
    out_features: int
    activation: str
    tokens: TokenLayout | None
    status: str
    reason: str = ""
    selected: bool = True
    self_contained: bool = False  # the module at ``path`` computes exactly this MLP and nothing else

    @property
    def convertible(self) -> bool:
        return self.status == CONVERTIBLE

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = None if self.tokens is None else {
            **{k: v for k, v in asdict(self.tokens).items() if k != "source"},
            "source": None if self.tokens.source is None else self.tokens.source.describe(),
        }
        return d


@dataclass
class Plan:
    """The result of :func:`find_mlps`: every MLP, in execution order, and the layer selection."""

    model: str
    input_size: tuple[int, int] | None
    sites: list[MLPSite]
    num_blocks: int
    layers: list[int]
    second_size: tuple[int, int] | None = None  # size the run-time grid sources were validated at
    trace_seconds: float = 0.0
    _trace: Any = field(default=None, repr=False)

    def selected(self) -> list[MLPSite]:
        return [s for s in self.sites if s.selected]

    def convertible(self) -> list[MLPSite]:
        """Sites that are selected and can be converted."""
        return [s for s in self.sites if s.selected and s.convertible]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "input_size": self.input_size,
            "num_blocks": self.num_blocks,
            "layers": self.layers,
            "second_size": self.second_size,
            "sites": [s.to_dict() for s in self.sites],
        }

    def __str__(self) -> str:
        lines = [f"{self.model}: {len(self.sites)} MLP(s) in {self.num_blocks} block(s), input {self.input_size}"]
        for s in self.sites:
            mark = "*" if s.selected and s.convertible else " "
            tok = s.tokens.describe() if s.tokens else "-"
            what = s.status if s.convertible else f"{s.status}: {s.reason}"
            lines.append(f"{mark} {s.block:>3} {s.path:<40} {s.in_features}->{s.hidden_features}->"
                         f"{s.out_features} {s.activation:<10} {tok:<12} {what}")
        return "\n".join(lines)


def find_mlps(model: nn.Module, example_inputs: Any = None, *, layers: Any = "all") -> Plan:
    """Trace ``model`` and report every transformer MLP: where it is, its tokens, convertible or why not.

    Nothing is changed. ``example_inputs`` overrides the input built from the model's config (a tensor, a
    tuple of arguments, a dict of keyword arguments). ``layers`` marks which blocks a conversion with the
    same argument would select.

    Example::

        >>> plan = localify.find_mlps(timm.create_model("deit_tiny_patch16_224"))
        >>> print(plan)
    """
    plan = analyze(model, example_inputs)
    apply_selection(plan, layers)
    return plan


def apply_selection(plan: Plan, layers: Any) -> None:
    picked = parse_layers(None if layers == "all" else layers, plan.num_blocks)
    plan.layers = picked
    chosen = set(picked)
    for s in plan.sites:
        s.selected = s.block in chosen


# --------------------------------------------------------------------------------------------------- analysis
def analyze(model: nn.Module, example_inputs: Any = None) -> Plan:
    t0 = time.perf_counter()
    example = make_example_inputs(model, example_inputs)
    trace = trace_model(model, example)
    idx = GraphIndex(trace.graph, trace.param_names, trace.user_inputs, trace.batch)
    matches = match_mlps(idx)
    if not matches:
        raise _no_mlp_error(model, idx)
    img = example.image
    input_size = (int(img.shape[-2]), int(img.shape[-1])) if img is not None else None

    modules = dict(model.named_modules())
    walker = TokenWalker(idx)
    scope: dict[str, list[fx.Node]] = {}
    for n in idx.graph.nodes:
        for path, _ in module_stack(n):
            scope.setdefault(path, []).append(n)
    raw = [_site_from_match(m, idx, modules, walker, scope) for m in matches]
    _number_blocks(raw)

    found_sites = [(site, res) for site, res in raw
                   if isinstance(res, Found) and res.kind != "bhwc" and site.status == CONVERTIBLE]
    second = _second_size(input_size, [r for _, r in found_sites])
    probe = _probe(model, example, second) if second and found_sites else None
    for site, res in found_sites:
        _assign_source(site, res, trace, probe)

    sites = [s for s, _ in raw]
    num_blocks = max(s.block for s in sites)
    plan = Plan(
        model=type(model).__name__,
        input_size=input_size,
        sites=sites,
        num_blocks=num_blocks,
        layers=list(range(1, num_blocks + 1)),
        second_size=second if probe is not None else None,
        trace_seconds=time.perf_counter() - t0,
        _trace=trace,
    )
    return plan


def _no_mlp_error(model: nn.Module, idx: GraphIndex) -> NoMLPFoundError:
    nodes = [n for n in idx.graph.nodes if n.op == "call_function"]
    lin = sum(1 for n in nodes if op_name(n) == "linear")
    conv = sum(1 for n in nodes if op_name(n) in ("conv2d", "convolution"))
    attn = sum(1 for n in nodes if op_name(n) in ("scaled_dot_product_attention", "softmax", "_softmax"))
    return NoMLPFoundError(
        f"no transformer MLP found in {type(model).__name__}: searched its traced graph ({len(nodes)} ops: "
        f"{lin} linear, {conv} convolution, {attn} attention/softmax) for Linear -> activation or gate -> "
        f"Linear on tokens, and found none. localify converts Vision Transformers; pass a ViT-like model "
        f"(timm, Hugging Face or your own)."
    )


def _param_module(idx: GraphIndex, linear_node: fx.Node) -> str | None:
    name = idx.param_of(linear_node.args[1])
    if name is None or not name.endswith("weight"):
        return None
    return name[: -len("weight")].rstrip(".")


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    out = []
    for items in zip(*parts):
        if all(i == items[0] for i in items):
            out.append(items[0])
        else:
            break
    return ".".join(out)


def _block_path(mlp_path: str) -> str:
    parts = mlp_path.split(".") if mlp_path else []
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1].isdigit():
            return ".".join(parts[:i])
    if parts and parts[-1].isdigit():
        return mlp_path
    return ".".join(parts[:-1])


def _site_from_match(m: MLPMatch, idx: GraphIndex, modules: dict[str, nn.Module], walker: TokenWalker,
                     scope: dict[str, list[fx.Node]]) -> tuple[MLPSite, Any]:
    from .layers import LocalityLinear

    fc1_paths = [_param_module(idx, n) for n in m.fc1]
    fc2_path = _param_module(idx, m.fc2) or owner(m.fc2)
    w1 = [n.args[1].meta.get("val") for n in m.fc1]
    w2 = m.fc2.args[1].meta.get("val")
    in_f = int(w1[0].shape[1]) if w1[0] is not None else -1
    hid = int(w2.shape[1]) if w2 is not None else -1
    out_f = int(w2.shape[0]) if w2 is not None else -1

    status, reason = CONVERTIBLE, ""
    localified = False
    shown_fc1 = []
    for p in fc1_paths:
        if p is None:
            status, reason = UNSUPPORTED, "a first-layer projection is a functional linear, not an nn.Linear module"
            shown_fc1.append("?")
            continue
        parent = p.rsplit(".", 1)[0] if "." in p else ""
        if p.endswith(".linear") and isinstance(modules.get(parent), LocalityLinear):
            localified = True
            shown_fc1.append(parent)
        else:
            shown_fc1.append(p)
            if not isinstance(modules.get(p), nn.Linear):
                status, reason = UNSUPPORTED, f"{p} is not an nn.Linear module"
    owners = [owner(n) for n in m.fc1] + [owner(m.fc2)]
    mlp_path = _common_path(owners)
    if mlp_path in (p or "" for p in fc1_paths):  # fc1 and fc2 are the same module?
        mlp_path = mlp_path.rsplit(".", 1)[0] if "." in mlp_path else ""

    res = token_layout(idx, m.input, walker)
    tokens = None
    if isinstance(res, Found) and res.kind == "bhwc":
        tokens = TokenLayout("BHWC", 0, 0, res.grid, GridSpec(kind="bhwc"))
    elif isinstance(res, Found):
        tokens = TokenLayout("BNC", res.prefix, res.suffix, res.grid)
    if localified:
        status, reason = LOCALIFIED, "already converted by localify"
    elif m.has_dwconv:
        status, reason = ALREADY_LOCAL, "the MLP already contains a depth-wise convolution"
    elif status == CONVERTIBLE and isinstance(res, NoGrid):
        status, reason = (FOLDED if res.folded else NO_GRID), res.reason

    site = MLPSite(
        block=0,
        block_path=_block_path(mlp_path),
        path=mlp_path,
        fc1=tuple(shown_fc1),
        fc2=fc2_path,
        in_features=in_f,
        hidden_features=hid,
        out_features=out_f,
        activation=m.activation,
        tokens=tokens,
        status=status,
        reason=reason,
        self_contained=_self_contained(m, idx, scope.get(mlp_path, [])),
    )
    return site, res


def _self_contained(m: MLPMatch, idx: GraphIndex, inside: list[fx.Node]) -> bool:
    members = set(m.body) | set(m.fc1) | {m.fc2}
    if m.input in inside:
        return False
    last = idx.order[m.fc2]
    return all(n in members or idx.order[n] > last for n in inside)


def _number_blocks(raw: list[tuple[MLPSite, Any]]) -> None:
    numbers: dict[str, int] = {}
    for site, _ in raw:
        site.block = numbers.setdefault(site.block_path, len(numbers) + 1)


# --------------------------------------------------------------------------------------------------- grid sources
def _second_size(size: tuple[int, int] | None, found: list[Found]) -> tuple[int, int] | None:
    if size is None or not found:
        return None
    rh = max(math.ceil(size[0] / f.grid[0]) for f in found)
    rw = max(math.ceil(size[1] / f.grid[1]) for f in found)
    return (size[0] + 2 * rh, size[1] + rw)


def _probe(model: nn.Module, example, size: tuple[int, int]) -> list[CallRecord] | None:
    """Run the original model once at another size, recording module calls; None if it refuses."""
    extra = {}
    if accepts_kwarg(model, "interpolate_pos_encoding") and "interpolate_pos_encoding" not in example.kwargs:
        extra["interpolate_pos_encoding"] = True
    try:
        ex2 = example.resized(size, extra)
    except Exception:
        return None
    calls: list[CallRecord] = []
    try:
        with torch.no_grad(), eval_mode(model), record_calls(model, calls):
            model(*ex2.args, **ex2.kwargs)
    except Exception:
        return None
    return calls


def _nth_input(calls: list[CallRecord], path: str, k: int) -> CallRecord | None:
    seen = 0
    for rec in calls:
        if rec.path == path and rec.phase == "input":
            if seen == k:
                return rec
            seen += 1
    return None


def _candidates(trace: Trace, before: int, need: tuple[int, int], unfold) -> list[GridSpec]:
    out: list[GridSpec] = []
    for rec in reversed(trace.calls[:before]):
        for kp, shp in rec.tensors:
            if len(shp) != 4 or shp[0] != trace.batch:
                continue
            for dims in ((2, 3), (1, 2)):
                if (shp[dims[0]], shp[dims[1]]) == need:
                    out.append(GridSpec(rec.path, rec.phase, key_to_json(kp), "tensor", dims, None, unfold))
        for (k1, v1), (k2, v2) in zip(rec.ints, rec.ints[1:]):
            if (v1, v2) == need:
                out.append(GridSpec(rec.path, rec.phase, key_to_json(k1), "ints", (0, 1), key_to_json(k2), unfold))
        if len(out) >= 8:
            break
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _spec_value(spec: GridSpec, rec: CallRecord) -> tuple[int, int] | None:
    if spec.kind == "ints":
        vals = {key_to_json(k): v for k, v in rec.ints}
        if spec.key not in vals or spec.key2 not in vals:
            return None
        h, w = vals[spec.key], vals[spec.key2]
    else:
        shapes = {key_to_json(k): s for k, s in rec.tensors}
        shp = shapes.get(spec.key)
        if shp is None or len(shp) <= max(spec.dims):
            return None
        h, w = shp[spec.dims[0]], shp[spec.dims[1]]
    if spec.unfold is not None:
        (kh, kw), (dh, dw), (ph, pw), (sh, sw) = spec.unfold
        h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return h, w


def _validates(spec: GridSpec, site: MLPSite, probe: list[CallRecord]) -> bool:
    rec = _nth_input(probe, site.fc1[0], 0)
    if rec is None or not rec.tensors:
        return False
    n = rec.tensors[0][1][1] if len(rec.tensors[0][1]) >= 3 else None
    src = None
    for r in probe:
        if r.order >= rec.order:
            break
        if r.path == spec.module and r.phase == spec.phase:
            src = r
    if src is None or n is None:
        return False
    hw = _spec_value(spec, src)
    return hw is not None and hw[0] * hw[1] + site.tokens.prefix + site.tokens.suffix == n


def _assign_source(site: MLPSite, res: Found, trace: Trace, probe: list[CallRecord] | None) -> None:
    # the site's first call of fc1 (an fc1 module shared by several blocks is located by its first call)
    rec = _nth_input(trace.calls, site.fc1[0], 0)
    before = rec.order if rec is not None else len(trace.calls)
    cands = _candidates(trace, before, res.spatial, res.unfold)
    if probe is None:
        chosen = cands[0] if cands else GridSpec(kind="static", static=res.grid)
    else:
        chosen = next((c for c in cands if _validates(c, site, probe)), None)
    if chosen is None:
        site.status = NO_GRID
        site.reason = (
            f"the {res.grid[0]}x{res.grid[1]} grid changes with the input size, but no module input or output "
            f"carries it at run time" if not cands else
            "no module input or output carries this block's grid consistently across input sizes"
        )
        return
    site.tokens = TokenLayout("BNC", res.prefix, res.suffix, res.grid, chosen)
