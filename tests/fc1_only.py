"""The fc1-only conversion of a model, as a save without ``per_token`` replays it: fc1 wrapped in LocalityLinear,
the MLP modules kept (no LocalityMLP). The reference the LocalityMLP tests compare the default conversion with."""

from __future__ import annotations

import dataclasses

from torch import nn

from localify._splice import LocalifyState, splice


def splice_fc1_only(model: nn.Module, state: LocalifyState) -> nn.Module:
    """Replay the records of ``state`` (a conversion of a copy of ``model``) on ``model`` with ``per_token``
    false; returns ``model``."""
    splice(model, state.config, [dataclasses.replace(r, per_token=False) for r in state.sites])
    return model
