"""Layer-selection policy: which transformer blocks to convert."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from numbers import Integral

from .errors import LayerSpecError

__all__ = ["parse_layers", "format_ranges"]

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: str | int | Iterable[int] | None, num_blocks: int | None) -> list[int]:
    """Turn a layer specification into the sorted list of selected 1-based block numbers.

    ``spec`` is ``"all"`` (or ``None``), ``"early"`` (the first third of the blocks, the paper's best
    placement), ``"late"`` (the last third), a comma-separated list of 1-based inclusive ranges such as
    ``"1-4"`` or ``"1,3,5-6"``, a single int, or an iterable of ints (bools and floats are refused). With
    ``num_blocks=None`` only the syntax is checked and ``"all"``/``"early"``/``"late"`` give ``[]``.

    Example::

        >>> parse_layers("1,3,5-6", 12)
        [1, 3, 5, 6]
    """
    valid = f"; valid block numbers are 1-{num_blocks}" if num_blocks is not None else ""
    if num_blocks is not None and num_blocks < 1:
        raise LayerSpecError("the model has no transformer blocks to select from")
    if spec is None:
        spec = "all"
    if _is_int(spec):
        spec = [spec]
    if not isinstance(spec, str):
        try:
            if isinstance(spec, (bool, bytes, bytearray)):
                raise TypeError
            items = list(spec)
        except TypeError:  # not iterable (a float, a 0-d array) or bytes (which iterate as ints)
            raise LayerSpecError(f"layers={spec!r} is not a layer specification{valid}") from None
        bad = [i for i in items if not _is_int(i)]
        if bad:
            raise LayerSpecError(f"layers={spec!r} holds {bad[0]!r}, not a block number: give whole numbers "
                                 f"such as [1, 2, 5]{valid}")
        return _check_range(sorted({int(i) for i in items}), num_blocks, spec)

    text = spec.strip().lower()
    if text in ("all", "*", "", "early", "late"):
        if num_blocks is None:
            return []
        third = max(1, math.ceil(num_blocks / 3))
        return {"early": list(range(1, third + 1)),
                "late": list(range(num_blocks - third + 1, num_blocks + 1))}.get(text, list(range(1, num_blocks + 1)))
    picked: set[int] = set()
    for part in text.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise LayerSpecError(
                f"cannot parse layers={spec!r} (bad part {part.strip()!r}); use 'all', 'early', 'late', "
                f"or 1-based ranges such as '1-4' or '1,3,5-6'{valid}"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise LayerSpecError(f"layers={spec!r}: range {lo}-{hi} is reversed{valid}")
        picked.update(range(lo, hi + 1))
    return _check_range(sorted(picked), num_blocks, spec)


def _is_int(v: object) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _check_range(picked: list[int], num_blocks: int | None, spec: object) -> list[int]:
    top = num_blocks if num_blocks is not None else float("inf")
    bad = [i for i in picked if not 1 <= i <= top]
    if bad and num_blocks is None:
        raise LayerSpecError(f"layers={spec!r} selects block(s) {format_ranges(bad)}; block numbers start at 1")
    if bad:
        raise LayerSpecError(
            f"layers={spec!r} selects block(s) {format_ranges(bad)} but the model has {num_blocks} transformer "
            f"blocks; valid block numbers are 1-{num_blocks}"
        )
    if not picked:
        raise LayerSpecError(f"layers={spec!r} selects no block; valid block numbers are 1-{num_blocks}"
                             if num_blocks is not None else f"layers={spec!r} selects no block")
    return picked


def format_ranges(nums: Iterable[int]) -> str:
    """Block numbers as ranges, the inverse of :func:`parse_layers`: ``[1, 2, 3, 4, 6]`` -> ``'1-4,6'``."""
    nums = sorted(set(nums))
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)
