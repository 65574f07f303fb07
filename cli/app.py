"""The ``localify`` command: one typer app joining the command modules."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

import localify

from . import bench, convert, export, inspection, verify
from ._errors import LocalifyGroup

app = typer.Typer(
    name="localify",
    cls=LocalifyGroup,
    help="Turn any Vision Transformer into a LocalViT: find its MLPs, splice in a depth-wise convolution, "
         "check and save.\n\n"
    "MODEL is a timm name or unique prefix (deit_tiny), [bold]hf:PATH_OR_ID[/] (a Hugging Face model from a "
    "local directory or the cache, offline) or [bold]module.path:factory[/] (your own model code).",
    epilog="Exit codes: 0 ok, 1 error (one red line; LOCALIFY_DEBUG=1 shows the traceback), 2 usage error.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)



def _help(fn) -> str:
    """A command's docstring as help text: paragraphs reflowed (typer's rich mode keeps single newlines)."""
    text = inspect.cleandoc(fn.__doc__ or "")
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


for _name, _module, _fn in (("convert", convert, convert.convert), ("inspect", inspection, inspection.inspect),
                            ("verify", verify, verify.verify), ("bench", bench, bench.bench),
                            ("export", export, export.export)):
    app.command(_name, help=_help(_fn), epilog=_module.EPILOG)(_fn)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"localify {localify.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    pass


def main() -> None:
    """Entry point of the ``localify`` console script."""
    app(prog_name="localify")
