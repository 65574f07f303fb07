"""``localify`` and ``fuse``: convert the MLPs of a model in place (checking everything first), and deploy it."""

from __future__ import annotations

import warnings
from dataclasses import fields, replace
from typing import Any

from torch import nn

from ._plan import LOCALIFIED, UNSUPPORTED, MLPSite, Plan, build_plan
from ._sources import get_source, infer_timm_source, set_source
from ._splice import get_state, localify_modules, set_submodule, splice
from ._variants import LocalifyConfig, get_variant
from .errors import AlreadyLocalifiedError, ConfigError, FuseError, NotLocalifiableError

__all__ = ["localify", "fuse", "conversion_plan"]

_UNSET: Any = object()


def localify(
    model: nn.Module,
    layers: Any = _UNSET,
    *,
    variant: str = _UNSET,
    kernel_size: int = _UNSET,
    act: str = _UNSET,
    attention: str | None = _UNSET,
    se_hidden: int | None = _UNSET,
    se_reduction: int | None = _UNSET,
    eca_kernel: int | None = _UNSET,
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

    The options can also be given as one ``config`` (a :class:`LocalifyConfig`), not both. A ``plan`` from
    :func:`localify.find_mlps` saves tracing again; it is not changed (the plan of the conversion, with the
    converted sites marked, is :func:`localify.conversion_plan`).

    Example::

        >>> model = timm.create_model("deit_tiny_patch16_224")
        >>> model = localify.localify(model, layers="1-4")
    """
    options = {"layers": layers, "variant": variant, "kernel_size": kernel_size, "act": act,
               "attention": attention, "se_hidden": se_hidden, "se_reduction": se_reduction,
               "eca_kernel": eca_kernel}
    given = {k: v for k, v in options.items() if v is not _UNSET}
    if config is not None and given:
        raise ConfigError(f"pass either config= or the options {sorted(given)}, not both (config.layers, "
                          f"config.variant, ... hold them)")
    if config is None:
        defaults = {f.name: f.default for f in fields(LocalifyConfig)}
        config = LocalifyConfig(**{**defaults, **given})
    prev = get_state(model)
    if prev is not None and prev.fused:
        raise AlreadyLocalifiedError("this model was fused for deployment; convert the unfused model instead")
    if prev is not None and {**prev.config.to_dict(), "layers": None} != {**config.to_dict(), "layers": None}:
        raise AlreadyLocalifiedError(
            f"this model was converted with other options ({prev.config.to_dict()}); convert more blocks with "
            f"the same variant and options, or start from the base model")
    plan = (plan or build_plan(model, example_inputs)).select(config.layers)  # a copy: the caller's is kept
    targets = _targets(plan, config)
    records = [get_variant(config.variant).record(model, s) for s in targets]  # before any change
    source = None if get_source(model) is not None else infer_timm_source(model)
    state = splice(model, config, records)
    if source is not None:
        set_source(model, source)
    for site in targets:
        site.status, site.reason = LOCALIFIED, "converted"
    state.plan = replace(plan, trace=None)  # the statuses; not the graph (memory, pickling)
    return model


def conversion_plan(model: nn.Module) -> Plan | None:
    """The plan of the last :func:`localify` call on ``model``, its converted sites marked ``localified``
    (None for a model that was not converted in this process, e.g. one from :func:`localify.load`)."""
    state = get_state(model)
    return None if state is None else state.plan


def _targets(plan: Plan, config: LocalifyConfig) -> list[MLPSite]:
    """The selected sites the config's variant converts; marks the others it refuses (in ``plan``)."""
    variant = get_variant(config.variant)
    for s in plan.sites:
        why = variant.refuse(s, config) if s.convertible else None
        why = why or (_kernel_too_large(s, config.kernel_size) if s.convertible else None)
        if why:
            s.status, s.reason = UNSUPPORTED, why
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


def _kernel_too_large(site: MLPSite, kernel_size: int) -> str | None:
    """A kernel whose outer taps lie outside the grid from every cell (k // 2 >= the grid's longer side)."""
    grid = site.tokens.grid if site.tokens is not None else None
    top = 2 * max(grid) - 1 if grid is not None else kernel_size
    if kernel_size <= top:
        return None
    return (f"kernel_size {kernel_size} is larger than this block's {grid[0]}x{grid[1]} grid (at the traced size) "
            f"allows: its outer taps would only ever see padding; use a kernel of at most {top}")


def fuse(model: nn.Module) -> nn.Module:
    """Fold the converted blocks of ``model`` for inference, in place, and return it.

    Every BatchNorm of a ``localvit`` block is folded into the conv or linear before it, and every residual
    depth-wise branch (``h + dw(h)``) is merged into its kernel (centre tap + 1): the deployed blocks are
    conv-only and give the same outputs in eval mode. Fusing twice changes nothing. The model must be in
    eval mode (BatchNorm folds its running statistics); a model in train mode raises :class:`FuseError`.
    ``timm.utils.reparameterize_model(model)`` does the same (it calls each block's ``fuse()``).

    Example::

        >>> deploy = localify.fuse(model.eval())
    """
    targets = localify_modules(model)
    if not targets:
        raise FuseError(f"{type(model).__name__} has no localify blocks to fuse; convert it with localify() first")
    training = [n for n, m in targets if any(mm.training for mm in m.modules())]
    if training:
        raise FuseError(
            f"cannot fuse while {len(training)} converted block(s) are in train mode (first: {training[0]}): "
            f"BatchNorm would fold batch statistics. Call model.eval() first."
        )
    new = [(n, m.fuse()) for n, m in targets]
    for name, mod in new:
        set_submodule(model, name, mod.eval())
    state = get_state(model)
    if state is not None:
        state.fused = True
    return model
