"""The plan: every transformer MLP of a model, its tokens, and whether it can be converted (``find_mlps``).

:func:`build_plan` runs the pipeline once: example inputs and trace (:mod:`localify._trace`), MLP matching
(:mod:`localify._match`), the token walk (:mod:`localify._tokens`), the grid proof (:mod:`localify._proof`)
and the run-time grid source of each block (:mod:`localify._grid`). The result is a :class:`Plan`; nothing
in the model changes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

import torch
from torch import fx, nn

from ._grid import GridSpec, find_grid_source, key_to_json, second_size
from ._match import MLPMatch, match_mlps
from ._ops import GraphIndex, module_stack, op_name, owner, val_shape
from ._proof import GridProof, prove_grids
from ._select import parse_layers
from ._tokens import NoGrid, Origin, TokenGrid, TokenWalker, token_layout
from ._trace import CallRecord, Trace, eval_mode, make_example_inputs, record_calls, trace_model
from .errors import NoMLPFoundError, first_line
from .layers import LocalifyModule

__all__ = ["SiteStatus", "Layout", "TokenLayout", "SiteRecord", "MLPSite", "Plan", "find_mlps", "build_plan"]


class SiteStatus(str, Enum):
    """What can be done with one MLP (a ``str``: recipes and ``--json`` output hold the plain value)."""

    CONVERTIBLE = "convertible"  # a proven raster grid: converted when selected
    NO_GRID = "no_grid"  # no patch grid (class token alone, input tokens, shuffled tokens, not raster)
    FOLDED = "folded"  # patches or windows folded into the batch dimension
    ALREADY_LOCAL = "already_local"  # the MLP already holds a depth-wise conv
    LOCALIFIED = "localified"  # converted by localify
    UNSUPPORTED = "unsupported"  # the selected variant or the module structure does not allow it

    def __str__(self) -> str:
        return self.value


class Layout(str, Enum):
    """How the tokens entering an MLP are stored."""

    BNC = "BNC"  # (B, N, C) tokens
    BHWC = "BHWC"  # (B, H, W, C) feature map

    def __str__(self) -> str:
        return self.value


CONVERTIBLE, NO_GRID, FOLDED = SiteStatus.CONVERTIBLE, SiteStatus.NO_GRID, SiteStatus.FOLDED
ALREADY_LOCAL, LOCALIFIED, UNSUPPORTED = SiteStatus.ALREADY_LOCAL, SiteStatus.LOCALIFIED, SiteStatus.UNSUPPORTED


@dataclass(frozen=True)
class TokenLayout:
    """How the tokens entering an MLP are laid out."""

    layout: Layout
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
class SiteRecord:
    """What was done to one MLP: enough to replay the conversion on a fresh copy of the base model."""

    block: int
    kind: str  # the variant's site_kind: "fc1" (first projection(s) wrapped) or "mlp" (the MLP replaced)
    path: str  # the MLP module path
    fc1: list[str]
    fc2: str
    prefix: int
    suffix: int
    layout: str
    grid: dict  # GridSpec.to_dict()
    # the MLP module at ``path`` maps every token on its own: the converted MLP runs as a LocalityMLP (grid and
    # extra tokens through the whole MLP apart, joined on the narrow side); decided by the variant at conversion
    per_token: bool = False

    def to_dict(self) -> dict:
        """The record as saved in a recipe: ``per_token`` only when true, so a save that does not use it stays
        readable by localify versions from before the field."""
        d = asdict(self)
        if not self.per_token:
            del d["per_token"]
        return d


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
    status: SiteStatus
    reason: str = ""
    selected: bool = True
    self_contained: bool = False  # the module at ``path`` computes exactly this MLP and nothing else
    proof: GridProof | None = field(default=None, repr=False)  # the grid proof of its tokens (None: not tried)

    @property
    def convertible(self) -> bool:
        return self.status == CONVERTIBLE

    def record(self, kind: str) -> SiteRecord:
        """The record of converting this site (``kind`` is the variant's ``site_kind``)."""
        t = self.tokens
        return SiteRecord(self.block, kind, self.path, list(self.fc1), self.fc2, t.prefix, t.suffix, str(t.layout),
                          t.source.to_dict())

    def to_dict(self) -> dict:
        d = asdict(replace(self, proof=None))
        d["proof"] = None if self.proof is None else {"ok": self.proof.ok, "reason": self.proof.reason,
                                                      "stride": self.proof.stride}
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
    tracer: str = "torch.export"  # which tracer produced the graph
    input_note: str = ""  # how the example input was chosen when the model's config did not say
    trace: Any = field(default=None, repr=False, compare=False)  # the Trace the plan was built from

    def select(self, layers: Any) -> Plan:
        """A copy of the plan with ``layers`` marked as selected (this plan is not changed)."""
        picked = parse_layers(None if layers == "all" else layers, self.num_blocks)
        chosen = set(picked)
        return replace(self, layers=picked, sites=[replace(s, selected=s.block in chosen) for s in self.sites])

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
            "tracer": self.tracer,
            "input_note": self.input_note,
            "sites": [s.to_dict() for s in self.sites],
        }

    def __str__(self) -> str:
        head = f"{self.model}: {len(self.sites)} MLP(s) in {self.num_blocks} block(s), input {self.input_size}"
        if self.tracer != "torch.export":
            head += f", traced with {self.tracer}"
        lines = [head] + ([f"  ({self.input_note})"] if self.input_note else [])
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
    return build_plan(model, example_inputs).select(layers)


def build_plan(model: nn.Module, example_inputs: Any = None) -> Plan:
    """Trace ``model`` once and build its plan, with every block selected."""
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
    pairs = [_site_from_match(m, idx, modules, walker, scope) for m in matches]
    _number_blocks([site for site, _ in pairs])
    pairs = _prove(trace, matches, pairs)

    tokens = [(site, res) for site, res in pairs
              if isinstance(res, TokenGrid) and res.kind != Origin.BHWC and site.status == CONVERTIBLE]
    second = second_size(input_size, [res.grid for _, res in tokens])
    probe = _probe(model, example, second) if second and tokens else None
    for site, res in tokens:
        _assign_source(site, res, trace, probe)

    sites = [s for s, _ in pairs]
    num_blocks = max(s.block for s in sites)
    return Plan(
        model=type(model).__name__,
        input_size=input_size,
        sites=sites,
        num_blocks=num_blocks,
        layers=list(range(1, num_blocks + 1)),
        second_size=second if probe is not None else None,
        trace_seconds=time.perf_counter() - t0,
        tracer=trace.tracer,
        input_note=example.note,
        trace=trace,
    )


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


def _localify_owner(path: str, modules: dict[str, nn.Module]) -> str | None:
    """The path of the localify module that ``path`` sits inside, if any."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:i])
        if isinstance(modules.get(p), LocalifyModule):
            return p
    return None


def _site_from_match(m: MLPMatch, idx: GraphIndex, modules: dict[str, nn.Module], walker: TokenWalker,
                     scope: dict[str, list[fx.Node]]) -> tuple[MLPSite, TokenGrid | NoGrid]:
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
        wrapper = _localify_owner(p, modules)
        if wrapper is not None:
            localified = True
            shown_fc1.append(wrapper if p.endswith(".linear") else p)
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
    if isinstance(res, TokenGrid) and res.kind == Origin.BHWC:
        tokens = TokenLayout(Layout.BHWC, 0, 0, res.grid, GridSpec(kind="bhwc"))
    elif isinstance(res, TokenGrid):
        tokens = TokenLayout(Layout.BNC, res.prefix, res.suffix, res.grid)
    if localified:
        status, reason = LOCALIFIED, "already converted by localify"
    elif m.has_dwconv:
        status, reason = ALREADY_LOCAL, "the MLP already contains a depth-wise convolution"
    elif status == CONVERTIBLE and m.shared:
        status, reason = UNSUPPORTED, ("the first projection's output also feeds ops outside the MLP (q, k, v "
                                       "packed with fc1 in one Linear); a depth-wise conv over it would mix them")
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


def _prove(trace: Trace, matches: list[MLPMatch], pairs: list[tuple[MLPSite, TokenGrid | NoGrid]]
           ) -> list[tuple[MLPSite, TokenGrid | NoGrid]]:
    """Check every candidate grid with the position-code proof; only a proven raster grid stays convertible.

    A grid the token walk found but the proof does not confirm becomes ``no_grid`` with what the proof found
    (a permutation, frames or tiles on the token axis, channels used as tokens...). A layout the walk could not
    follow but the proof shows to be a raster grid (padding tokens after a tile, the raster last stage of a
    model that reorders tokens earlier) becomes a candidate, still subject to finding its run-time source."""
    todo = {}
    for m, (site, res) in zip(matches, pairs):
        shape = val_shape(m.input)
        if site.status == CONVERTIBLE or (site.status == NO_GRID and shape is not None and len(shape) in (3, 4)):
            todo[m.input] = "BHWC" if (isinstance(res, TokenGrid) and res.kind == Origin.BHWC) or len(shape or ()) == 4 \
                else "BNC"
    try:
        proofs = prove_grids(trace.program, trace.example, todo) if todo else {}
    except Exception as e:  # a proof that cannot run proves nothing: convert nothing on its account
        why = f"the grid proof could not run ({type(e).__name__}: {first_line(e, 200)})"
        proofs = {n: GridProof(False, why) for n in todo}
    out = []
    for m, (site, res) in zip(matches, pairs):
        proof = proofs.get(m.input)
        site.proof = proof
        if proof is None:
            out.append((site, res))
            continue
        if site.status == CONVERTIBLE and not proof.ok:
            site.status, site.reason = NO_GRID, f"not a proven raster grid: {proof.reason}"
        elif site.status == CONVERTIBLE and (proof.prefix, proof.suffix, tuple(proof.grid)) != (
                res.prefix, res.suffix, tuple(res.grid)):
            site.status, site.reason = NO_GRID, (
                f"the grid proof found {_describe(proof.prefix, proof.grid, proof.suffix)} tokens where the token "
                f"walk found {_describe(res.prefix, res.grid, res.suffix)}")
        elif site.status == NO_GRID and proof.ok:
            kind = Origin.BHWC if todo[m.input] == "BHWC" else Origin.FLATTEN
            res = TokenGrid(proof.prefix, proof.suffix, tuple(proof.grid), m.input, kind, tuple(proof.grid))
            site.status, site.reason = CONVERTIBLE, ""
            site.tokens = (TokenLayout(Layout.BHWC, 0, 0, res.grid, GridSpec(kind="bhwc")) if kind == Origin.BHWC
                           else TokenLayout(Layout.BNC, res.prefix, res.suffix, res.grid))
        out.append((site, res))
    return out


def _describe(prefix: int, grid: tuple[int, int], suffix: int) -> str:
    return TokenLayout(Layout.BNC, prefix, suffix, tuple(grid)).describe()


def _self_contained(m: MLPMatch, idx: GraphIndex, inside: list[fx.Node]) -> bool:
    members = set(m.body) | set(m.fc1) | {m.fc2}
    if m.input in inside:
        return False
    last = idx.order[m.fc2]
    return all(n in members or idx.order[n] > last for n in inside)


def _number_blocks(sites: list[MLPSite]) -> None:
    numbers: dict[str, int] = {}
    for site in sites:
        site.block = numbers.setdefault(site.block_path, len(numbers) + 1)


def _probe(model: nn.Module, example, size: tuple[int, int]) -> list[CallRecord] | None:
    """Run the original model once at another size, recording module calls; None if it refuses."""
    try:
        ex2 = example.at_size(model, size)
    except Exception:
        return None
    calls: list[CallRecord] = []
    try:
        with torch.no_grad(), eval_mode(model), record_calls(model, calls):
            model(*ex2.args, **ex2.kwargs)
    except Exception:
        return None
    return calls


def _assign_source(site: MLPSite, res: TokenGrid, trace: Trace, probe: list[CallRecord] | None) -> None:
    proof, img = site.proof, trace.example.image
    image = None
    if proof is not None and proof.ok and proof.stride and img is not None and img.dim() == 4 \
            and all(float(s).is_integer() and s >= 1 for s in proof.stride):
        image = (key_to_json(trace.example.image_key), (int(proof.stride[0]), int(proof.stride[1])))
    found = find_grid_source(trace.calls, trace.batch, site.fc1[0], res.grid, res.spatial, res.unfold,
                             res.prefix + res.suffix, probe, image)
    if isinstance(found, str):
        site.status, site.reason = NO_GRID, found
    else:
        site.tokens = TokenLayout(Layout.BNC, res.prefix, res.suffix, res.grid, found)
