"""``localify``: splice locality into the MLPs of a model, in place, checking everything first."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ._grid import GridSource, GridSpec
from ._locate import LOCALIFIED, MLPSite, Plan, analyze, apply_selection
from .errors import AlreadyLocalifiedError, ConfigError, NotLocalifiableError
from .layers import LocalityLinear

__all__ = ["LocalifyConfig", "localify", "LocalifyState", "get_state"]

VARIANTS = ("dwconv", "residual")
STATE_ATTR = "_localify_state"


@dataclass
class LocalifyConfig:
    """Options of a conversion; saved with a converted model and replayed on load."""

    layers: Any = "all"  # "all", "early", "late", "1-4", "1,3,5-6", or a list of 1-based block numbers
    variant: str = "dwconv"  # "dwconv": fc1 -> dw(identity) -> act -> fc2; "residual": fc1 -> h + dw(h) (zero)
    kernel_size: int = 3  # size of the depth-wise kernel (odd)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if not isinstance(self.kernel_size, int) or isinstance(self.kernel_size, bool) or self.kernel_size < 1 \
                or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be a positive odd int (3, 5, 7, ...); got {self.kernel_size!r}")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SiteRecord:
    """What was done to one MLP: enough to replay the conversion on a fresh copy of the base model."""

    block: int
    fc1: list[str]
    prefix: int
    suffix: int
    layout: str
    grid: dict  # GridSpec.to_dict()


@dataclass
class LocalifyState:
    """Bookkeeping attached to a converted model (not a module, not in the state dict)."""

    config: LocalifyConfig
    sites: list[SiteRecord] = field(default_factory=list)
    sources: dict[GridSpec, GridSource] = field(default_factory=dict)

    def source_for(self, spec: GridSpec, model: nn.Module) -> GridSource:
        src = self.sources.get(spec)
        if src is None:
            src = self.sources[spec] = GridSource(spec)
            src.attach(model)
        return src


def get_state(model: nn.Module) -> LocalifyState | None:
    return getattr(model, STATE_ATTR, None)


def localify(
    model: nn.Module,
    layers: Any = "all",
    *,
    variant: str = "dwconv",
    kernel_size: int = 3,
    example_inputs: Any = None,
    plan: Plan | None = None,
) -> nn.Module:
    """Turn the transformer MLPs of ``model`` into locality FFNs, in place, and return the same model.

    Each selected MLP keeps its fc1/fc2 weights; a depth-wise ``kernel_size`` convolution runs on the token
    grid between them (prefix and suffix tokens skip it). The default variants preserve the function
    exactly at conversion. Blocks that cannot be converted (no grid, already local) are skipped with a
    warning; nothing changes if any check fails.

    Example::

        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> model = localify.localify(model, layers="1-4")
    """
    config = LocalifyConfig(layers=layers, variant=variant, kernel_size=kernel_size)
    if plan is None:
        plan = analyze(model, example_inputs)
    apply_selection(plan, config.layers)
    targets = _targets(plan, config)

    # build every new module before touching the model
    state = get_state(model) or LocalifyState(config)
    built: list[tuple[str, nn.Module]] = []
    records: list[SiteRecord] = []
    pending: dict[GridSpec, GridSource] = {}
    for site in targets:
        spec = site.tokens.source
        src = state.sources.get(spec) or pending.setdefault(spec, GridSource(spec))
        for path in site.fc1:
            lin = model.get_submodule(path)
            new = LocalityLinear(
                lin, src, site.tokens.prefix, site.tokens.suffix, config.kernel_size,
                residual=config.variant == "residual", layout=site.tokens.layout,
            )
            built.append((path, new))
        records.append(SiteRecord(site.block, list(site.fc1), site.tokens.prefix, site.tokens.suffix,
                                  site.tokens.layout, spec.to_dict()))

    # nothing below can fail on a valid plan
    for path, new in built:
        _set_submodule(model, path, new)
    for spec, src in pending.items():
        src.attach(model)
        state.sources[spec] = src
    state.sites.extend(records)
    if get_state(model) is None:
        object.__setattr__(model, STATE_ATTR, state)
    for site in targets:
        site.status, site.reason = LOCALIFIED, "converted"
    return model


def _targets(plan: Plan, config: LocalifyConfig) -> list[MLPSite]:
    selected = plan.selected()
    targets = [s for s in selected if s.convertible]
    skipped = [s for s in selected if not s.convertible and s.status != LOCALIFIED]
    done = [s for s in selected if s.status == LOCALIFIED]
    if not targets:
        if done and not skipped:
            warnings.warn(
                f"localify: the {len(done)} selected block(s) of {plan.model} were already converted; "
                f"nothing to do", stacklevel=3,
            )
            raise AlreadyLocalifiedError(
                f"{plan.model} is already localified in block(s) {sorted({s.block for s in done})}; converting "
                f"again would splice twice. Convert a fresh copy of the base model instead."
            )
        reasons = "; ".join(f"block {s.block} ({s.path}): {s.reason}" for s in skipped[:6])
        raise NotLocalifiableError(
            f"none of the {len(selected)} selected MLP(s) of {plan.model} can be localified: {reasons}. "
            f"Select other blocks with layers= (the model has {plan.num_blocks}) or check the example input size."
        )
    if skipped:
        warnings.warn(
            "localify: skipped " + "; ".join(f"block {s.block} ({s.path}): {s.status}: {s.reason}" for s in skipped),
            stacklevel=3,
        )
    return targets


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
