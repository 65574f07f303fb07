"""Tracing: example inputs, one ``torch.export`` of the model, and a record of every module call.

The graph gives the dataflow (which Linear feeds which, how tokens were built); the module-call record
gives what each module saw at its boundary (tensor shapes, int arguments), which is where a converted
block reads its token grid from at run time.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import ExampleInputError, TraceError, first_line

__all__ = ["ExampleInputs", "Trace", "make_example_inputs", "trace_model", "record_calls"]

EXAMPLE_BATCH = 2


@dataclass
class ExampleInputs:
    """Positional and keyword arguments for one forward call, and where the image sits among them."""

    args: tuple
    kwargs: dict
    image_key: tuple | None = None  # pytree key path of the image tensor inside (args, kwargs)
    note: str = ""  # how the inputs were chosen when the model's config did not say (shown in the plan)

    @property
    def image(self) -> torch.Tensor | None:
        if self.image_key is None:
            return None
        return pytree.key_get((self.args, self.kwargs), self.image_key)

    def any_size(self, model: nn.Module) -> ExampleInputs:
        """The same call, asking a model that takes ``interpolate_pos_encoding`` (Hugging Face ViTs) to accept
        any input size: the one rule for running a model at another size than its configured one."""
        if not accepts_kwarg(model, "interpolate_pos_encoding") or "interpolate_pos_encoding" in self.kwargs:
            return self
        return ExampleInputs(self.args, {**self.kwargs, "interpolate_pos_encoding": True}, self.image_key, self.note)

    def at_size(self, model: nn.Module, size: tuple[int, int]) -> ExampleInputs:
        """The call at image ``size`` (random pixels), with :meth:`any_size` applied when the size changes."""
        img = self.image
        if img is not None and tuple(img.shape[-2:]) == tuple(size):
            return self
        return self.any_size(model).resized(size)

    def with_batch(self, n: int) -> ExampleInputs:
        """The same call with ``n`` samples: every tensor whose first dimension is the image's batch is cut to
        ``n`` rows or repeated up to them."""
        img = self.image
        if img is None or img.shape[0] == n:
            return self
        b = img.shape[0]

        def rebatch(v: Any) -> Any:
            if not (isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == b):
                return v
            return v[:n] if n < b else v.repeat(-(-n // b), *([1] * (v.dim() - 1)))[:n]

        leaves, spec = pytree.tree_flatten((self.args, self.kwargs))
        args, kwargs = pytree.tree_unflatten([rebatch(v) for v in leaves], spec)
        return ExampleInputs(tuple(args), kwargs, self.image_key, self.note)

    def resized(self, size: tuple[int, int], extra_kwargs: dict | None = None) -> ExampleInputs:
        """The same call with the image replaced by a random one of spatial ``size``."""
        img = self.image
        if img is None:
            raise ExampleInputError("the example inputs hold no image tensor (B, C, H, W) to resize")
        new = torch.randn(*img.shape[:-2], *size, dtype=img.dtype, device=img.device)
        leaves, spec = pytree.tree_flatten_with_path((self.args, self.kwargs))
        vals = [new if kp == self.image_key else v for kp, v in leaves]
        args, kwargs = pytree.tree_unflatten(vals, spec)
        kwargs = {**kwargs, **(extra_kwargs or {})}
        return ExampleInputs(tuple(args), kwargs, self.image_key, self.note)


@dataclass
class CallRecord:
    """What one module call saw at its boundary: tensor shapes and int values, by pytree key path."""

    order: int
    path: str
    phase: str  # "input" or "output"
    tensors: list[tuple[tuple, tuple[int, ...]]] = field(default_factory=list)
    ints: list[tuple[tuple, int]] = field(default_factory=list)


@dataclass
class Trace:
    """An exported graph of the model plus the module-call record taken while exporting."""

    program: Any  # torch.export.ExportedProgram
    graph: torch.fx.Graph
    param_names: dict[str, str]  # placeholder name -> parameter / buffer FQN
    user_inputs: set[str]
    calls: list[CallRecord]
    example: ExampleInputs
    batch: int
    tracer: str = "torch.export"  # the tracer that produced ``graph`` (EXPORT or DRAFT_EXPORT)


def _find_image_key(args: tuple, kwargs: dict) -> tuple | None:
    leaves, _ = pytree.tree_flatten_with_path((args, kwargs))
    for kp, v in leaves:
        if isinstance(v, torch.Tensor) and 4 <= v.dim() <= 6 and v.is_floating_point():
            return kp  # (B, C, H, W), a video (B, T, C, H, W) or tiles (B, I, T, C, H, W)
    return None


def _as_size(v: Any) -> tuple[int, int] | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


DEFAULT_SIZE = (224, 224)  # what the image processors of HF configs without image_size default to, near enough


def _hf_config(model: nn.Module) -> Any | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict") or not type(model).__module__.startswith("transformers"):
        return None
    return cfg


def _image_param(model: nn.Module) -> str:
    """The name of the forward parameter that takes the image (``pixel_values`` for Hugging Face models)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return "pixel_values"
    return next((p for p in ("pixel_values", "pixel_values_videos", "x", "images", "image") if p in params),
                params[0] if params else "pixel_values")


def _required_params(model: nn.Module) -> list[str]:
    """Forward parameters without a default value."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return [n for n, p in sig.parameters.items() if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _built_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a non-HF model was built for."""
    for mod in model.modules():
        size = _as_size(getattr(mod, "img_size", None))
        if size is not None:
            return size
    src = getattr(model, "_localify_source", None)  # built by localify.create_model with img_size=
    size = _as_size((getattr(src, "kwargs", None) or {}).get("img_size"))
    if size is not None:
        return size
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if isinstance(cfg, dict) and len(cfg.get("input_size") or ()) == 3:
        return tuple(cfg["input_size"][1:])
    return None


def make_example_inputs(
    model: nn.Module, example_inputs: Any = None, *, batch: int = EXAMPLE_BATCH,
    size: tuple[int, int] | None = None, channels: int | None = None,
) -> ExampleInputs:
    """Build (or normalise) the example inputs used to trace ``model``.

    ``example_inputs`` may be a tensor, a tuple of positional arguments, a dict of keyword arguments, or a
    ``(args, kwargs)`` pair. Without it, the size comes from the model's own configuration: a Hugging Face
    ``config.image_size`` / ``num_channels`` (or its ``vision_config``'s; 224x224 when it has none, said in
    ``note``), else an ``img_size`` attribute of the model or one of its modules (timm's patch embeddings,
    most user-written ViTs), the ``img_size`` it was built with by ``localify.create_model``, else timm's
    ``pretrained_cfg["input_size"]``. A forward that needs more than the image (video frames, tile ids) is an
    :class:`ExampleInputError` naming the missing arguments. ``size`` and ``channels`` override what the
    configuration says.
    """
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            args, kwargs = (example_inputs,), {}
        elif isinstance(example_inputs, dict):
            args, kwargs = (), dict(example_inputs)
        elif (
            isinstance(example_inputs, (tuple, list))
            and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list))
            and isinstance(example_inputs[1], dict)
        ):
            args, kwargs = tuple(example_inputs[0]), dict(example_inputs[1])
        elif isinstance(example_inputs, (tuple, list)):
            args, kwargs = tuple(example_inputs), {}
        else:
            raise ExampleInputError(
                f"example_inputs must be a tensor, a tuple of arguments, a dict of keyword arguments or an "
                f"(args, kwargs) pair; got {type(example_inputs).__name__}"
            )
        return ExampleInputs(args, kwargs, _find_image_key(args, kwargs))

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cfg = _hf_config(model)
    note = ""
    if cfg is not None:
        vision = getattr(cfg, "vision_config", None) if getattr(cfg, "image_size", None) is None else None
        size = size or _as_size(getattr(cfg, "image_size", None)) or _as_size(getattr(vision, "image_size", None))
        chans = getattr(cfg, "num_channels", None) or getattr(vision, "num_channels", None) or 3
        if size is None:
            size = DEFAULT_SIZE
            note = f"the config of {type(model).__name__} has no image_size: traced at 224x224"
        image = _image_param(model)
        where = image if image in ("pixel_values", "pixel_values_videos") else "pixel_values"
        chans = channels or (chans if isinstance(chans, int) else 3)
        frames = getattr(cfg, "num_frames", None) or getattr(vision, "num_frames", None)
        if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0:  # a video model
            x = torch.randn(batch, frames, chans, *size, device=device, dtype=dtype)
            return ExampleInputs((), {where: x}, (pytree.SequenceKey(1), pytree.MappingKey(where)), note)
    else:
        size = size or _built_size(model)
        chans = channels or getattr(model, "in_chans", None) or 3
        if size is None:
            raise ExampleInputError(
                f"cannot tell which input {type(model).__name__} expects: it has no Hugging Face config, no "
                f"img_size attribute and no timm pretrained_cfg; pass example_inputs=torch.randn(2, 3, H, W) "
                f"(--input-size 3xHxW on the command line)"
            )
        where = None
    missing = [p for p in _required_params(model) if p != (where or _image_param(model))]
    if missing:
        raise ExampleInputError(
            f"{type(model).__name__}.forward needs {', '.join(repr(m) for m in missing)} besides the image; "
            f"localify builds only the image. Pass example_inputs={{...}} with every argument "
            f"(--example-inputs FILE.safetensors on the command line)"
        )
    x = torch.randn(batch, chans, *size, device=device, dtype=dtype)
    if where is not None:
        return ExampleInputs((), {where: x}, (pytree.SequenceKey(1), pytree.MappingKey(where)), note)
    return ExampleInputs((x,), {}, (pytree.SequenceKey(0), pytree.SequenceKey(0)), note)


def accepts_kwarg(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Restore the training flag of every module ``model`` holds now (each its own) on leaving."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode, restoring each module's own flag afterwards."""
    with kept_modes(model):
        model.eval()
        yield


def _shape(t: torch.Tensor) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in t.shape)
    except Exception:  # symbolic sizes that cannot be made concrete
        return None


@contextlib.contextmanager
def record_calls(model: nn.Module, calls: list[CallRecord]) -> Iterator[None]:
    """Record, for every module call, the shapes of the tensors and the ints it took and returned."""
    counter = [0]
    handles = []

    def add(path: str, phase: str, obj: Any) -> None:
        rec = CallRecord(counter[0], path, phase)
        counter[0] += 1
        try:
            leaves, _ = pytree.tree_flatten_with_path(obj)
        except Exception:
            leaves = []
        for kp, v in leaves:
            if isinstance(v, torch.Tensor):
                shp = _shape(v)
                if shp is not None:
                    rec.tensors.append((kp, shp))
            elif isinstance(v, int) and not isinstance(v, bool):
                rec.ints.append((kp, int(v)))
        calls.append(rec)

    for path, mod in model.named_modules():
        def pre(m, args, kwargs, _p=path):
            add(_p, "input", (args, kwargs))

        def post(m, args, kwargs, out, _p=path):
            add(_p, "output", out)

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


EXPORT = "torch.export"
DRAFT_EXPORT = "torch.export.draft_export"  # what actually ran: data-dependent values taken from the example


def trace_model(model: nn.Module, example: ExampleInputs) -> Trace:
    """Trace ``model`` once in eval mode, recording module calls.

    ``torch.export`` (non-strict) first. A model whose code depends on data (``if x.mean() > 0``, sizes read
    from tensors: EoMT, Qwen2.5-VL's vision windows) makes export fail on a guard; it is then traced with
    ``torch.export.draft_export``, which runs the example for real and records the branches and sizes it took.
    That graph is valid for the example's size, which is all the analysis needs; ``Trace.tracer`` says which
    tracer was used."""
    calls: list[CallRecord] = []
    program, tracer, errors = None, EXPORT, []
    for name, fn in ((EXPORT, torch.export.export), (DRAFT_EXPORT, getattr(torch.export, "draft_export", None))):
        if fn is None:
            continue
        tracer = name
        calls.clear()
        try:
            with eval_mode(model), record_calls(model, calls), warnings.catch_warnings(), _quiet_torch_logs(), \
                    _gc_paused():
                warnings.simplefilter("ignore")
                program = fn(model, example.args, example.kwargs, strict=False)
            break
        except Exception as e:  # the tracer's own reason is the useful part
            errors.append(e)
    if program is None:
        e = errors[0]
        also = (f" (draft_export, which follows what actually runs, failed too: {type(errors[1]).__name__}: "
                f"{first_line(errors[1], 200)})" if len(errors) > 1 else "")
        raise TraceError(
            f"torch.export could not trace {type(model).__name__} with the example inputs "
            f"({_describe(example)}): {type(e).__name__}: {first_line(e)}{also}. Pass example_inputs= matching "
            f"the model's forward (a tensor, a tuple, or a dict such as {{'pixel_values': x}})."
        ) from e
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    names.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    batch = EXAMPLE_BATCH
    img = example.image
    if img is not None:
        batch = int(img.shape[0])
    return Trace(program, program.graph, names, set(sig.user_inputs), calls, example, batch, tracer)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while tracing. The call records allocate small objects at every
    module call, which set off full collections over the tracer's large object graph: on vit_base the first
    export of a process took 0.82-0.94 s with the recording hooks and 0.64-0.65 s with them and the collector
    paused (a plain export: 0.59-0.66 s). Only reference cycles made during the trace wait for the collector,
    which runs again after it; reference counting frees everything else as always."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Keep torch's own reports quiet while tracing (the library never prints): a failing export prints its
    graph to stderr, draft_export reports what it specialised through torch's loggers."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch.fx.experimental.symbolic_shapes",
                                               "torch._export", "torch._subclasses.fake_tensor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _describe(example: ExampleInputs) -> str:
    parts = [f"arg{i}: {_desc(a)}" for i, a in enumerate(example.args)]
    parts += [f"{k}: {_desc(v)}" for k, v in example.kwargs.items()]
    return ", ".join(parts) or "no inputs"


def _desc(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}"
    return type(v).__name__
