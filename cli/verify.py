"""``localify verify``: does a converted model compute what the original computes, and does it export?"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text
from torch import nn

import localify
from localify.errors import SavedModelError

from ._errors import (
    CheckFailedError,
    one_line,
)
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
    SizeOpt,
    TolOpt,
    TrustCodeOpt,
    Variant,
    VariantOpt,
    kwargs_value,
    make_config,
    refuse_conversion_options,
    sizes_value,
)
from ._output import (
    Output,
    fmt_diff,
    size_text,
    titled,
)

EPILOG = """[bold]Examples[/]

  localify verify deit_tiny --layers 1-4

  localify verify deit_local.safetensors

  localify verify hf:./my-vit --size 224 --size 160x288

  localify verify my-vit-local/ --json
"""

TargetArg = Annotated[str, typer.Argument(
    metavar="MODEL_OR_SAVED_FILE", show_default=False,
    help="A model source (as for convert: timm name, hf:PATH, module:factory) to convert afresh, or a file or "
         "directory written by 'localify convert' / localify.save.",
)]
ExportOpt = Annotated[bool, typer.Option(
    "--export/--no-export", rich_help_panel=OUTPUT_PANEL,
    help="Also export the converted model with torch.export and compare the exported graph with eager.",
)]


def verify(
    ctx: typer.Context,
    target: TargetArg,
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
    size: SizeOpt = None,
    tol: TolOpt = 1e-4,
    export: ExportOpt = True,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    input_size: InputSizeOpt = None,
    example_inputs: ExampleInputsOpt = None,
    trust_code: TrustCodeOpt = False,
) -> None:
    """Check a conversion: max |difference| between the converted and the original model at one or more input
    sizes, and equality of the torch.export graph of the converted model with eager. Exit code 1 if a
    check fails.

    [bold]MODEL[/] (a source): the model is built (with --pretrained / --checkpoint), converted with the
    conversion options and compared with its unconverted copy.

    [bold]SAVED_FILE[/]: the model is loaded with localify.load (--checkpoint is the base checkpoint of a
    save with --weights locality/trainable). The original is rebuilt from the recipe and given the saved
    model's own weights minus what localify added (each wrapped fc1 is its .linear), so the check tells
    whether the file still computes what its base computes: true right after conversion, no longer once the
    locality weights were trained. The localvit variant changes the function: only the export is checked.
    """
    out = Output(json_, quiet)
    sizes = sizes_value(size)
    spec = InputSpec(input_size, example_inputs)
    if is_saved_path(target):
        refuse_conversion_options(ctx)
        if not Path(target).exists():
            hint = f" (a Hugging Face model is given as hf:{target})" if "/" in target and not Path(target).suffix else ""
            raise SavedModelError(f"{target} does not exist{hint}")
        original, converted, variant_name, plan, info = _from_file(target, checkpoint, out, spec, trust_code)
    else:
        config = make_config(layers, variant, kernel_size, act, attention, se_hidden, se_reduction, eca_kernel)
        original, converted, plan, info = _from_model(target, kwargs_value(model_kwargs), checkpoint, pretrained, config, out,
                                                     spec)
        variant_name = config.variant

    preserving = localify.get_variant(variant_name).preserves_function
    example = spec.for_model(original)
    traced = plan.input_size
    sizes = sizes or [s for s in (traced, plan.second_size) if s]
    rows: list[dict] = []
    with out.progress() as bar:
        task = bar.add_task("comparing", total=len(sizes) + int(export))
        for sz in sizes:
            bar.update(task, description=f"comparing at {size_text(sz)}")
            if preserving or info["kind"] == "model":
                rows.append(_output_check(original, converted, example, sz, preserving, variant_name, tol))
            else:  # the rebuilt base does not hold the weights the localvit blocks were made from
                rows.append(_row("outputs vs original", sz, note=f"not checked: variant {variant_name} is not "
                                                                 f"function-preserving"))
            bar.advance(task)
        if export:
            bar.update(task, description="torch.export")
            rows.append(_export_check(original, converted, example, traced, tol))
            bar.advance(task)

    ok = all(r["ok"] is not False for r in rows)
    out.emit({**info, "variant": variant_name, "preserving": preserving, "tolerance": tol, "checks": rows,
              "ok": ok})
    out.show(_table(info, rows, tol))
    if not ok:
        failed = "; ".join(f"{r['check']} at {size_text(r['input_size'])}: "
                           f"{r['note'] or 'max |diff| ' + fmt_diff(r['max_abs_diff'])}"
                           for r in rows if r["ok"] is False)
        raise CheckFailedError(f"verification failed: {failed}")


def _from_model(text: str, kwargs: dict, checkpoint, pretrained: bool, config: localify.LocalifyConfig,
                out: Output, spec: InputSpec):
    loaded = load_model(text, kwargs, checkpoint, out, pretrained)
    with out.status(f"tracing {type(loaded.model).__name__}"):
        plan = localify.find_mlps(loaded.model, spec.for_model(loaded.model), layers=config.layers)
    original = copy.deepcopy(loaded.model)
    with out.status("converting"):
        converted = localify.localify(loaded.model, plan=plan, config=config)
    plan = localify.conversion_plan(converted)
    blocks = sorted({s.block for s in plan.sites if s.status == localify.SiteStatus.LOCALIFIED})
    info = {"target": text, "kind": "model", "source": loaded.resolved, "weights": loaded.weights,
            "converted_blocks": blocks}
    return original, converted, plan, info


def _from_file(path: str, checkpoint, out: Output, spec: InputSpec, trust_code: bool):
    recipe = localify.read_recipe(path)
    with out.status(f"loading {path}"):
        converted = localify.load(path, base_checkpoint=checkpoint, trust_code=trust_code)
    variant = recipe["config"]["variant"]
    src = localify.ModelSource.from_dict(recipe["base"])
    with out.status(f"rebuilding the base model {src.describe()}"):
        torch.manual_seed(0)
        original = localify.create_model(src).eval()
        base = localify.base_state_dict(converted)
        if base is not None:
            localify.load_checkpoint(original, base)
    with out.status(f"tracing {type(original).__name__}"):
        plan = localify.find_mlps(original, spec.for_model(original))
    info = {"target": path, "kind": "saved", "source": src.describe(),
            "saved_by": recipe.get("versions", {}).get("localify"), "format_version": recipe["format_version"],
            "weights": recipe.get("weights", "all"), "fused": bool(recipe.get("fused")),
            "converted_blocks": sorted({s["block"] for s in recipe["sites"]})}
    return original, converted, variant, plan, info


def _row(check: str, size: Any, diff: float | None = None, scale: float | None = None, ok: bool | None = None,
         note: str = "") -> dict:
    return {"check": check, "input_size": list(size) if size else None, "max_abs_diff": diff,
            "output_scale": scale, "ok": ok, "note": note}


def _output_check(original: nn.Module, converted: nn.Module, example, size, preserving: bool, variant: str,
                  tol: float) -> dict:
    try:
        check = localify.compare_outputs(original, converted, localify.example_inputs(original, size, example),
                                         tol=tol)
    except Exception as e:  # noqa: BLE001 - a size the model refuses is a failed check, with its reason
        return _row("outputs vs original", size, ok=False, note=f"{type(e).__name__}: {one_line(e)[:200]}")
    if not preserving:
        return _row("outputs vs original", size, check.max_abs_diff, check.output_scale, None,
                    f"expected: variant {variant} is not function-preserving")
    return _row("outputs vs original", size, check.max_abs_diff, check.output_scale, check.ok)


def _export_check(original: nn.Module, converted: nn.Module, example, traced, tol: float) -> dict:
    try:
        ex = localify.example_inputs(original, traced, example)
        program = torch.export.export(converted, ex.args, ex.kwargs, strict=False)
        check = localify.compare_outputs(converted, program.module(), ex, tol=tol)
    except Exception as e:  # noqa: BLE001
        return _row("export vs eager", traced, ok=False,
                    note=f"export failed: {type(e).__name__}: {one_line(e)[:200]}")
    return _row("export vs eager", traced, check.max_abs_diff, check.output_scale, check.ok)


def _table(info: dict, rows: list[dict], tol: float) -> Group:
    what = info["target"] if info["kind"] == "model" else f"{info['target']} (base {info['source']})"
    t = Table()
    t.add_column("check")
    t.add_column("input")
    t.add_column("max |diff|", justify="right")
    t.add_column("output scale", justify="right")
    t.add_column("result", overflow="fold", ratio=1)
    for r in rows:
        if r["ok"] is None:
            res = Text(r["note"] or "-", style="dim")
        elif r["ok"]:
            res = Text("ok" + (" (exact)" if r["max_abs_diff"] == 0 else ""), style="green")
        else:
            res = Text("FAILED" + (f": {r['note']}" if r["note"] else ""), style="red")
        t.add_row(r["check"], size_text(r["input_size"]),
                  "-" if r["max_abs_diff"] is None else fmt_diff(r["max_abs_diff"]),
                  "-" if r["output_scale"] is None else f"{r['output_scale']:.3g}", res)
    return titled(f"verify {what}: converted block(s) {_blocks(info['converted_blocks'])}", t,
                  f"pass: max |diff| <= {tol:g} x max(1, output scale)")


def _blocks(blocks: list[int]) -> str:
    return localify.format_ranges(blocks) if blocks else "none"
