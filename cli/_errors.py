"""Errors on the command line: library errors and failures as one line and exit 1, usage errors as one line and
exit 2, in one place. ``LOCALIFY_DEBUG=1`` adds the traceback. Library chatter (warnings, transformers' logging
and progress bars) is silenced while a command runs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

try:  # typer >= 0.24 vendors click
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer uses click itself
    import click

from localify import LocalifyError

DEBUG_ENV = "LOCALIFY_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------------- errors
class CheckFailedError(LocalifyError):
    """A check run by the command line (output check at conversion, ``verify``) did not pass."""


class LocalifyGroup(TyperGroup):
    """The command group: runs a command with library chatter silenced and maps its errors to exit codes."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            # without standalone mode click returns an Exit's code instead of exiting
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # no command: the help
            typer.echo(e.ctx.get_help(), err=True)
            sys.exit(2)
        except click.exceptions.UsageError as e:  # one line, not typer's box; exit 2
            _usage(e)
            sys.exit(2)
        except typer.Exit as e:
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        except click.exceptions.ClickException as e:
            typer.echo(f"error: {one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

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


def _usage(e: click.exceptions.UsageError) -> None:
    """A usage error as one ``error:`` line and a hint, on stderr."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    msg = one_line(e.format_message())
    if isinstance(e, click.exceptions.BadParameter) and e.param_hint and not msg.startswith("Invalid value"):
        msg = f"{e.param_hint}: {msg}"
    err.print(Text.assemble(("error: ", "bold red"), (msg, "red")))
    path = e.ctx.command_path if e.ctx is not None else "localify"
    err.print(Text(f"try '{path} --help'", style="dim"))


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
