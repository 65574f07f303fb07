"""Path rules shared by everything that writes or reads files: one check for an output path (``save``,
``export_onnx``, the CLI) and one for an input file (never open a FIFO or a device, which can block forever).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .errors import LocalifyError, SavedModelError

__all__ = ["check_output_path", "check_input_file", "file_kind"]


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def check_output_path(
    path: str | os.PathLike,
    *,
    suffixes: Sequence[str],
    directory: str | None = None,
    force: bool = False,
    error: type[LocalifyError] = SavedModelError,
) -> Path:
    """The output path, checked before anything is computed or written; raises ``error`` otherwise.

    The output is one file when the name ends in one of ``suffixes`` (e.g. ``(".safetensors", ".pt")``).
    With ``directory`` (the name of the file that marks a directory this tool wrote, e.g.
    ``"localify_recipe.json"``) a name without a suffix, or an existing directory, is a directory output;
    otherwise the name must end in one of ``suffixes``. Refused: an empty name, a parent that is a file or
    does not exist or is not writable, an unknown suffix, an existing output without ``force``, an existing
    output of the other kind (or a FIFO, a device), and a non-empty directory that does not hold ``directory``
    (even with ``force``: replacing it would delete files this tool did not write).
    """
    text = os.fspath(path)
    if not text.strip():
        raise error("the output path is empty; give a file name such as model.safetensors"
                    + (" or a directory name" if directory else ""))
    p = Path(text)
    if p.name in ("", ".", ".."):
        raise error(f"the output path {text!r} names a directory, not an output; give a new name inside it, "
                    f"such as {str(p / ('model' + suffixes[0]))!r}")
    as_file = p.suffix in suffixes
    as_dir = not as_file and directory is not None and (p.suffix == "" or p.is_dir())
    if not as_file and not as_dir:
        kinds = " or ".join(f"model{s}" for s in suffixes)
        raise error(f"{text!r}: unknown output kind {p.suffix!r}; write {kinds} (one file)"
                    + (" or a directory (a name without a suffix)" if directory else ""))

    parent = p.parent
    first = next((a for a in (parent, *parent.parents) if a.exists()), None)
    if first is not None and not first.is_dir():
        raise error(f"cannot write {p}: {first} is a file, not a directory")
    if first != parent:
        raise error(f"cannot write {p}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write {p}: directory {parent} is not writable")

    if not (p.exists() or p.is_symlink()):
        return p
    mode = (os.stat(p) if p.exists() else os.lstat(p)).st_mode  # a dangling symlink: the link itself
    if as_dir:
        if not stat.S_ISDIR(mode):
            raise error(f"{p} exists and is a {file_kind(mode)}, not a directory written by localify; refusing "
                        f"to replace it; choose another output")
        if any(p.iterdir()) and not (p / directory).is_file():
            raise error(f"{p} is a non-empty directory that does not hold a model saved by localify (no "
                        f"{directory}); refusing to replace it even with force; choose another output")
    elif not stat.S_ISREG(mode):
        raise error(f"{p} exists and is a {file_kind(mode)}, not a regular file; refusing to replace it; "
                    f"choose another output")
    if not force:
        raise error(f"{p} already exists; pass force=True (--force) to overwrite it")
    return p


def check_input_file(path: str | os.PathLike, *, what: str, error: type[LocalifyError]) -> os.stat_result:
    """``os.stat`` of an input file that must exist and be a regular file (following symlinks).

    Opening a FIFO blocks until a writer appears, and a device can stream forever: both are refused before
    anything opens them."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is a {file_kind(st.st_mode)}, not a regular file; give a file")
    if not os.access(path, os.R_OK):
        raise error(f"cannot read {what} {path}: permission denied")
    return st
