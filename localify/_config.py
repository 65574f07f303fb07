"""``LocalifyConfig``: the options of a conversion, validated once, saved with the model and replayed on load."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ._variants import get_variant, is_int, variant_names
from .errors import ConfigError

__all__ = ["LocalifyConfig"]

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
