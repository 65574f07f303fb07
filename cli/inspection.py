"""``localify inspect``: every MLP of a model, its tokens, and whether it would be converted (a dry run).

(Not named inspect.py: a module of that name would shadow the standard library's ``inspect`` wherever
this folder itself lands on ``sys.path``.)
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

import localify

from ._models import (
    load_model,
)
from ._options import (
    CheckpointOpt,
    ExampleInputsOpt,
    InputSizeOpt,
    InputSpec,
    JsonOpt,
    LayersOpt,
    ModelArg,
    ModelKwargsOpt,
    PretrainedOpt,
    QuietOpt,
    kwargs_value,
    layers_value,
)
from ._output import (
    Output,
    size_text,
    titled,
)

EPILOG = """[bold]Examples[/]

  localify inspect deit_tiny

  localify inspect swin_tiny_patch4_window7_224 --layers early

  localify inspect hf:./my-vit --json
"""


def inspect(
    model: ModelArg,
    model_kwargs: ModelKwargsOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    layers: LayersOpt = "all",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    input_size: InputSizeOpt = None,
    example_inputs: ExampleInputsOpt = None,
) -> None:
    """List every transformer MLP of MODEL: block, module, dims, activation, tokens, and whether --layers
    selects it or why it is skipped. Nothing is changed.

    Tokens read PREFIX+ROWSxCOLS(+SUFFIX) at the traced input size: prefix tokens (class, distillation,
    registers) and suffix tokens (detection) skip the depth-wise convolution.
    """
    out = Output(json_, quiet)
    layers = layers_value(layers)
    spec = InputSpec(input_size, example_inputs)
    loaded = load_model(model, kwargs_value(model_kwargs), checkpoint, out, pretrained)
    with out.status(f"tracing {type(loaded.model).__name__}"):
        plan = localify.find_mlps(loaded.model, spec.for_model(loaded.model), layers=layers)

    data = {"model": loaded.requested, "source": loaded.resolved, "layers_spec": layers, **plan.to_dict()}
    for site in data["sites"]:
        site["will_convert"] = bool(site["selected"] and site["status"] == "convertible")
    out.emit(data)
    out.show(_table(plan, loaded.resolved, layers))


def _table(plan: localify.Plan, name: str, layers: str) -> Group:
    n_sel = sum(s.selected for s in plan.sites)
    n_ok = len(plan.convertible())
    title = (f"{name} ({plan.model}): {len(plan.sites)} MLP(s) in {plan.num_blocks} block(s), input "
             f"{size_text(plan.input_size)}; --layers {layers}: {n_sel} selected, {n_ok} convertible")
    t = Table()
    t.add_column("", width=1)
    t.add_column("block", justify="right")
    t.add_column("module", overflow="fold")
    t.add_column("dims", overflow="fold")
    t.add_column("act")
    t.add_column("tokens")
    t.add_column("status", overflow="fold", ratio=1)
    for s in plan.sites:
        tokens = f"{s.tokens.layout} {s.tokens.describe()}" if s.tokens else "-"
        status = s.status if s.convertible or not s.reason else f"{s.status}: {s.reason}"
        style = "green" if s.selected and s.convertible else ("dim" if not s.selected else "yellow")
        t.add_row("*" if s.selected else "", str(s.block), Text(s.path or "(model)"),
                  f"{s.in_features}->{s.hidden_features}->{s.out_features}", Text(s.activation), Text(tokens),
                  Text(status), style=style)
    return titled(title, t, "* selected by --layers; tokens: layout prefix+rows x cols(+suffix) at the traced size")
