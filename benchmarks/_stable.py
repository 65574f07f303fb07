"""Stable CPU timings: keep glibc from returning large tensors' memory to the kernel after every op.

With glibc's default malloc, every large tensor is a fresh mmap whose pages the kernel zeroes on first touch;
on a small VM that system time dominates and swings between runs (seen here: the same model at 199 ms or
270 ms per batch depending on the process). Raising the mmap and trim thresholds reuses freed memory, as
jemalloc / tcmalloc would. The scripts re-execute themselves once with these settings (both models of a
comparison run in that same process); set LOCALIFY_BENCH_RAW=1 to measure with the default allocator.
"""

from __future__ import annotations

import os
import sys
import time

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def stable_allocator() -> None:
    if os.environ.get("LOCALIFY_BENCH_RAW") == "1" or "GLIBC_TUNABLES" in os.environ:
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])


# "cpu": the process's CPU time, steadier than the wall clock on a machine other jobs share (time spent
# waiting for a core is left out); meaningful with one thread (with more, idle spinning threads count too).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def per_call(model, x, iters: int, clock=time.perf_counter) -> float:
    """Mean seconds per ``model(x)`` over ``iters`` back-to-back calls (the caller sets the grad mode)."""
    t = clock()
    for _ in range(iters):
        model(x)
    return (clock() - t) / iters


def rotating_rounds(items: dict, rounds: int):
    """The (name, item) pairs of every round of an interleaved benchmark, each round starting one item further
    along, so that no model is always timed right after the same one (at batch 1 the position in the round
    moved a ratio by a few %)."""
    pairs = list(items.items())
    for r in range(rounds):
        k = r % len(pairs)
        yield pairs[k:] + pairs[:k]
