"""Output checks: does a converted model still compute what its original computes?

One definition of "the same outputs", used by ``localify convert`` / ``verify``, the registry sweep and the
tests: the largest absolute difference over every floating-point output tensor, against the output scale
(``max |original|``); a check passes when ``max |diff| <= tol * max(1, scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._splice import localify_modules
from ._trace import ExampleInputs, make_example_inputs
from .errors import ExampleInputError

__all__ = ["TOLERANCE", "OutputCheck", "max_difference", "compare_outputs", "example_inputs", "base_state_dict"]

# a function-preserving conversion may differ by float rounding only (the grid tokens go through fc1/fc2 in
# their own GEMM)
TOLERANCE = 1e-4


@dataclass(frozen=True)
class OutputCheck:
    """The result of :func:`compare_outputs`."""

    max_abs_diff: float  # inf when the outputs do not have the same structure and shapes
    output_scale: float  # max |output| of the reference
    tolerance: float
    input_size: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance * max(1.0, self.output_scale)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def max_difference(reference: Any, other: Any) -> tuple[float, float]:
    """(max |reference - other| over every output tensor, max |reference|); the difference is inf when the
    outputs do not have the same number of tensors and shapes. Outputs may be tensors, tuples, dicts or
    Hugging Face ``ModelOutput`` objects."""
    ta, tb = _tensors(reference), _tensors(other)
    scale = max((t.detach().abs().max().item() for t in ta if t.numel() and t.is_floating_point()), default=0.0)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf"), scale
    diff = max(((x.detach().double() - y.detach().double()).abs().max().item() for x, y in zip(ta, tb)
                if x.numel() and x.is_floating_point()), default=0.0)
    return diff, scale


def example_inputs(model: nn.Module, size: tuple[int, int] | None = None, example: Any = None, *,
                   channels: int | None = None) -> ExampleInputs:
    """The inputs localify traces ``model`` with: batch 2, built from its config unless ``example`` (a tensor,
    tuple, dict or :class:`ExampleInputs`) is given, at image ``size`` when given (asking models that take
    ``interpolate_pos_encoding`` for it), with ``channels`` image channels when given."""
    try:
        ex = make_example_inputs(model, example, size=size, channels=channels)
    except ExampleInputError:
        if size is None or example is not None:
            raise
        ex = make_example_inputs(model, torch.randn(2, channels or 3, *size))
    return ex if size is None else ex.at_size(model, tuple(size))


def compare_outputs(original: nn.Module, converted: nn.Module, inputs: ExampleInputs | None = None, *,
                    size: tuple[int, int] | None = None, tol: float = TOLERANCE) -> OutputCheck:
    """Run both models (no autograd) on the same inputs and compare their outputs.

    ``inputs`` default to :func:`example_inputs` of ``original`` at ``size``.

    Example::

        >>> check = localify.compare_outputs(original, converted)
        >>> check.ok, check.max_abs_diff
    """
    ex = inputs if inputs is not None else example_inputs(original, size)
    with torch.no_grad():
        diff, scale = max_difference(original(*ex.args, **ex.kwargs), converted(*ex.args, **ex.kwargs))
    img = ex.image
    hw = (int(img.shape[-2]), int(img.shape[-1])) if img is not None else None
    return OutputCheck(diff, scale, tol, hw)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict of the unconverted model inside a converted one: each spliced module contributes its
    base layer's tensors under the module's own name (its locality additions are dropped). None when a spliced
    module keeps no base layer (``localvit`` replaces the MLP)."""
    state = dict(model.state_dict())
    for name, mod in localify_modules(model):
        base = mod.get_base_layer()
        if base is None:
            return None
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in base.state_dict().items()})
    return state
