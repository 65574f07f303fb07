"""``localify``: splice locality into the MLPs of a model, in place, checking everything first."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ._grid import GridSource, GridSpec
from ._locate import LOCALIFIED, MLPSite, Plan, analyze, apply_selection
from .errors import AlreadyLocalifiedError, ConfigError, FuseError, NotLocalifiableError
from .layers import LocalityLinear

__all__ = ["LocalifyConfig", "localify", "fuse", "LocalifyState", "get_state"]

VARIANTS = ("dwconv", "residual", "localvit")
PRESERVING = ("dwconv", "residual")
STATE_ATTR = "_localify_state"


@dataclass
class LocalifyConfig:
    """Options of a conversion; saved with a converted model and replayed on load."""

    layers: Any = "all"  # "all", "early", "late", "1-4", "1,3,5-6", or a list of 1-based block numbers
    variant: str = "dwconv"  # "dwconv": fc1 -> dw(identity) -> act -> fc2; "residual": fc1 -> h + dw(h) (zero);
    #                          "localvit": the paper's block (1x1+BN+act -> dw+BN+act -> SE/ECA -> 1x1+BN)
    kernel_size: int = 3  # size of the depth-wise kernel (odd)
    act: str = "hswish"  # localvit only: hswish, relu6, relu, silu/swish, gelu
    attention: str | None = None  # localvit only: None, "se" or "eca"
    se_hidden: int | None = None  # localvit + se: bottleneck width (default 4, as LocalViT-T)
    se_reduction: int | None = None  # localvit + se: or hidden // se_reduction
    eca_kernel: int | None = None  # localvit + eca: kernel of the channel conv (default: ECA-Net's formula)

    def __post_init__(self) -> None:
        from .ffn import ACTIVATIONS, ATTENTIONS

        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.variant != "localvit":
            given = {k: v for k, v in (("attention", self.attention), ("se_hidden", self.se_hidden),
                                       ("se_reduction", self.se_reduction), ("eca_kernel", self.eca_kernel))
                     if v is not None}
            if given or self.act != "hswish":
                raise ConfigError(f"options {sorted(given) or ['act']} apply to variant='localvit' only; "
                                  f"variant={self.variant!r} keeps the MLP's own activation")
        if not isinstance(self.act, str) or self.act.lower() not in ACTIVATIONS:
            raise ConfigError(f"unknown act {self.act!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"unknown attention {self.attention!r}; choose one of None, 'se', 'eca'")
        if self.se_hidden is not None and self.se_reduction is not None:
            raise ConfigError("give se_hidden or se_reduction, not both")
        if (self.se_hidden is not None or self.se_reduction is not None) and self.attention != "se":
            raise ConfigError("se_hidden / se_reduction need attention='se'")
        if self.eca_kernel is not None and self.attention != "eca":
            raise ConfigError("eca_kernel needs attention='eca'")
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
    kind: str  # "fc1": the first projection(s) wrapped in LocalityLinear; "mlp": the MLP module replaced
    path: str  # the MLP module path
    fc1: list[str]
    fc2: str
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
    fused: bool = False


def get_state(model: nn.Module) -> LocalifyState | None:
    return getattr(model, STATE_ATTR, None)


def localify(
    model: nn.Module,
    layers: Any = "all",
    *,
    variant: str = "dwconv",
    kernel_size: int = 3,
    act: str = "hswish",
    attention: str | None = None,
    se_hidden: int | None = None,
    se_reduction: int | None = None,
    eca_kernel: int | None = None,
    example_inputs: Any = None,
    plan: Plan | None = None,
    config: LocalifyConfig | None = None,
) -> nn.Module:
    """Turn the transformer MLPs of ``model`` into locality FFNs, in place, and return the same model.

    Each selected MLP keeps its fc1/fc2 weights; a depth-wise ``kernel_size`` convolution runs on the token
    grid between them (prefix and suffix tokens skip it). The default variants preserve the function
    exactly at conversion. ``variant="localvit"`` replaces each whole MLP module with the paper's block
    (:class:`~localify.ffn.LocalViTFFN`: ``act``, ``attention``, ``se_hidden``/``se_reduction``,
    ``eca_kernel``); it changes the function and is meant for training. Blocks that cannot be converted (no
    grid, already local) are skipped with a warning; nothing changes if any check fails.

    Example::

        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> model = localify.localify(model, layers="1-4")
    """
    if config is None:
        config = LocalifyConfig(layers=layers, variant=variant, kernel_size=kernel_size, act=act,
                                attention=attention, se_hidden=se_hidden, se_reduction=se_reduction,
                                eca_kernel=eca_kernel)
    prev = get_state(model)
    if prev is not None and prev.fused:
        raise AlreadyLocalifiedError("this model was fused for deployment; convert the unfused model instead")
    if prev is not None and {**prev.config.to_dict(), "layers": None} != {**config.to_dict(), "layers": None}:
        raise AlreadyLocalifiedError(
            f"this model was converted with other options ({prev.config.to_dict()}); convert more blocks with "
            f"the same variant and options, or start from the base model")
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
        rec = SiteRecord(site.block, "mlp" if config.variant == "localvit" else "fc1", site.path,
                         list(site.fc1), site.fc2, site.tokens.prefix, site.tokens.suffix, site.tokens.layout,
                         spec.to_dict())
        built.extend(build_site(model, rec, config, src))
        records.append(rec)

    from ._sources import SOURCE_ATTR, get_source, infer_timm_source

    source = None if get_source(model) is not None else infer_timm_source(model)

    # nothing below can fail on a valid plan
    if source is not None:
        object.__setattr__(model, SOURCE_ATTR, source)
    for path, new in built:
        new.train(model.get_submodule(path).training)  # keep the mode of what it replaces
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


def build_site(model: nn.Module, rec: SiteRecord, config: LocalifyConfig,
               src: GridSource) -> list[tuple[str, nn.Module]]:
    """The new modules for one site, keyed by the module path they replace (nothing is changed yet)."""
    if rec.kind == "mlp":
        from .ffn import LocalViTFFN

        ffn = LocalViTFFN(
            model.get_submodule(rec.fc1[0]), model.get_submodule(rec.fc2), src, rec.prefix, rec.suffix,
            kernel_size=config.kernel_size, act=config.act, attention=config.attention,
            se_hidden=config.se_hidden, se_reduction=config.se_reduction, eca_kernel=config.eca_kernel,
            layout=rec.layout,
        )
        return [(rec.path, ffn)]
    return [
        (path, LocalityLinear(model.get_submodule(path), src, rec.prefix, rec.suffix, config.kernel_size,
                              residual=config.variant == "residual", layout=rec.layout))
        for path in rec.fc1
    ]


def _localvit_reason(site: MLPSite) -> str | None:
    if not site.self_contained or not site.path:
        return ("the localvit variant replaces a whole MLP module, but this MLP's layers are not one "
                "self-contained module; use variant='dwconv' or 'residual'")
    if len(site.fc1) != 1 or "glu" in site.activation:
        return f"the localvit variant needs a plain fc1 -> act -> fc2 MLP; this one is gated ({site.activation})"
    return None


def _targets(plan: Plan, config: LocalifyConfig) -> list[MLPSite]:
    if config.variant == "localvit":
        for s in plan.sites:
            why = _localvit_reason(s) if s.convertible else None
            if why:
                s.status, s.reason = "unsupported", why
    selected = plan.selected()
    targets = [s for s in selected if s.convertible]
    skipped = [s for s in selected if not s.convertible and s.status != LOCALIFIED]
    done = [s for s in selected if s.status == LOCALIFIED]
    if not targets:
        if done and not skipped:
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


def fuse(model: nn.Module) -> nn.Module:
    """Fold the converted blocks of ``model`` for inference, in place, and return it.

    Every BatchNorm of a ``localvit`` block is folded into the conv or linear before it, and every residual
    depth-wise branch (``h + dw(h)``) is merged into its kernel (centre tap + 1): the deployed blocks are
    conv-only and give the same outputs in eval mode. Fusing twice changes nothing. The model must be in
    eval mode (BatchNorm folds its running statistics); a model in train mode raises :class:`FuseError`.

    Example::

        >>> deploy = localify.fuse(model.eval())
    """
    from .ffn import LocalViTFFN, fuse_ffn, fuse_locality_linear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (LocalViTFFN, LocalityLinear))]
    if not targets:
        raise FuseError(f"{type(model).__name__} has no localify blocks to fuse; convert it with localify() first")
    training = [n for n, m in targets if any(mm.training for mm in m.modules())]
    if training:
        raise FuseError(
            f"cannot fuse while {len(training)} converted block(s) are in train mode (first: {training[0]}): "
            f"BatchNorm would fold batch statistics. Call model.eval() first."
        )
    new = [(n, fuse_ffn(m) if isinstance(m, LocalViTFFN) else fuse_locality_linear(m)) for n, m in targets]
    for name, mod in new:
        _set_submodule(model, name, mod.eval())
    state = get_state(model)
    if state is not None:
        state.fused = True
    return model
