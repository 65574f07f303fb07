"""Conversion options (:class:`LocalifyConfig`) and variants: what a conversion splices into each MLP.

Each variant is defined here, once.

A :class:`Variant` says

* its ``name`` (``LocalifyConfig.variant``) and whether it ``preserves_function`` at conversion;
* which :class:`~localify.LocalifyConfig` ``options`` it takes besides ``layers`` and ``kernel_size``, and how
  they are validated (:meth:`Variant.validate`);
* which sites it accepts (:meth:`Variant.refuse` returns the reason when not);
* what it records of a site for replay (:meth:`Variant.record`: the ``site_kind`` and any decision taken by
  looking at the model, such as ``per_token``) and how it builds its modules from that record
  (:meth:`Variant.build`; on ``load`` the record is all it gets, the model is not traced again).

The modules it builds derive from :class:`~localify.layers.LocalifyModule` and own their deployment
(``fuse()``), their locality parameters and their base layer, so nothing else in localify switches on a
variant name.

Adding a variant: subclass :class:`Variant`, set ``name``/``preserves_function``/``options``/``site_kind``,
implement ``build`` (and ``refuse``/``validate`` if needed), and call :func:`register_variant` on an instance.
``localify.localify(model, variant="yours")``, ``save``/``load``, ``fuse`` and ``export_onnx`` then work with it
(a saved model names the variant: the code that registers it must run before loading).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from numbers import Integral
from typing import Any, ClassVar

from torch import nn

from ._grid import GridSource
from ._plan import Layout, MLPSite, SiteRecord
from .errors import ConfigError
from .ffn import ACTIVATIONS, ATTENTIONS, LocalViTFFN
from .layers import LocalityLinear, LocalityMLP, per_token_module, pointwise_replacement

__all__ = ["LocalifyConfig", "Variant", "register_variant", "get_variant", "variant_names", "is_int"]


def is_int(v: Any) -> bool:
    """An integer that is not a bool (``True`` is not a kernel size)."""
    return isinstance(v, Integral) and not isinstance(v, bool)


class Variant:
    """One kind of conversion. Subclass it and register an instance with :func:`register_variant`."""

    name: ClassVar[str]
    preserves_function: ClassVar[bool]  # the converted model computes what the original computed
    options: ClassVar[tuple[str, ...]] = ()  # LocalifyConfig fields it takes besides layers / kernel_size
    site_kind: ClassVar[str] = "fc1"  # "fc1": the first projection(s) are wrapped; "mlp": the MLP is replaced

    def validate(self, config: LocalifyConfig) -> None:
        """Raise :class:`ConfigError` for option values this variant cannot use."""

    def refuse(self, site: MLPSite, config: LocalifyConfig) -> str | None:
        """Why this variant cannot convert ``site`` (a convertible one), or None."""
        return None

    def record(self, model: nn.Module, site: MLPSite) -> SiteRecord:
        """The record of converting ``site`` of ``model`` (not yet converted; read, never changed): what
        :meth:`build` gets, now and when a saved model is loaded."""
        return site.record(self.site_kind)

    def build(self, model: nn.Module, record: SiteRecord, config: LocalifyConfig,
              grid: GridSource) -> list[tuple[str, nn.Module]]:
        """The new modules for one site, keyed by the module path each replaces, swapped in in this order (the
        model is not changed here)."""
        raise NotImplementedError


_REGISTRY: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    """Make ``variant`` available as ``localify(model, variant=variant.name)``; returns it."""
    if not isinstance(variant, Variant):
        raise ConfigError(f"register_variant takes a Variant instance, got {type(variant).__name__}")
    _REGISTRY[variant.name] = variant
    return variant


def get_variant(name: Any) -> Variant:
    v = _REGISTRY.get(name) if isinstance(name, str) else None
    if v is None:
        raise ConfigError(f"unknown variant {name!r}; choose one of {', '.join(variant_names())}")
    return v


def variant_names() -> list[str]:
    return list(_REGISTRY)


def per_token_site(model: nn.Module, site: MLPSite) -> bool:
    """Whether the MLP of ``site`` can run as a :class:`~localify.layers.LocalityMLP`: its tokens are (B, N, C),
    one module (``site.path``) computes exactly this MLP and holds its fc1(s) and fc2, and that module maps
    every token on its own (:func:`~localify.layers.per_token_module`, run on the unconverted module)."""
    inside = site.path + "."
    if not (site.self_contained and site.path and site.tokens is not None and site.tokens.layout == Layout.BNC
            and site.fc2.startswith(inside) and all(p.startswith(inside) for p in site.fc1)):
        return False
    try:
        mlp = model.get_submodule(site.path)
    except AttributeError:
        return False
    return per_token_module(mlp, site.in_features)


class DWConv(Variant):
    """``fc1 -> dw(k x k) -> act -> fc2``; the kernel starts as identity (Dirac): exact at conversion.

    Each fc1 becomes a :class:`~localify.layers.LocalityLinear`. Where the MLP is one per-token module
    (:func:`per_token_site`, recorded as ``per_token``), that module also runs as a
    :class:`~localify.layers.LocalityMLP` (grid and extra tokens through the whole MLP apart, joined on the
    narrow side: the wide hidden tensor is never concatenated) and its fc2, a plain ``nn.Linear``, as a
    :class:`~localify.layers.PointwiseLinear` with the same parameters. Parameters and state-dict keys are the
    same either way."""

    name = "dwconv"
    preserves_function = True
    residual = False

    def record(self, model, site):
        rec = site.record(self.site_kind)
        rec.per_token = per_token_site(model, site)
        return rec

    def build(self, model, record, config, grid):
        out: list[tuple[str, nn.Module]] = [
            (path, LocalityLinear(model.get_submodule(path), grid, record.prefix, record.suffix, config.kernel_size,
                                  residual=self.residual, layout=record.layout))
            for path in record.fc1]
        if record.per_token:
            fc2 = pointwise_replacement(model.get_submodule(record.fc2))
            if fc2 is not None:
                out.append((record.fc2, fc2))
            # swapped in last: it shares the MLP module's children, by then the new fc1(s) and fc2
            out.append((record.path, LocalityMLP(model.get_submodule(record.path), grid, record.prefix,
                                                 record.suffix, record.layout)))
        return out


class Residual(DWConv):
    """``fc1 -> h + dw(h) -> act -> fc2``; the kernel starts at zero (Convpass-style): exact at conversion."""

    name = "residual"
    residual = True


class LocalViT(Variant):
    """The paper's block replacing the whole MLP module: 1x1 + BN + act -> dw + BN + act -> SE/ECA -> 1x1 + BN."""

    name = "localvit"
    preserves_function = False
    options = ("act", "attention", "se_hidden", "se_reduction", "eca_kernel")
    choices = {"act": list(ACTIVATIONS), "attention": list(ATTENTIONS)}  # allowed values, for --help
    site_kind = "mlp"

    def validate(self, config):
        if not isinstance(config.act, str) or config.act.lower() not in ACTIVATIONS:
            raise ConfigError(f"unknown act {config.act!r}; choose one of {', '.join(ACTIVATIONS)}")
        if config.attention not in ATTENTIONS:
            raise ConfigError(f"unknown attention {config.attention!r}; choose one of None, 'se', 'eca'")
        for opt in ("se_hidden", "se_reduction", "eca_kernel"):
            v = getattr(config, opt)
            if v is not None and (not is_int(v) or v < 1):
                raise ConfigError(f"{opt} must be a positive int; got {v!r}")
        if config.se_hidden is not None and config.se_reduction is not None:
            raise ConfigError("give se_hidden or se_reduction, not both")
        if (config.se_hidden is not None or config.se_reduction is not None) and config.attention != "se":
            raise ConfigError("se_hidden / se_reduction need attention='se'")
        if config.eca_kernel is not None and config.attention != "eca":
            raise ConfigError("eca_kernel needs attention='eca'")
        if config.eca_kernel is not None and config.eca_kernel % 2 == 0:
            raise ConfigError(f"eca_kernel must be odd; got {config.eca_kernel}")

    def refuse(self, site, config):
        if not site.self_contained or not site.path:
            return ("the localvit variant replaces a whole MLP module, but this MLP's layers are not one "
                    "self-contained module; use variant='dwconv' or 'residual'")
        if len(site.fc1) != 1 or "glu" in site.activation:
            return f"the localvit variant needs a plain fc1 -> act -> fc2 MLP; this one is gated ({site.activation})"
        return None

    def build(self, model, record, config, grid):
        ffn = LocalViTFFN(
            model.get_submodule(record.fc1[0]), model.get_submodule(record.fc2), grid, record.prefix,
            record.suffix, kernel_size=config.kernel_size, act=config.act, attention=config.attention,
            se_hidden=config.se_hidden, se_reduction=config.se_reduction, eca_kernel=config.eca_kernel,
            layout=record.layout,
        )
        return [(record.path, ffn)]


for _v in (DWConv(), Residual(), LocalViT()):
    register_variant(_v)


MAX_KERNEL = 31  # a larger depth-wise kernel is almost surely a typo (and a multi-GiB file for ViT-B)


@dataclass
class LocalifyConfig:
    """Options of a conversion; saved with a converted model and replayed on load.

    Fields other than ``layers`` and ``kernel_size`` belong to one variant each (see
    :mod:`localify._variants`): giving one to another variant is a :class:`ConfigError`.
    """

    layers: Any = "all"  # "all", "early", "late", "1-4", "1,3,5-6", or a list of 1-based block numbers
    variant: str = "dwconv"  # "dwconv": fc1 -> dw(identity) -> act -> fc2; "residual": fc1 -> h + dw(h) (zero);
    #                          "localvit": the paper's block (1x1+BN+act -> dw+BN+act -> SE/ECA -> 1x1+BN)
    kernel_size: int = 3  # size of the depth-wise kernel (odd, at most MAX_KERNEL and the block's grid)
    act: str = "hswish"  # localvit only: hswish, relu6, relu, silu/swish, gelu
    attention: str | None = None  # localvit only: None, "se" or "eca"
    se_hidden: int | None = None  # localvit + se: bottleneck width (default 4, as LocalViT-T)
    se_reduction: int | None = None  # localvit + se: or hidden // se_reduction
    eca_kernel: int | None = None  # localvit + eca: kernel of the channel conv (default: ECA-Net's formula)

    def __post_init__(self) -> None:
        variant = get_variant(self.variant)
        defaults = {f.name: f.default for f in fields(self)}
        given = sorted(k for k in defaults if k not in ("layers", "variant", "kernel_size")
                       and k not in variant.options and getattr(self, k) != defaults[k])
        if given:
            owners = [v for v in variant_names() if set(given) <= set(get_variant(v).options)]
            where = " or ".join(f"variant={v!r}" for v in owners) or "no variant"
            raise ConfigError(f"options {given} apply to {where} only; variant={self.variant!r} does not take "
                              f"them (dwconv and residual keep the MLP's own activation)")
        if not is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0 \
                or self.kernel_size > MAX_KERNEL:
            raise ConfigError(f"kernel_size must be an odd int from 1 to {MAX_KERNEL} (3, 5, 7, ...); "
                              f"got {self.kernel_size!r}")
        variant.validate(self)
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    @property
    def preserves_function(self) -> bool:
        """Whether a conversion with this config computes exactly what the original model computed."""
        return get_variant(self.variant).preserves_function

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LocalifyConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown LocalifyConfig field(s) {unknown}")
        return cls(**d)
