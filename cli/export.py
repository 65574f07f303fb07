"""``localify export``: a converted model (a source to convert, or a saved file) to ONNX."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import localify

from ._models import (
    is_saved_path,
    load_model,
)
from ._options import (
    OUTPUT_PANEL,
    Act,
    ActOpt,
    AttentionOpt,
    CheckpointOpt,
    EcaKernelOpt,
    ExampleInputsOpt,
    InputSizeOpt,
    InputSpec,
    JsonOpt,
    KernelOpt,
    LayersOpt,
    ModelKwargsOpt,
    PretrainedOpt,
    QuietOpt,
    SeHiddenOpt,
    SeReductionOpt,
    TrustCodeOpt,
    Variant,
    VariantOpt,
    kwargs_value,
    make_config,
    refuse_conversion_options,
)
from ._output import (
    Output,
)

EPILOG = """[bold]Examples[/]

  localify export deit_tiny --layers 1-4 -o deit_local.onnx

  localify export deit_local.safetensors -o deit_local.onnx --force

  localify export hf:./my-vit --variant localvit -o my_vit.onnx --dynamic batch
"""


class Dynamic(str, Enum):
    auto = "auto"
    batch = "batch"
    static = "static"


TargetArg = Annotated[str, typer.Argument(
    metavar="MODEL_OR_SAVED_FILE", show_default=False,
    help="A model source (timm name, hf:PATH, module:factory) to convert, or a file or directory written by "
         "'localify convert' / localify.save.",
)]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="The .onnx file to write.", show_default=False)]
DynamicOpt = Annotated[Dynamic, typer.Option(
    "--dynamic", rich_help_panel=OUTPUT_PANEL,
    help="auto: dynamic batch, and dynamic H/W (multiples of the patch) when the model accepts other sizes; "
         "batch: dynamic batch only; static: the traced shapes.",
)]
VerifyOpt = Annotated[bool, typer.Option(
    "--verify/--no-verify", rich_help_panel=OUTPUT_PANEL,
    help="Run the file with onnxruntime and compare with PyTorch before keeping it.",
)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]


def export(
    ctx: typer.Context,
    target: TargetArg,
    output: OutOpt,
    model_kwargs: ModelKwargsOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    layers: LayersOpt = "all",
    variant: VariantOpt = Variant.dwconv,
    kernel_size: KernelOpt = 3,
    act: ActOpt = Act.hswish,
    attention: AttentionOpt = None,
    se_hidden: SeHiddenOpt = None,
    se_reduction: SeReductionOpt = None,
    eca_kernel: EcaKernelOpt = None,
    dynamic: DynamicOpt = Dynamic.auto,
    verify: VerifyOpt = True,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    input_size: InputSizeOpt = None,
    example_inputs: ExampleInputsOpt = None,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Export a converted model to ONNX (the torch.export-based exporter). The converted blocks are fused
    first (BatchNorm folded, residual kernels merged); the batch is dynamic, and H/W too when the model accepts
    other sizes. With onnxruntime installed the file is checked against PyTorch before it is kept.

    [bold]MODEL[/]: built (with --pretrained / --checkpoint), converted with the conversion options, exported.
    [bold]SAVED_FILE[/]: loaded with localify.load (--checkpoint is the base checkpoint of a partial save).
    """
    out = Output(json_, quiet)
    spec = InputSpec(input_size, example_inputs)
    localify.check_export_path(output, force=force)  # before any work is done (the export checks again)
    if is_saved_path(target):
        refuse_conversion_options(ctx)
        with out.status(f"loading {target}"):
            model = localify.load(target, base_checkpoint=checkpoint, trust_code=trust_code)
    else:
        config = make_config(layers, variant, kernel_size, act, attention, se_hidden, se_reduction, eca_kernel)
        loaded = load_model(target, kwargs_value(model_kwargs), checkpoint, out, pretrained)
        model = loaded.model
        with out.status("tracing and converting"):
            localify.localify(model, config=config, example_inputs=spec.for_model(model))
    model.eval()
    mode = {"auto": True, "batch": "batch", "static": False}[dynamic.value]
    with out.status(f"exporting to {output}"):
        info = localify.export_onnx(model, output, spec.for_model(model), dynamic=mode, verify=verify if verify else False, force=force)
    out.show(str(info))
    out.emit({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(info).items()})
