"""Run-time token grids: where each converted block reads its (H, W), and how that place is found.

A converted block needs the (H, W) of its token grid on every call, and that grid follows the actual input
(other resolutions, non-square images, dynamic sizes). At conversion localify finds, for each block, a
module boundary in the original model that carries the grid: a feature map (B, C, H, W) or (B, H, W, C),
two int arguments (H, W) such as Hugging Face Swin's ``input_dimensions``, or the input of an ``nn.Unfold``.
A :class:`GridSource` hook on that module records the grid when the module runs; the converted blocks
that follow read it. Nothing here computes ``sqrt(N)``, so exported graphs keep dynamic shapes.

:func:`find_grid_source` picks that module boundary at conversion: among the module calls recorded while
tracing, the last ones before the block whose tensors (or int pairs) carry the grid, validated by running the
original model once more at a second input size.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ._trace import CallRecord

__all__ = ["GridSpec", "GridSource", "key_to_json", "get_by_key", "unfold_grid", "find_grid_source", "watch_grids"]

Key = tuple[tuple[str, Any], ...]


def unfold_grid(spatial: tuple[Any, Any], geometry: tuple) -> tuple[Any, Any]:
    """The (rows, cols) of patch positions an unfold (im2col) of a ``spatial`` map produces.

    ``geometry`` is ``(kernel, dilation, padding, stride)``, each an (h, w) pair, as ``nn.Unfold`` takes them."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = geometry
    h, w = spatial
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


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
        return (h, w) if self.unfold is None else unfold_grid((h, w), self.unfold)


def _tracing() -> bool:
    """Under torch.compile / torch.export (strict and non-strict) / TorchScript tracing.

    ``torch.compiler.is_compiling()`` comes first: dynamo folds it to True and never looks further, and it is
    what non-strict export sets; ``torch._C._is_tracing()`` is ``torch.jit.is_tracing()`` without its two
    Python calls (this runs on every block call).
    """
    return torch.compiler.is_compiling() or torch._C._is_tracing()


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (activation checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1


class _Frames:
    """Per-thread grids of the calls of one model in flight: a stack of frames, one per call of the model.

    Registered once per model (shared by all of its grid sources): a forward pre-hook on the model pushes a
    frame, a forward hook (``always_call``, so exceptions too) pops it. A source records its grid into the
    top frame of the calling thread; a converted block reads it from there. Nothing is shared between
    threads and no lock is taken. The bottom frame of each thread holds the grids of calls that do not go
    through the model's ``__call__`` (``forward_features``, a wrapper calling ``model.forward``); the next
    outermost call of the model clears it.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._handles: list = []
        self.sources: set[GridSource] = set()  # the attached sources (the copies, in a copy)

    # threading.local can be neither deep-copied nor pickled: a copy starts with no call in flight
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> _Frames:
        new = _Frames.__new__(_Frames)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    @staticmethod
    def of(model: nn.Module) -> _Frames:
        """The frames of ``model``: found among its forward pre-hooks, or registered now."""
        for hook in model._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, _Frames):
                return owner
        frames = _Frames()
        frames._handles = [model.register_forward_pre_hook(frames._push),
                           model.register_forward_hook(frames._pop, always_call=True)]
        return frames

    def release(self, source: GridSource) -> None:
        self.sources.discard(source)
        if not self.sources:
            for h in self._handles:
                h.remove()
            self._handles = []

    def stack(self) -> list[dict]:
        """This thread's frames, bottom first (created on first use)."""
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = stack = [{}]
            return stack

    def _push(self, module: nn.Module, args: tuple) -> None:
        if not _tracing():
            stack = self.stack()
            if len(stack) == 1:  # an outermost call: grids recorded outside earlier calls are stale now
                stack[0].clear()
            stack.append({})

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not _tracing():
            stack = self.stack()
            if len(stack) > 1:
                stack.pop()


class GridSource:
    """The token grid of one source module: a hook records it on every call, converted blocks read it.

    Eager calls keep their grids per thread and per call of the model (see :class:`_Frames`), so one model
    may serve several threads at once and may be called inside another model's forward. Under
    torch.compile / torch.export / tracing the grid is a plain attribute: those trace the hooks into the
    graph, where the grid is an expression of the input shape. :attr:`hw` reads the last grid recorded in any
    thread (for inspection); setting it pins a grid for blocks called on their own, outside a model call.
    """

    def __init__(self, spec: GridSpec) -> None:
        self.spec = spec
        self._last: tuple[Any, Any] | None = spec.static  # last recorded grid, any thread; read when tracing
        self._pinned: tuple[Any, Any] | None = spec.static  # set by hand (``hw = ...``) or a fixed grid
        self._handle = None
        self._frames: _Frames | None = None

    @property
    def hw(self) -> tuple[Any, Any] | None:
        """The last grid recorded (in any thread), or the pinned one; assign ``(h, w)`` to pin a grid."""
        return self._last

    @hw.setter
    def hw(self, value: tuple[Any, Any] | None) -> None:
        self._pinned = self._last = value

    def attach(self, model: nn.Module) -> None:
        """Hook the source module of ``model`` (and, once per model, the model); a no-op if attached."""
        if self.spec.kind in ("static", "bhwc") or self._handle is not None:
            return
        mod = model.get_submodule(self.spec.module)
        frames = _Frames.of(model)
        if self.spec.phase == "input":
            self._handle = mod.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self._handle = mod.register_forward_hook(self._post)
        frames.sources.add(self)
        self._frames = frames

    def detach(self) -> None:
        """Remove the hooks (the model's own hooks go with the last source of the model)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._frames is not None:
            self._frames.release(self)
            self._frames = None

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._record(self.spec.read((args, kwargs)))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._record(self.spec.read(output))

    def _record(self, hw: tuple[Any, Any]) -> None:
        self._last = hw
        if self._frames is not None and not _tracing():
            self._frames.stack()[-1][self] = hw

    def get(self) -> tuple[Any, Any]:
        """The (H, W) grid of the current call; ``RuntimeError`` when its source did not run in this call."""
        frames = self._frames
        if frames is None or _tracing():
            hw = self._last
        else:
            hw = frames.stack()[-1].get(self)
            if hw is None:
                hw = self._pinned
            if hw is None and _in_backward():  # activation checkpointing: a block recomputed in backward
                hw = self._last
        if hw is None:
            raise RuntimeError(
                f"localify: the token grid of this block was never set for this call: its source "
                f"({self.spec.describe()}) did not run before it in this call of the model. Call the whole "
                f"model, not the block alone."
            )
        return hw


def check_tokens(n: Any, hw: tuple[Any, Any], prefix: int, suffix: int) -> None:
    """Fail clearly (and export-friendly) when the token count does not fit the grid."""
    torch._check(
        hw[0] * hw[1] + prefix + suffix == n,
        lambda: f"localify: a block got {n} tokens but its grid is {hw[0]}x{hw[1]} with {prefix} prefix and "
        f"{suffix} suffix tokens",
    )


@contextlib.contextmanager
def watch_grids(model: nn.Module, specs: list[GridSpec]) -> Iterator[dict[GridSpec, tuple[Any, Any]]]:
    """Record, while the block runs, the grid each of ``specs`` reads (static and BHWC specs are skipped)."""
    seen: dict[GridSpec, tuple[Any, Any]] = {}
    handles = []
    for spec in specs:
        if spec.kind in ("static", "bhwc"):
            continue
        mod = model.get_submodule(spec.module)
        if spec.phase == "input":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, k, _s=spec: seen.__setitem__(_s, _s.read((a, k))), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, _s=spec: seen.__setitem__(_s, _s.read(o))))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------------- discovery
def second_size(size: tuple[int, int] | None, grids: list[tuple[int, int]]) -> tuple[int, int] | None:
    """An input size other than ``size`` at which every grid changes in both directions (non-square)."""
    if size is None or not grids:
        return None
    rh = max(math.ceil(size[0] / g[0]) for g in grids)
    rw = max(math.ceil(size[1] / g[1]) for g in grids)
    return (size[0] + 2 * rh, size[1] + rw)


def _nth_input(calls: list[CallRecord], path: str, k: int) -> CallRecord | None:
    seen = 0
    for rec in calls:
        if rec.path == path and rec.phase == "input":
            if seen == k:
                return rec
            seen += 1
    return None


def _candidates(calls: list[CallRecord], batch: int, need: tuple[int, int], unfold: tuple | None) -> list[GridSpec]:
    """Module boundaries, latest first, whose tensors or int pairs hold the ``need`` (rows, cols)."""
    out: list[GridSpec] = []
    for rec in reversed(calls):
        for kp, shp in rec.tensors:
            if len(shp) != 4 or shp[0] != batch:
                continue
            for dims in ((2, 3), (1, 2)):
                if (shp[dims[0]], shp[dims[1]]) == need:
                    out.append(GridSpec(rec.path, rec.phase, key_to_json(kp), "tensor", dims, None, unfold))
        for (k1, v1), (k2, v2) in zip(rec.ints, rec.ints[1:]):
            if (v1, v2) == need:
                out.append(GridSpec(rec.path, rec.phase, key_to_json(k1), "ints", (0, 1), key_to_json(k2), unfold))
        if len(out) >= 8:
            break
    return list(dict.fromkeys(out))


def _recorded_grid(spec: GridSpec, rec: CallRecord) -> tuple[int, int] | None:
    """What ``spec`` would read from a recorded call (shapes and ints only)."""
    if spec.kind == "ints":
        vals = {key_to_json(k): v for k, v in rec.ints}
        if spec.key not in vals or spec.key2 not in vals:
            return None
        hw = vals[spec.key], vals[spec.key2]
    else:
        shp = {key_to_json(k): s for k, s in rec.tensors}.get(spec.key)
        if shp is None or len(shp) <= max(spec.dims):
            return None
        hw = shp[spec.dims[0]], shp[spec.dims[1]]
    return hw if spec.unfold is None else unfold_grid(hw, spec.unfold)


def _validates(spec: GridSpec, fc1: str, extra: int, probe: list[CallRecord]) -> bool:
    """Whether ``spec``, read in the probe run, accounts for the tokens the block saw there."""
    rec = _nth_input(probe, fc1, 0)
    if rec is None or not rec.tensors or len(rec.tensors[0][1]) < 3:
        return False
    n = rec.tensors[0][1][1]
    src = None
    for r in probe:
        if r.order >= rec.order:
            break
        if r.path == spec.module and r.phase == spec.phase:
            src = r
    hw = _recorded_grid(spec, src) if src is not None else None
    return hw is not None and hw[0] * hw[1] + extra == n


def find_grid_source(calls: list[CallRecord], batch: int, fc1: str, grid: tuple[int, int],
                     spatial: tuple[int, int], unfold: tuple | None, extra: int,
                     probe: list[CallRecord] | None, image: tuple[Key, tuple[int, int]] | None = None
                     ) -> GridSpec | str:
    """Where the block whose first projection is ``fc1`` reads its grid at run time, or why nowhere.

    ``calls`` were recorded while tracing, ``probe`` (None if the model refuses another size) in a run at a
    second size; ``extra`` is the number of prefix + suffix tokens. A model that runs at one size only gets a
    fixed grid. ``image`` (the image's key path in the model's ``(args, kwargs)`` and the grid's stride in
    pixels, from the grid proof) adds the model's own input as a last candidate: the grid as the image size
    divided by the stride, kept only if it predicts the token count at the second size too."""
    rec = _nth_input(calls, fc1, 0)  # a module shared by several blocks is located by its first call
    cands = _candidates(calls[: rec.order if rec is not None else len(calls)], batch, spatial, unfold)
    if image is not None:
        key, (sy, sx) = image
        cands.append(GridSpec("", "input", key, "tensor", (2, 3), None, ((sy, sx), (1, 1), (0, 0), (sy, sx))))
    cands = [c for c in cands if _validates(c, fc1, extra, calls)]  # it must hold at the traced size too
    if probe is None:
        return cands[0] if cands else GridSpec(kind="static", static=grid)
    chosen = next((c for c in cands if _validates(c, fc1, extra, probe)), None)
    if chosen is not None:
        return chosen
    if not cands:
        return (f"the {grid[0]}x{grid[1]} grid changes with the input size, but no module input or output "
                f"carries it at run time")
    return "no module input or output carries this block's grid consistently across input sizes"
