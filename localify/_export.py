"""ONNX export of converted models: torch's ONNX exporter (``dynamo=True``), dynamic batch and grid, checked.

:func:`export_onnx` exports a model in eval mode with the exporter built on ``torch.export``. By default it
exports a fused copy (BatchNorms of ``localvit`` blocks folded, residual kernels merged; the caller's model
is not changed), makes the batch dynamic, and makes the image height and width dynamic as multiples of the
patch (``H = 16 * grid_h``) when the model accepts other input sizes. The token grid of every converted
block is read from the patch embedding's output shape at run time, so nothing pins the graph to the traced
size. The written file is checked against PyTorch with onnxruntime when it is installed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ._convert import fuse as fuse_model
from ._grid import watch_grids
from ._paths import check_output_path
from ._splice import get_state, localify_modules
from ._trace import ExampleInputs, eval_mode, make_example_inputs
from .errors import LocalifyError, first_line

__all__ = ["export_onnx", "check_export_path", "OnnxExport", "ExportError", "dynamic_shapes_for"]


class ExportError(LocalifyError, RuntimeError):
    """A model could not be exported to ONNX, or the exported file does not match PyTorch."""


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    dynamic_hw: bool
    patch: tuple[int, int] | None = None  # H and W are multiples of these when dynamic_hw
    fused: bool = False  # a fused copy was exported
    max_abs_err: float | None = None  # largest |onnxruntime - PyTorch| over the checked inputs; None if unchecked
    checked_shapes: list[tuple[int, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why H/W stayed static, and the like

    def __str__(self) -> str:
        dims = "static shapes"
        if self.dynamic_batch:
            dims = "dynamic batch"
            if self.dynamic_hw:
                dims += f", dynamic H/W (multiples of {self.patch[0]}x{self.patch[1]})"
        check = ("not checked (onnxruntime not installed)" if self.max_abs_err is None else
                 f"onnxruntime matches PyTorch (max abs err {self.max_abs_err:.2e} over "
                 f"{len(self.checked_shapes)} input shape(s))")
        lines = [f"{self.path}: inputs {', '.join(self.input_names)}; {dims}; {check}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _needs_fuse(model: nn.Module) -> bool:
    return any(m.needs_fuse for _, m in localify_modules(model))


def _patch_size(model: nn.Module, example: ExampleInputs) -> tuple[tuple[int, int] | None, str | None]:
    """Pixels per grid cell of the coarsest run-time grid source of a converted model (None + why if unknown)."""
    state = get_state(model)
    img = example.image
    if state is None or not state.sources:
        return None, "not converted by localify: the patch size is unknown, so H/W stay static"
    if img is None:
        return None, "no image tensor (B, C, H, W) in the inputs: H/W stay static"
    h, w = img.shape[-2:]
    with torch.no_grad(), watch_grids(model, list(state.sources)) as grids:
        example_call(model, example)
    ph = pw = 1
    for hw in grids.values():
        gh, gw = int(hw[0]), int(hw[1])
        if gh < 1 or gw < 1:
            continue
        ph, pw = max(ph, math.ceil(h / gh)), max(pw, math.ceil(w / gw))
    if ph == 1 and pw == 1:
        return None, "no run-time grid source recorded a grid: H/W stay static"
    if h % ph or w % pw or h // ph < 2 or w // pw < 2:
        return None, (f"the example image {h}x{w} is not at least 2x2 patches of {ph}x{pw}: H/W stay static")
    return (ph, pw), None


def example_call(model: nn.Module, example: ExampleInputs) -> Any:
    return model(*example.args, **example.kwargs)


def dynamic_shapes_for(model: nn.Module, example: ExampleInputs, patch: tuple[int, int] | None,
                       batch: bool = True) -> Any:
    """``dynamic_shapes`` for ``torch.export`` / ``torch.onnx.export``: the batch of every tensor input and, with
    ``patch``, the image's H and W as ``patch * Dim``; keyed by the forward's parameter names when possible."""
    from torch.export import Dim

    img = example.image
    b = img.shape[0] if img is not None else None
    bdim = Dim("batch", min=1) if batch else None
    hw = (patch[0] * Dim("grid_h", min=2), patch[1] * Dim("grid_w", min=2)) if patch else None

    def spec(kp: tuple, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return None
        d = {}
        if bdim is not None and v.dim() > 0 and v.shape[0] == b:
            d[0] = bdim
        if hw is not None and kp == example.image_key:
            d[v.dim() - 2], d[v.dim() - 1] = hw
        return d or None

    leaves, tree = pytree.tree_flatten_with_path((example.args, example.kwargs))
    args, kwargs = pytree.tree_unflatten([spec(kp, v) for kp, v in leaves], tree)
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
        var = {n for n, p in sig.parameters.items() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not var & set(bound.arguments):
            return dict(bound.arguments)
    except (TypeError, ValueError):
        pass
    return (*args, *kwargs.values())


def _tensor_names(example: ExampleInputs, model: nn.Module) -> list[str]:
    """Names of the tensor inputs in the order the exporter lists them (positional args, then kwargs)."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters]
    except (TypeError, ValueError):
        params = []
    names = []
    for i, a in enumerate(example.args):
        if isinstance(a, torch.Tensor):
            names.append("pixel_values" if (0, i) == _pos(example.image_key) else
                         (params[i] if i < len(params) else f"input_{i}"))
    names += [k for k, v in example.kwargs.items() if isinstance(v, torch.Tensor)]
    return names if len(set(names)) == len(names) else [f"input_{i}" for i in range(len(names))]


def _pos(key: tuple | None) -> tuple | None:
    if key is None or len(key) != 2:
        return None
    return (getattr(key[0], "idx", None), getattr(key[1], "idx", None))


def _output_tensors(out: Any) -> tuple[list[str] | None, list[torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    if isinstance(out, dict):  # Hugging Face ModelOutput keeps only the fields that are set
        items = [(k, v) for k, v in out.items() if v is not None]
        if all(isinstance(v, torch.Tensor) for _, v in items):
            return [k for k, _ in items], [v for _, v in items]
    if isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in out):
        return [f"output_{i}" for i in range(len(out))], list(out)
    leaves = [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]
    return None, leaves


def check_export_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """The rule :func:`export_onnx` applies to its output (a ``.onnx`` file in a writable directory, not
    replacing one without ``force``), checked without exporting."""
    return check_output_path(path, suffixes=(".onnx",), force=force, error=ExportError)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any = None,
    dynamic: bool | str = True,
    *,
    fuse: bool = True,
    verify: bool | None = None,
    opset: int | None = None,
    force: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> OnnxExport:
    """Export ``model`` (eval mode) to an ONNX file with torch's ``torch.export``-based exporter.

    Args:
        model: a model (converted by localify or not); it is not changed (``fuse`` works on a copy, the
            train/eval flags are restored).
        path: the ``.onnx`` file to write (atomically; weights beside it in ``<path>.data`` only above 2 GB).
        example_inputs: as for :func:`localify.localify`: a tensor, a tuple of arguments, a dict of keyword
            arguments; by default a batch of 2 at the model's configured image size.
        dynamic: ``True`` (or ``"auto"``): dynamic batch, and dynamic H and W as multiples of the patch when the
            model accepts another input size (a Hugging Face model that takes ``interpolate_pos_encoding`` is
            exported with it set to True); ``"batch"``: dynamic batch only; ``False``: the example's shapes.
        fuse: export a fused copy (BatchNorms folded, residual kernels merged) when the model has unfused
            blocks. The outputs are the same in eval mode; the graph is smaller.
        verify: run the file with onnxruntime and compare with PyTorch at the example input and, when
            dynamic, at another batch and size; ``None`` (default) checks when onnxruntime is installed.
        opset: ONNX opset version (the exporter's default if None).
        force: overwrite an existing file.
        atol, rtol: tolerances of the check (``|ort - torch| <= atol + rtol * max|torch|``).

    Returns:
        :class:`OnnxExport`: path, input and output names, which axes are dynamic, the patch multiple, the
        largest difference found by the check, and notes (for example why H/W stayed static).

    Raises:
        ExportError: the output exists (without ``force``) or cannot be written, the ONNX exporter's
            dependencies (``onnx``, ``onnxscript``; ``pip install 'localify[export]'``) are missing, the
            exporter failed, or onnxruntime disagrees with PyTorch.

    Example::

        >>> info = localify.export_onnx(localify.fuse(model.eval()), "model.onnx")
        >>> print(info)   # model.onnx: inputs pixel_values; dynamic batch, dynamic H/W (multiples of 16x16); ...
    """
    if dynamic not in (True, False, "auto", "batch"):
        raise ExportError(f"dynamic={dynamic!r}: choose True ('auto'), 'batch' or False")
    path = check_export_path(path, force=force)
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            raise ExportError(
                f"the ONNX exporter needs the {mod!r} package; install it with pip install 'localify[export]' "
                f"(onnx, onnxscript, onnxruntime)"
            ) from None
    if verify is None:
        try:
            import onnxruntime  # noqa: F401

            verify = True
        except ImportError:
            verify = False

    notes: list[str] = []
    fused = False
    if fuse and _needs_fuse(model):
        target = copy.deepcopy(model).eval()
        fuse_model(target)
        fused = True
    else:
        target = model

    with eval_mode(target), torch.no_grad():
        example = make_example_inputs(target, example_inputs)
        if dynamic is not False and example.image is not None and example.image.shape[0] == 1:
            # torch.export specialises a batch of 1 (the graph would take one sample only): trace with two
            example = example.with_batch(2)
        patch = None
        if dynamic in (True, "auto"):
            plain = example
            example = example.any_size(target)
            patch, why = _patch_size(target, example)
            if patch is not None:
                # trace at a non-square size other than the model's own: code such as Hugging Face's
                # `if num_patches == num_positions and height == width: return self.position_embeddings`
                # would otherwise specialise the graph (W == H, or the native grid) without an error
                size = _trace_size(tuple(example.image.shape[-2:]), patch)
                why = _probe_size(target, example, size)
                if why is None:
                    trace = example.resized(size)
                else:
                    patch = None
            if why:
                notes.append(why)
            if patch is None:
                example = plain  # H/W stay static: no need to interpolate position embeddings
        try:
            ref = example_call(target, example)
        except Exception as e:
            raise ExportError(f"{type(model).__name__} fails on the example inputs: {first_line(e, 500)}") from e
        out_names, _ = _output_tensors(ref)
        in_names = _tensor_names(example, target)
        batch = dynamic is not False and example.image is not None

        def run_export(p):
            ex = trace if p is not None else example
            ds = dynamic_shapes_for(target, ex, p, batch) if batch else None
            return torch.onnx.export(
                target, ex.args, kwargs=ex.kwargs or None, dynamo=True, dynamic_shapes=ds,
                input_names=in_names, output_names=out_names, opset_version=opset, verbose=False,
                external_data=False,
            )

        try:
            with _quiet():
                prog = run_export(patch)
        except Exception as e:
            if patch is None:
                raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {first_line(e, 500)}") from e
            notes.append(f"export with dynamic H/W failed ({first_line(e, 500)}); exported with a dynamic batch only")
            patch = None
            try:
                with _quiet():
                    prog = run_export(None)
            except Exception as e2:
                raise ExportError(
                    f"torch.onnx.export failed for {type(model).__name__}: {first_line(e2, 500)}") from e2

        result = OnnxExport(path, in_names, out_names or [], batch, patch is not None, patch, fused, notes=notes)
        check = (lambda f: _verify(target, example, f, result, atol, rtol)) if verify else None
        _atomic_save(prog, path, check)
    return result


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _trace_size(size: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """A size other than ``size``, in whole patches, with H != W and grid H != grid W."""
    (h, w), (ph, pw) = size, patch
    for dh, dw in ((2, 1), (1, 2), (3, 1), (1, 3)):
        hh, ww = h + dh * ph, w + dw * pw
        if hh != ww and hh // ph != ww // pw:
            return hh, ww
    return h + 2 * ph, w + pw


def _probe_size(model: nn.Module, example: ExampleInputs, size: tuple[int, int]) -> str | None:
    try:
        example_call(model, example.resized(size))
    except Exception as e:
        return f"the model refuses a {size[0]}x{size[1]} input ({first_line(e, 500)}): H/W stay static"
    return None


def _atomic_save(prog: Any, path: Path, check: Any = None) -> None:
    """Write into a temporary folder beside ``path``, check the file there, then move it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        try:
            prog.save(tmp / path.name)  # external data (above 2 GB) is named after the file: keep the name
        except Exception as e:
            raise ExportError(f"cannot write {path}: {first_line(e, 500)}") from e
        if check is not None:
            check(tmp / path.name)
        files = sorted(tmp.iterdir(), key=lambda f: f.name == path.name)  # the .onnx last
        for f in files:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(model: nn.Module, example: ExampleInputs, file: Path, result: OnnxExport, atol: float,
            rtol: float) -> None:
    """Compare onnxruntime on ``file`` with PyTorch; errors name ``result.path`` (nothing is written there)."""
    import numpy as np
    import onnxruntime as ort

    path = result.path
    try:
        sess = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"onnxruntime cannot load {path}: {first_line(e, 500)}") from e
    examples = [example]
    img = example.image
    if result.dynamic_batch and img is not None:
        size = tuple(img.shape[-2:])
        if result.dynamic_hw:  # another non-square size than the traced one
            size = (size[0] + result.patch[0], size[1] + 3 * result.patch[1])
        # another batch size (1: what a deployment often runs)
        examples.append(example.resized(size).with_batch(1 if img.shape[0] > 1 else 2))
    worst = 0.0
    names = [i.name for i in sess.get_inputs()]
    for ex in examples:
        tensors = [v for v in (*ex.args, *ex.kwargs.values()) if isinstance(v, torch.Tensor)]
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        _, want = _output_tensors(example_call(model, ex))
        try:
            got = sess.run(None, feeds)
        except Exception as e:
            raise ExportError(f"onnxruntime failed on {path} with inputs "
                              f"{[tuple(t.shape) for t in tensors]}: {first_line(e, 500)}") from e
        for g, w in zip(got, want):
            w = w.detach().float().cpu().numpy()
            if g.shape != w.shape:
                raise ExportError(f"{path}: onnxruntime gives shape {g.shape}, PyTorch {w.shape}")
            err = float(np.abs(g.astype(np.float64) - w).max()) if w.size else 0.0
            if err > atol + rtol * float(np.abs(w).max() if w.size else 0.0):
                raise ExportError(f"{path}: onnxruntime differs from PyTorch by {err:.3g} at input shape "
                                  f"{tuple(tensors[0].shape)}")
            worst = max(worst, err)
        result.checked_shapes.append(tuple(tensors[0].shape))
    result.max_abs_err = worst
