"""The one splice path: apply a config and a list of site records to a model.

``localify()`` makes the records from a plan; ``load()`` reads them from a recipe; both call :func:`splice`.
Every new module is built before the model is touched, so a failure leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._grid import GridSource, GridSpec
from ._plan import SiteRecord
from ._trace import kept_modes
from ._variants import LocalifyConfig, get_variant
from .layers import LocalifyModule

__all__ = ["LocalifyState", "get_state", "splice", "set_submodule", "localify_modules",
           "locality_keys"]

STATE_ATTR = "_localify_state"


@dataclass
class LocalifyState:
    """Bookkeeping attached to a converted model (not a module, not in the state dict)."""

    config: LocalifyConfig
    sites: list[SiteRecord] = field(default_factory=list)
    sources: dict[GridSpec, GridSource] = field(default_factory=dict)
    fused: bool = False
    plan: Any = field(default=None, repr=False)  # the Plan of the last conversion, statuses updated

    def __getstate__(self) -> dict:
        """Pickling and deepcopy leave out the plan (a report of this process, not part of the model)."""
        return {**self.__dict__, "plan": None}


def get_state(model: nn.Module) -> LocalifyState | None:
    return getattr(model, STATE_ATTR, None)


def localify_modules(model: nn.Module) -> list[tuple[str, LocalifyModule]]:
    """Every module localify spliced into ``model``, outermost first."""
    out: list[tuple[str, LocalifyModule]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, LocalifyModule) and not any(name.startswith(p + ".") for p, _ in out):
            out.append((name, mod))
    return out


def locality_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the parameters and buffers localify added (not the wrapped original projections)."""
    return [f"{name}.{k}" for name, mod in localify_modules(model) for k in mod.locality_state_keys()]


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def splice(model: nn.Module, config: LocalifyConfig, records: list[SiteRecord],
           prepare: Any = None) -> LocalifyState:
    """Build the modules of ``records`` for ``config`` and swap them into ``model``; return its state.

    A model converted before keeps its state (same config) and gains the new sites. ``prepare`` runs after
    every module was built and before anything changes (a last check that may still raise)."""
    variant = get_variant(config.variant)
    state = get_state(model) or LocalifyState(config)
    pending: dict[GridSpec, GridSource] = {}
    built: list[tuple[str, nn.Module]] = []
    for rec in records:
        spec = GridSpec.from_dict(rec.grid)
        src = state.sources.get(spec) or pending.setdefault(spec, GridSource(spec))
        built.extend(variant.build(model, rec, config, src))
    if prepare is not None:
        prepare()
    # nothing below can fail on valid records
    # modules of the model that a new one holds (its base layer, shared children) keep their own modes
    with kept_modes(model):
        for path, new in built:
            new.train(model.get_submodule(path).training)  # the mode of what it replaces
            set_submodule(model, path, new)
    for spec, src in pending.items():
        src.attach(model)
        state.sources[spec] = src
    state.sites.extend(records)
    if get_state(model) is None:
        object.__setattr__(model, STATE_ATTR, state)
    return state
