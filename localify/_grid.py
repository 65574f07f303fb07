"""Run-time token grids.

A converted block needs the (H, W) of its token grid on every call, and that grid follows the actual input
(other resolutions, non-square images, dynamic sizes). At conversion localify finds, for each block, a
module boundary in the original model that carries the grid: a feature map (B, C, H, W) or (B, H, W, C),
two int arguments (H, W) such as Hugging Face Swin's ``input_dimensions``, or the input of an ``nn.Unfold``.
A :class:`GridSource` hook on that module records the grid when the module runs; the converted blocks
that follow read it. Nothing here computes ``sqrt(N)``, so exported graphs keep dynamic shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["GridSpec", "GridSource", "key_to_json", "get_by_key"]

Key = tuple[tuple[str, Any], ...]


def key_to_json(kp: tuple) -> Key:
    """A pytree key path as plain tuples: ``(("seq", 0), ("map", "pixel_values"), ("attr", "x"))``."""
    out = []
    for k in kp:
        if isinstance(k, pytree.SequenceKey):
            out.append(("seq", k.idx))
        elif isinstance(k, pytree.MappingKey):
            out.append(("map", k.key))
        elif isinstance(k, pytree.GetAttrKey):
            out.append(("attr", k.name))
        else:
            out.append(("map", getattr(k, "key", str(k))))
    return tuple(out)


def get_by_key(obj: Any, key: Key) -> Any:
    for kind, k in key:
        if kind == "attr":
            obj = getattr(obj, k)
        else:
            obj = obj[k]
    return obj


@dataclass(frozen=True)
class GridSpec:
    """Where a block's token grid is read at run time (JSON-serialisable, part of the saved recipe)."""

    module: str = ""  # module path of the source ("" is the model itself)
    phase: str = "output"  # "input" (forward pre-hook) or "output" (forward hook)
    key: Key = ()  # pytree key path of the tensor (or first int) inside (args, kwargs) / the output
    kind: str = "tensor"  # "tensor": two dims of a tensor; "ints": two int values; "static": a fixed grid;
    #                       "bhwc": the block's own (B, H, W, C) input is the grid (no source needed)
    dims: tuple[int, int] = (2, 3)
    key2: Key | None = None  # key path of the second int for kind "ints"
    unfold: tuple | None = None  # (kernel, dilation, padding, stride): the grid is an unfold of this size
    static: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GridSpec:
        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: tup(v) for k, v in d.items()})

    def describe(self) -> str:
        if self.kind == "static":
            return f"fixed {self.static[0]}x{self.static[1]}"
        if self.kind == "bhwc":
            return "the block's (B, H, W, C) input"
        where = self.module or "<model>"
        what = "ints" if self.kind == "ints" else f"dims {self.dims}"
        extra = " (unfold)" if self.unfold else ""
        return f"{where} {self.phase} {what}{extra}"

    def read(self, obj: Any) -> tuple[Any, Any]:
        if self.kind == "ints":
            h, w = get_by_key(obj, self.key), get_by_key(obj, self.key2)
        else:
            t = get_by_key(obj, self.key)
            h, w = t.shape[self.dims[0]], t.shape[self.dims[1]]
        if self.unfold is not None:
            (kh, kw), (dh, dw), (ph, pw), (sh, sw) = self.unfold
            h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return h, w


class GridSource:
    """Holds the current token grid of one source; installed as a hook on the source module."""

    def __init__(self, spec: GridSpec) -> None:
        self.spec = spec
        self.hw: tuple[Any, Any] | None = spec.static
        self._handle = None

    def attach(self, model: nn.Module) -> None:
        if self.spec.kind in ("static", "bhwc") or self._handle is not None:
            return
        mod = model.get_submodule(self.spec.module)
        if self.spec.phase == "input":
            self._handle = mod.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self._handle = mod.register_forward_hook(self._post)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.hw = self.spec.read((args, kwargs))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.hw = self.spec.read(output)

    def get(self) -> tuple[Any, Any]:
        hw = self.hw
        if hw is None:
            raise RuntimeError(
                f"localify: the token grid of this block was never set; its source "
                f"({self.spec.describe()}) did not run before it. Call the whole model, not the block alone."
            )
        return hw


def check_tokens(n: Any, hw: tuple[Any, Any], prefix: int, suffix: int) -> None:
    """Fail clearly (and export-friendly) when the token count does not fit the grid."""
    torch._check(
        hw[0] * hw[1] + prefix + suffix == n,
        lambda: f"localify: a block got {n} tokens but its grid is {hw[0]}x{hw[1]} with {prefix} prefix and "
        f"{suffix} suffix tokens",
    )
