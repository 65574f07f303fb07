"""What every command shares: option types, model loading, the output object and the error mapping.

* Option types are ``Annotated`` aliases, so every command shows the same names and help text.
* :class:`Output` is the only thing that writes to the terminal: results (tables, JSON) go to stdout,
  notes, progress and errors to stderr. It knows ``--json`` and ``--quiet``.
* :class:`LocalifyGroup` maps errors to exit codes in one place: a library error (any
  :class:`localify.LocalifyError`) or any other failure is one red line on stderr and exit code 1; usage
  errors (bad option syntax, found before any model is built) exit 2; ``LOCALIFY_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from torch import nn
from typer.core import TyperGroup

import localify
from localify.errors import LocalifyError, ModelSourceError

DEBUG_ENV = "LOCALIFY_DEBUG"
# the outputs of a function-preserving conversion may differ by float rounding only (the grid tokens go
# through fc1/fc2 in their own GEMM); a check passes when max |diff| <= TOLERANCE * max(1, output scale)
TOLERANCE = 1e-4
PRESERVING = ("dwconv", "residual")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------------- errors
class CheckFailedError(LocalifyError):
    """A check run by the command line (output check at conversion, ``verify``) did not pass."""


class LocalifyGroup(TyperGroup):
    """The command group: runs a command with library chatter silenced and maps its errors to exit codes."""

    def invoke(self, ctx: typer.Context) -> Any:
        with _quiet_libraries():
            try:
                return super().invoke(ctx)
            except (typer.Exit, typer.Abort, typer.TyperException):
                raise  # --help, usage errors (exit 2), explicit exits
            except Exception as e:  # noqa: BLE001 - every other failure becomes one line, exit 1
                _report(e)
                raise typer.Exit(1) from None


def one_line(e: BaseException | str) -> str:
    text = e if isinstance(e, str) else str(e)
    return " ".join(text.split())


def _report(e: Exception) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if debug_enabled():
        typer.echo("".join(traceback.format_exception(e)), err=True, nl=False)
    msg = one_line(e) or type(e).__name__
    if not isinstance(e, LocalifyError):
        msg = f"{type(e).__name__}: {msg}"
    line = Text.assemble(("error: ", "bold red"), (msg, "red"))
    if not debug_enabled():
        line.append(f"  ({DEBUG_ENV}=1 shows the traceback)", style="dim")
    err.print(line)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """No output from the libraries themselves: warnings, transformers' logging and progress bars."""
    restore = []
    try:
        import transformers.utils.logging as hf_logging

        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        if not debug_enabled():
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        restore.append(lambda: (hf_logging.set_verbosity(level),
                                hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()))
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    torch_log = logging.getLogger("torch")
    torch_level = torch_log.level
    if not debug_enabled():
        torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default" if debug_enabled() else "ignore")
            yield
    finally:
        torch_log.setLevel(torch_level)
        for fn in restore:
            fn()


# --------------------------------------------------------------------------------------------------- output
class Output:
    """All terminal output of one command: results to stdout (a table, or JSON with ``--json``), notes,
    progress and errors to stderr. ``--quiet`` keeps only JSON and errors."""

    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def interactive(self) -> bool:
        return not self.quiet and self.err.is_terminal

    def note(self, msg: str | Text, style: str = "") -> None:
        """A line for the user on stderr (never markup: library messages may hold brackets)."""
        if not self.quiet:
            self.err.print(msg if isinstance(msg, Text) else Text(msg, style=style))

    def warn(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(Text.assemble(("warning: ", "bold yellow"), (msg, "yellow")))

    def show(self, *renderables: Any) -> None:
        """A result for humans (tables): shown unless ``--json`` or ``--quiet``."""
        if not self.json_mode and not self.quiet:
            for r in renderables:
                self.out.print(r)

    def emit(self, data: Any) -> None:
        """The machine-readable result: printed only with ``--json``, as plain JSON on stdout."""
        if self.json_mode:
            typer.echo(json.dumps(data, indent=2, default=_json_default))

    @contextlib.contextmanager
    def status(self, msg: str) -> Iterator[Any]:
        """A spinner on stderr while something runs (only on a terminal); yields ``update(msg)``."""
        if not self.interactive:
            yield lambda _msg: None
            return
        with self.err.status(msg) as st:
            yield lambda m: st.update(m)

    def progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.err, transient=True, disable=not self.interactive,
        )


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, float) and o != o:  # pragma: no cover
        return None
    return str(o)


# --------------------------------------------------------------------------------------------------- options
class Variant(str, Enum):
    dwconv = "dwconv"
    residual = "residual"
    localvit = "localvit"


class Act(str, Enum):
    hswish = "hswish"
    relu6 = "relu6"
    relu = "relu"
    silu = "silu"
    gelu = "gelu"


class Attention(str, Enum):
    se = "se"
    eca = "eca"


class WeightSet(str, Enum):
    all = "all"
    locality = "locality"
    trainable = "trainable"


_LAYER_PART = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def _check_layers(value: str) -> str:
    """Syntax only (exit 2); whether the blocks exist is known after tracing (a library error, exit 1)."""
    text = value.strip().lower()
    if text in ("all", "*", "early", "late"):
        return value
    for part in text.split(","):
        m = _LAYER_PART.match(part)
        bad = m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < int(m.group(1)))
        if bad:
            raise typer.BadParameter(
                f"{value!r} is not a layer specification (bad part {part.strip()!r}); use 'all', 'early', "
                f"'late', or 1-based block ranges such as '1-4' or '1,3,5-6'"
            )
    return value


def _parse_kwargs(value: str | None) -> dict:
    if value is None:
        return {}
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise typer.BadParameter(f"not valid JSON ({e}); example: '{{\"img_size\": 256}}'") from None
    if not isinstance(obj, dict):
        raise typer.BadParameter(f"must be a JSON object such as '{{\"img_size\": 256}}', not {value!r}")
    return obj


def _parse_sizes(values: list[str] | None) -> list[tuple[int, int]]:
    out = []
    for v in values or []:
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+)\s*)?", v)
        if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise typer.BadParameter(f"{v!r} is not an input size; use 224 or 160x224 (height x width)")
        h = int(m.group(1))
        out.append((h, int(m.group(2)) if m.group(2) else h))
    return out


MODEL_PANEL = "Model"
CONVERSION_PANEL = "Conversion"
OUTPUT_PANEL = "Output"

ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL",
    help="A timm name or unique prefix (deit_tiny), [bold]hf:PATH_OR_ID[/] (Hugging Face, local directory or "
         "cache, offline) or [bold]module.path:factory[/] (your own code).",
    show_default=False,
)]
ModelKwargsOpt = Annotated[str | None, typer.Option(
    "--model-kwargs", metavar="JSON", rich_help_panel=MODEL_PANEL,
    help="Keyword arguments for the model (timm / factory) or config overrides (hf:), as a JSON object: "
         "'{\"img_size\": 256}'.",
)]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", "-c", metavar="FILE", rich_help_panel=MODEL_PANEL,
    help="Local pretrained weights loaded into the base model before anything else: .safetensors, or "
         ".pth/.bin/.pt read with weights_only=True. Without it (or --pretrained) timm and factory models have "
         "random weights.",
)]
PretrainedOpt = Annotated[bool, typer.Option(
    "--pretrained", rich_help_panel=MODEL_PANEL,
    help="Load the model's pretrained weights: timm's from the Hugging Face cache (set HF_HUB_OFFLINE=1 to "
         "never download), hf: the weights with its config (missing ones are an error instead of random "
         "init), a factory is called with pretrained=True. --checkpoint is loaded on top.",
)]
LayersOpt = Annotated[str, typer.Option(
    "--layers", "-l", metavar="SPEC", rich_help_panel=CONVERSION_PANEL,
    help="Blocks to convert: all, early (first third), late (last third), or 1-based ranges: 1-4, 1,3,5-6.",
)]
VariantOpt = Annotated[Variant, typer.Option(
    "--variant", rich_help_panel=CONVERSION_PANEL,
    help="dwconv: fc1 -> dw(identity) -> act -> fc2; residual: h + dw(h), zero kernel (both exact at "
         "conversion); localvit: the paper's block (changes the function, for training).",
)]
KernelOpt = Annotated[int, typer.Option(
    "--kernel-size", "-k", min=1, rich_help_panel=CONVERSION_PANEL, help="Odd size of the depth-wise kernel.",
)]
ActOpt = Annotated[Act, typer.Option(
    "--act", rich_help_panel=CONVERSION_PANEL, help="localvit only: activation of the block.",
)]
AttentionOpt = Annotated[Attention | None, typer.Option(
    "--attention", rich_help_panel=CONVERSION_PANEL, help="localvit only: channel attention (se or eca).",
    show_default=False,
)]
SeHiddenOpt = Annotated[int | None, typer.Option(
    "--se-hidden", min=1, rich_help_panel=CONVERSION_PANEL, help="localvit + se: bottleneck width.",
)]
SeReductionOpt = Annotated[int | None, typer.Option(
    "--se-reduction", min=1, rich_help_panel=CONVERSION_PANEL, help="localvit + se: or hidden // reduction.",
)]
EcaKernelOpt = Annotated[int | None, typer.Option(
    "--eca-kernel", min=1, rich_help_panel=CONVERSION_PANEL, help="localvit + eca: channel-conv kernel.",
)]
JsonOpt = Annotated[bool, typer.Option(
    "--json", rich_help_panel=OUTPUT_PANEL, help="Machine-readable JSON on stdout instead of tables.",
)]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel=OUTPUT_PANEL, help="No notes, tables or progress (errors and --json still).",
)]
SizeOpt = Annotated[list[str] | None, typer.Option(
    "--size", "-s", metavar="HxW", rich_help_panel=CONVERSION_PANEL,
    help="Input size to check at (224 or 160x224); repeat for several. Default: the traced size and a second "
         "size when the model accepts one.",
)]
TolOpt = Annotated[float, typer.Option(
    "--tol", min=0.0, rich_help_panel=OUTPUT_PANEL,
    help="A check passes when max |diff| <= TOL * max(1, output scale).",
)]

# the parameters above, validated and turned into values: a command calls these first (usage errors exit 2
# before any model is built)


def layers_value(value: str) -> str:
    try:
        return _check_layers(value)
    except typer.BadParameter as e:
        e.param_hint = "'--layers'"
        raise


def kwargs_value(value: str | None) -> dict:
    try:
        return _parse_kwargs(value)
    except typer.BadParameter as e:
        e.param_hint = "'--model-kwargs'"
        raise


def sizes_value(values: list[str] | None) -> list[tuple[int, int]]:
    try:
        return _parse_sizes(values)
    except typer.BadParameter as e:
        e.param_hint = "'--size'"
        raise


def make_config(layers: str, variant: Variant, kernel_size: int, act: Act, attention: Attention | None,
                se_hidden: int | None, se_reduction: int | None, eca_kernel: int | None) -> localify.LocalifyConfig:
    """The conversion options as a :class:`localify.LocalifyConfig`; an invalid combination is a usage error."""
    layers = layers_value(layers)
    try:
        return localify.LocalifyConfig(
            layers=layers, variant=variant.value, kernel_size=kernel_size, act=act.value,
            attention=attention.value if attention is not None else None, se_hidden=se_hidden,
            se_reduction=se_reduction, eca_kernel=eca_kernel,
        )
    except localify.ConfigError as e:
        msg = str(e).replace("variant='localvit'", "--variant localvit").replace("kernel_size", "--kernel-size")
        raise typer.BadParameter(msg, param_hint="conversion options") from None


# --------------------------------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A base model built from a source string, and how."""

    model: nn.Module
    source: localify.ModelSource
    requested: str  # what the user typed
    weights: str  # where the weights came from, in words

    @property
    def resolved(self) -> str:
        return self.source.describe()


def load_model(text: str, model_kwargs: dict, checkpoint: Path | None, out: Output,
               pretrained: bool = False) -> LoadedModel:
    """Build the base model of a source string (timm name or prefix, ``hf:``, ``module:factory``) with its
    weights, in eval mode: ``--pretrained`` weights, then ``--checkpoint``; an ``hf:`` model gets the weights
    stored with its config when there are any."""
    from localify._sources import parse_source

    if not text.startswith("hf:") and Path(text).exists() and ":" not in text:
        hint = (f"a Hugging Face model directory is given as hf:{text}" if (Path(text) / "config.json").exists()
                else f"a saved localify model is checked with 'localify verify {text}'")
        raise ModelSourceError(f"{text!r} is a path, not a model name; {hint}")
    with out.status(f"resolving {text}"):
        src = parse_source(text, model_kwargs)
    if src.kind == "timm" and src.name != text:
        out.note(f"{text} -> {src.name}", style="cyan")
    with out.status(f"building {src.describe()}"):
        torch.manual_seed(0)
        if src.kind == "hf" and not pretrained and checkpoint is None:
            model, weights = _hf_model(src)
        else:
            model = localify.create_model(src, pretrained=pretrained, checkpoint_path=checkpoint)
            weights = _weights_text(src, pretrained, checkpoint)
    model.eval()
    return LoadedModel(model, src, text, weights)


def _hf_model(src: localify.ModelSource) -> tuple[nn.Module, str]:
    """An ``hf:`` model with the weights stored with its config, or random weights if there are none."""
    from localify._sources import hf_has_weights

    has_weights = hf_has_weights(src.name)  # None for a hub id: only loading tells
    if has_weights is False:
        return localify.create_model(src), f"random init ({src.name} holds a config but no weights)"
    try:
        return localify.create_model(src, pretrained=True), f"Hugging Face weights from {src.name}"
    except localify.CheckpointError:
        if has_weights:  # a directory whose weights do not load
            raise
        return localify.create_model(src), f"random init (no weights for {src.name} in the local cache)"


def _weights_text(src: localify.ModelSource, pretrained: bool, checkpoint: Path | None) -> str:
    """Where the weights of a built model came from, in words."""
    parts = []
    if pretrained:
        parts.append("Hugging Face weights from " + src.name if src.kind == "hf" else "pretrained weights")
    if checkpoint is not None:
        parts.append(f"checkpoint {checkpoint}")
    if not parts:
        return "random init (pass --pretrained or --checkpoint FILE for pretrained weights)"
    return ", then ".join(parts)


def is_saved_path(text: str) -> bool:
    """Whether a MODEL argument names a saved model (a file or directory) rather than a model source."""
    if text.startswith("hf:"):
        return False
    p = Path(text)
    return p.exists() or p.suffix in (".pt", ".safetensors", ".pth", ".bin") or "/" in text or os.sep in text


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------- checks
def example_inputs(model: nn.Module, size: tuple[int, int] | None = None,
                   traced: tuple[int, int] | None = None) -> tuple[tuple, dict]:
    """The inputs localify traces ``model`` with (batch 2), resized to ``size`` when it differs from the
    traced size (with ``interpolate_pos_encoding=True`` for Hugging Face models that take it)."""
    from localify._trace import accepts_kwarg, make_example_inputs

    ex = make_example_inputs(model)
    if size is not None and tuple(size) != tuple(traced or ()):
        extra = {"interpolate_pos_encoding": True} if accepts_kwarg(model, "interpolate_pos_encoding") else {}
        ex = ex.resized(tuple(size), extra)
    return ex.args, ex.kwargs


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def max_difference(a: Any, b: Any) -> tuple[float, float]:
    """(max |a - b| over every output tensor, max |a|); inf when the outputs do not even have the same shapes."""
    ta, tb = _tensors(a), _tensors(b)
    scale = max((t.detach().abs().max().item() for t in ta if t.numel() and t.is_floating_point()), default=0.0)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf"), scale
    diff = max(((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(ta, tb)
                if x.numel() and x.is_floating_point()), default=0.0)
    return diff, scale


def within(diff: float, scale: float, tol: float) -> bool:
    return diff <= tol * max(1.0, scale)


def compare(a: nn.Module, b: nn.Module, args: tuple, kwargs: dict) -> tuple[float, float]:
    with torch.no_grad():
        return max_difference(a(*args, **kwargs), b(*args, **kwargs))


def titled(title: str, table: Any, caption: str | None = None) -> Group:
    """A table with its title above and caption below as plain lines (a table title would wrap to the
    table's own width)."""
    parts = [Text(title, style="bold"), table]
    if caption:
        parts.append(Text(caption, style="dim"))
    return Group(*parts)


def size_text(size: Any) -> str:
    return "-" if not size else f"{size[0]}x{size[1]}"


def fmt_diff(d: float) -> str:
    return "0" if d == 0 else f"{d:.2e}"
