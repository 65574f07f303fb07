"""``localify convert``: build a model, convert it, check its outputs and save it."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

import localify

from ._errors import (
    CheckFailedError,
)
from ._models import (
    load_model,
    num_params,
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
    ModelArg,
    ModelKwargsOpt,
    PretrainedOpt,
    QuietOpt,
    SeHiddenOpt,
    SeReductionOpt,
    Variant,
    VariantOpt,
    WeightSet,
    kwargs_value,
    make_config,
)
from ._output import (
    Output,
    fmt_diff,
    size_text,
    titled,
)

EPILOG = """[bold]Examples[/]

  localify convert deit_tiny --layers 1-4 -o deit_local.safetensors

  localify convert vit_small_patch16_224 --checkpoint vit_s.pth --layers early -o vit_s_local.pt

  HF_HUB_OFFLINE=1 localify convert deit_small --pretrained -o deit_s_local.pt   [dim](weights from the HF cache)[/]

  localify convert hf:./my-vit --variant residual -o my-vit-local/

  localify convert mymodels:t2t_vit_7 --model-kwargs '{"img_size": 224}' -o t2t_local.pt
"""

OutputOpt = Annotated[Path, typer.Option(
    "--output", "-o", metavar="OUT", rich_help_panel=OUTPUT_PANEL, show_default=False,
    help="model.pt or model.safetensors (one file), or a directory (Hugging Face models: the "
         "save_pretrained layout plus the recipe).",
)]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", rich_help_panel=OUTPUT_PANEL,
                                        help="Overwrite an existing OUT.")]
WeightsOpt = Annotated[WeightSet, typer.Option(
    "--weights", rich_help_panel=OUTPUT_PANEL,
    help="What to store: all weights, or only the locality weights / trainable ones (load those with the base "
         "checkpoint).",
)]
CheckOpt = Annotated[bool, typer.Option(
    "--check/--no-check", rich_help_panel=OUTPUT_PANEL,
    help="Run the original and the converted model at the traced size and compare their outputs.",
)]


def convert(
    model: ModelArg,
    *,
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
    output: OutputOpt,
    force: ForceOpt = False,
    weights: WeightsOpt = WeightSet.all,
    check: CheckOpt = True,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    input_size: InputSizeOpt = None,
    example_inputs: ExampleInputsOpt = None,
) -> None:
    """Convert MODEL into a LocalViT and save it to OUT.

    Traces the model, splices a depth-wise convolution into the MLP of every selected block, checks that the
    outputs did not change (dwconv / residual variants) and saves the weights with the recipe that rebuilds
    the model (localify.load, or 'localify verify OUT'). Nothing is written if any step fails; an existing
    OUT is kept unless --force.
    """
    out = Output(json_, quiet)
    config = make_config(layers, variant, kernel_size, act, attention, se_hidden, se_reduction, eca_kernel)
    kwargs = kwargs_value(model_kwargs)
    spec = InputSpec(input_size, example_inputs)
    localify.check_save_path(output, force=force)  # before any work is done (the save checks again)

    t0 = time.perf_counter()
    loaded = load_model(model, kwargs, checkpoint, out, pretrained)
    net = loaded.model
    with out.status(f"tracing {type(net).__name__}"):
        example = spec.for_model(net)
        plan = localify.find_mlps(net, example, layers=config.layers)
    t_trace = time.perf_counter() - t0
    original = copy.deepcopy(net) if check else None
    params_before = num_params(net)
    with out.status("converting"):
        localify.localify(net, plan=plan, config=config)
        plan = localify.conversion_plan(net)
    params_after = num_params(net)

    result = None
    if original is not None:
        with out.status(f"checking outputs at {size_text(plan.input_size)}"):
            check = localify.compare_outputs(original, net, localify.example_inputs(original, example=example))
        preserving = config.preserves_function
        ok = check.ok if preserving else None
        result = {"input_size": plan.input_size, "max_abs_diff": check.max_abs_diff,
                  "output_scale": check.output_scale, "preserving": preserving, "ok": ok}
        if preserving and not ok:
            raise CheckFailedError(
                f"output check failed: max |diff| {check.max_abs_diff:.3e} at {size_text(plan.input_size)} "
                f"exceeds {check.tolerance:g} x output scale {check.output_scale:.3e} for the function-preserving "
                f"variant {config.variant!r}; nothing was saved (--no-check saves anyway)"
            )
    with out.status(f"saving {output}"):
        path = localify.save(net, output, weights=weights.value, force=force)
    size = _size_on_disk(path)
    seconds = time.perf_counter() - t0

    sites = [_site_row(s) for s in plan.sites]
    out.emit({
        "model": loaded.requested,
        "source": loaded.resolved,
        "weights": loaded.weights,
        "output": str(path),
        "bytes": size,
        "config": config.to_dict(),
        "num_blocks": plan.num_blocks,
        "converted": sorted({s["block"] for s in sites if s["result"] == "converted"}),
        "skipped": [s for s in sites if s["result"] == "skipped"],
        "sites": sites,
        "parameters": {"before": params_before, "after": params_after},
        "check": result,
        "seconds": {"trace": round(t_trace, 3), "total": round(seconds, 3)},
    })
    out.show(_blocks_table(plan, sites), _summary_table(
        loaded, path, size, params_before, params_after, result, config.variant, seconds))


def _site_row(s: localify.MLPSite) -> dict:
    if not s.selected:
        result = "not selected"
    elif s.status == localify.SiteStatus.LOCALIFIED:
        result = "converted"
    else:
        result = "skipped"
    return {"block": s.block, "path": s.path, "tokens": s.tokens.describe() if s.tokens else None,
            "result": result, "status": s.status, "reason": "" if result == "converted" else s.reason}


def _blocks_table(plan: localify.Plan, sites: list[dict]) -> Group:
    n_conv = sum(r["result"] == "converted" for r in sites)
    n_skip = sum(r["result"] == "skipped" for r in sites)
    t = Table()
    t.add_column("block", justify="right")
    t.add_column("module", overflow="fold")
    t.add_column("tokens")
    t.add_column("result", overflow="fold", ratio=1)
    style = {"converted": "green", "skipped": "yellow", "not selected": "dim"}
    for r in sites:
        text = r["result"] if r["result"] != "skipped" else f"skipped ({r['status']}): {r['reason']}"
        t.add_row(str(r["block"]), Text(r["path"]), Text(r["tokens"] or "-"), Text(text), style=style[r["result"]])
    return titled(f"{plan.model}: {n_conv} MLP(s) converted, {n_skip} skipped, {plan.num_blocks} block(s)", t)


def _summary_table(loaded, path: Path, size: int, before: int, after: int, check: dict | None, variant: str,
                   seconds: float) -> Table:
    t = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    name = loaded.resolved if loaded.resolved == loaded.requested else f"{loaded.requested} -> {loaded.resolved}"
    t.add_row("model", Text(name))
    t.add_row("weights", Text(loaded.weights))
    t.add_row("parameters", f"{before:,} -> {after:,} (+{after - before:,})")
    if check is None:
        t.add_row("output check", "skipped (--no-check)")
    else:
        line = Text(f"max |diff| {fmt_diff(check['max_abs_diff'])} at {size_text(check['input_size'])}")
        if check["preserving"]:
            line.append(f" (output scale {check['output_scale']:.3g}) ")
            line.append("ok" if check["ok"] else "FAILED", style="green" if check["ok"] else "red")
        else:
            line.append(f": variant {variant} is not function-preserving (expected; it is meant for training)")
        t.add_row("output check", line)
    t.add_row("saved", Text(f"{path} ({size / 2**20:.1f} MiB)"))
    t.add_row("time", f"{seconds:.1f} s")
    return t


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
