"""Layer-selection policy: which transformer blocks to convert."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from .errors import LayerSpecError

__all__ = ["parse_layers"]

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: str | int | Iterable[int] | None, num_blocks: int) -> list[int]:
    """Turn a layer specification into the sorted list of selected 1-based block numbers.

    ``spec`` is ``"all"`` (or ``None``), ``"early"`` (the first third of the blocks, the paper's best
    placement), ``"late"`` (the last third), a comma-separated list of 1-based inclusive ranges such as
    ``"1-4"`` or ``"1,3,5-6"``, a single int, or an iterable of ints.

    Example::

        >>> parse_layers("1,3,5-6", 12)
        [1, 3, 5, 6]
    """
    if num_blocks < 1:
        raise LayerSpecError("the model has no transformer blocks to select from")
    valid = f"valid block numbers are 1-{num_blocks}"
    if spec is None:
        return list(range(1, num_blocks + 1))
    if isinstance(spec, bool):
        raise LayerSpecError(f"layers={spec!r} is not a layer specification; {valid}")
    if isinstance(spec, int):
        spec = [spec]
    if not isinstance(spec, str):
        try:
            picked = sorted({int(i) for i in spec})
        except (TypeError, ValueError):
            raise LayerSpecError(f"layers={spec!r} is not a list of block numbers; {valid}") from None
        return _check_range(picked, num_blocks, spec)

    text = spec.strip().lower()
    third = max(1, math.ceil(num_blocks / 3))
    if text in ("all", "*", ""):
        return list(range(1, num_blocks + 1))
    if text == "early":
        return list(range(1, third + 1))
    if text == "late":
        return list(range(num_blocks - third + 1, num_blocks + 1))

    picked: set[int] = set()
    for part in text.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise LayerSpecError(
                f"cannot parse layers={spec!r} (bad part {part.strip()!r}); use 'all', 'early', 'late', "
                f"or 1-based ranges such as '1-4' or '1,3,5-6'; {valid}"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise LayerSpecError(f"layers={spec!r}: range {lo}-{hi} is reversed; {valid}")
        picked.update(range(lo, hi + 1))
    return _check_range(sorted(picked), num_blocks, spec)


def _check_range(picked: list[int], num_blocks: int, spec: object) -> list[int]:
    bad = [i for i in picked if not 1 <= i <= num_blocks]
    if bad:
        raise LayerSpecError(
            f"layers={spec!r} selects block(s) {_ranges(bad)} but the model has {num_blocks} transformer blocks; "
            f"valid block numbers are 1-{num_blocks}"
        )
    if not picked:
        raise LayerSpecError(f"layers={spec!r} selects no block; valid block numbers are 1-{num_blocks}")
    return picked


def _ranges(nums: list[int]) -> str:
    """[13, 14, 15, 20] -> '13-15, 20'."""
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)
