"""``localify bench``: latency of the original and the converted model, measured in the same run."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Annotated

import torch
import typer
from rich.table import Table
from torch import nn

import localify

from ._models import (
    load_model,
)
from ._options import (
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
    kwargs_value,
    make_config,
)
from ._output import (
    Output,
    size_text,
    titled,
)

EPILOG = """[bold]Examples[/]

  localify bench deit_tiny --layers 1-4

  localify bench vit_small_patch16_224 --batch 1 --batch 16 --threads 4 --json
"""

BENCH_PANEL = "Benchmark"
BatchOpt = Annotated[list[int] | None, typer.Option(
    "--batch", "-b", min=1, metavar="N", rich_help_panel=BENCH_PANEL,
    help="Batch size; repeat for several (default 1).",
)]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", "-t", min=1, metavar="N", rich_help_panel=BENCH_PANEL,
    help="CPU threads for torch (default: torch's current setting).",
)]
RoundsOpt = Annotated[int, typer.Option(
    "--rounds", "-r", min=1, rich_help_panel=BENCH_PANEL,
    help="Interleaved rounds per batch size; the table shows medians.",
)]
TARGET_SECONDS = 0.05  # each timed run of a round lasts about this long (at least one forward pass)


def bench(
    model: ModelArg,
    model_kwargs: ModelKwargsOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    batch: BatchOpt = None,
    threads: ThreadsOpt = None,
    rounds: RoundsOpt = 10,
    layers: LayersOpt = "all",
    variant: VariantOpt = Variant.dwconv,
    kernel_size: KernelOpt = 3,
    act: ActOpt = Act.hswish,
    attention: AttentionOpt = None,
    se_hidden: SeHiddenOpt = None,
    se_reduction: SeReductionOpt = None,
    eca_kernel: EcaKernelOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    input_size: InputSizeOpt = None,
    example_inputs: ExampleInputsOpt = None,
) -> None:
    """Time the original and the converted MODEL (inference mode, CPU, the traced input size).

    Each round runs the original and then the converted model back to back, so machine noise hits both; the
    table shows the median latency of each and their ratio (converted / original).
    """
    out = Output(json_, quiet)
    config = make_config(layers, variant, kernel_size, act, attention, se_hidden, se_reduction, eca_kernel)
    loaded = load_model(model, kwargs_value(model_kwargs), checkpoint, out, pretrained)
    batches = batch or [1]
    with out.status(f"tracing {type(loaded.model).__name__}"):
        example = InputSpec(input_size, example_inputs).for_model(loaded.model)
        plan = localify.find_mlps(loaded.model, example, layers=config.layers)
    original = copy.deepcopy(loaded.model)
    converted = localify.localify(loaded.model, plan=plan, config=config)
    plan = localify.conversion_plan(converted)

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = []
        with out.progress() as bar:
            task = bar.add_task("timing", total=len(batches) * rounds)
            for b in batches:
                bar.update(task, description=f"batch {b}")
                rows.append(_bench_batch(original, converted, example, b, rounds, lambda: bar.advance(task)))
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)

    blocks = sorted({s.block for s in plan.sites if s.status == "localified"})
    out.emit({"model": loaded.requested, "source": loaded.resolved, "variant": config.variant,
              "layers": config.layers, "converted_blocks": blocks, "threads": used_threads,
              "input_size": plan.input_size, "rounds": rounds, "results": rows})
    t = Table()
    for name in ("batch", "original ms", "converted ms", "ratio"):
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(str(r["batch"]), f"{r['original_ms']:.2f}", f"{r['converted_ms']:.2f}", f"{r['ratio']:.3f}")
    out.show(titled(f"{loaded.resolved}, variant {config.variant}, {len(blocks)} block(s) converted, "
                    f"{used_threads} thread(s), {size_text(plan.input_size)}", t,
                    f"medians of {rounds} interleaved round(s), inference mode; ratio = converted / original"))


def _time(model: nn.Module, args: tuple, kwargs: dict, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        model(*args, **kwargs)
    return (time.perf_counter() - t) / iters


def _bench_batch(original: nn.Module, converted: nn.Module, example, batch: int, rounds: int, step) -> dict:
    ex = localify.example_inputs(original, example=example)
    args, kwargs = _rebatch(ex.args, batch), {k: _rebatch(v, batch) for k, v in ex.kwargs.items()}
    with torch.inference_mode():
        single = min(_time(m, args, kwargs, 1) for m in (original, converted, original, converted))  # warm-up
        iters = max(1, min(100, round(TARGET_SECONDS / max(single, 1e-6))))
        t_orig, t_conv = [], []
        for _ in range(rounds):
            t_orig.append(_time(original, args, kwargs, iters))
            t_conv.append(_time(converted, args, kwargs, iters))
            step()
    mo, mc = statistics.median(t_orig), statistics.median(t_conv)
    return {"batch": batch, "original_ms": mo * 1e3, "converted_ms": mc * 1e3, "ratio": mc / mo,
            "iterations": iters}


def _rebatch(x, batch: int):
    """The example input with ``batch`` rows (the example has 2)."""
    if isinstance(x, tuple):
        return tuple(_rebatch(v, batch) for v in x)
    if isinstance(x, torch.Tensor) and x.dim() >= 1:
        reps = -(-batch // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous()
    return x
