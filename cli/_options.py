"""Option types shared by the commands (``Annotated`` aliases: the same names and help text everywhere), and the
functions that turn option values into library values (a malformed value is a usage error, exit 2, before any
model is built)."""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import localify


def _choices(name: str, values: list[str]) -> type[Enum]:
    """An Enum of the library's own choices, so that --help lists them and typer checks them."""
    return Enum(name, {v: v for v in values}, type=str)


_LOCALVIT = localify.get_variant("localvit")
Variant = _choices("Variant", localify.variant_names())
Act = _choices("Act", [a for a in _LOCALVIT.choices["act"] if a != "swish"])
Attention = _choices("Attention", [a for a in _LOCALVIT.choices["attention"] if a])


class WeightSet(str, Enum):
    all = "all"
    locality = "locality"
    trainable = "trainable"


def _check_layers(value: str) -> str:
    """Syntax only (exit 2); whether the blocks exist is known after tracing (a library error, exit 1)."""
    try:
        localify.parse_layers(value, None)
    except localify.LayerSpecError as e:
        raise typer.BadParameter(str(e)) from None
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
TrustCodeOpt = Annotated[bool, typer.Option(
    "--trust-code", rich_help_panel=MODEL_PANEL,
    help="Allow a saved file whose base model is 'module:factory' to import that module and call the function "
         "(as transformers' trust_remote_code). Off: such a file is refused, naming the module.",
)]
InputSizeOpt = Annotated[str | None, typer.Option(
    "--input-size", metavar="[CxHxW|HxW]", rich_help_panel=MODEL_PANEL,
    help="The example image to trace with (batch 2): 3x224x224 or 224x224, for models whose config does not "
         "tell.",
)]
ExampleInputsOpt = Annotated[Path | None, typer.Option(
    "--example-inputs", metavar="FILE", rich_help_panel=MODEL_PANEL,
    help="A .safetensors file holding the forward's arguments by name (pixel_values, ...; '0', '1' for "
         "positional ones), for models that need more than an image (video frames, tile ids).",
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


CONVERSION_OPTIONS = ("layers", "variant", "kernel_size", "act", "attention", "se_hidden", "se_reduction",
                      "eca_kernel", "model_kwargs", "pretrained")


def refuse_conversion_options(ctx: typer.Context) -> None:
    """A saved file's recipe holds its conversion: conversion options given with one are a usage error."""
    given = [n for n in CONVERSION_OPTIONS
             if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise typer.BadParameter(f"{flags}: conversion options apply to a MODEL source, not to a saved file "
                                 f"(its recipe holds them)", param_hint="MODEL_OR_SAVED_FILE")


def input_size_value(value: str | None) -> tuple[int | None, tuple[int, int]] | None:
    """``3x224x224`` -> (3, (224, 224)); ``160x224`` -> (None, (160, 224))."""
    if value is None:
        return None
    parts = value.lower().replace(" ", "").split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f"{value!r} is not an input size; use CxHxW (3x224x224) or HxW (224x224)",
                                 param_hint="'--input-size'")
    nums = [int(p) for p in parts]
    return (nums[0] if len(nums) == 3 else None), (nums[-2], nums[-1])


def read_example_file(path: Path) -> dict:
    """The forward arguments stored in a safetensors file: names as keyword arguments, digits as positions."""
    try:
        tensors = localify.load_tensors(path)
    except localify.LocalifyError as e:
        raise typer.BadParameter(str(e), param_hint="'--example-inputs'") from None
    args = [tensors[k] for k in sorted((k for k in tensors if k.isdigit()), key=int)]
    kwargs = {k: v for k, v in tensors.items() if not k.isdigit()}
    return (tuple(args), kwargs)


class InputSpec:
    """What --input-size / --example-inputs ask for, turned into the library's example inputs for a model."""

    def __init__(self, input_size: str | None, example_file: Path | None) -> None:
        if input_size is not None and example_file is not None:
            raise typer.BadParameter("give --input-size or --example-inputs, not both", param_hint="'--input-size'")
        self.size = input_size_value(input_size)
        self.example = read_example_file(example_file) if example_file is not None else None

    def for_model(self, model) -> localify.ExampleInputs | None:
        if self.example is not None:
            return localify.example_inputs(model, example=self.example)
        if self.size is not None:
            channels, hw = self.size
            return localify.example_inputs(model, size=hw, channels=channels)
        return None
