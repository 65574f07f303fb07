"""Runtime overhead of a conversion, measured against the original model in the same, interleaved run.

    python benchmarks/bench_overhead.py                      # deit_tiny, default variant, batch 1 and 16
    python benchmarks/bench_overhead.py --model deit_small_patch16_224 --batches 1 8 --threads 2
    python benchmarks/bench_overhead.py --kw class_token=False --kw global_pool="'avg'"   # no extra tokens

Each round times the original and the converted model back to back (inference mode, 224x224, random
weights), so machine noise hits both; the table shows medians over rounds and their ratio.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import statistics
import sys
import warnings

import timm
import torch

import localify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stable import per_call, stable_allocator  # noqa: E402


def bench(model_name: str, batches: list[int], threads: int, rounds: int, variant: str, layers: str,
          model_kwargs: dict | None = None) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False, **(model_kwargs or {})).eval()
    conv = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(conv, layers=layers, variant=variant)
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, 224, 224)
            iters = max(2, 16 // b)
            for m in (base, conv):  # warm-up
                per_call(m, x, 2)
            tb, tc = [], []
            for _ in range(rounds):
                tb.append(per_call(base, x, iters))
                tc.append(per_call(conv, x, iters))
            mb, mc = statistics.median(tb), statistics.median(tc)
            rows.append({"batch": b, "original_ms": mb * 1e3, "converted_ms": mc * 1e3, "ratio": mc / mb,
                         "ratio_of_min": min(tc) / min(tb),
                         "ratio_paired": statistics.median(c / o for c, o in zip(tc, tb))})
    return rows


def main() -> None:
    stable_allocator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--variant", default="dwconv")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                    help="timm.create_model keyword (VALUE is a Python literal), e.g. class_token=False")
    args = ap.parse_args()
    kwargs = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.kw)}
    rows = bench(args.model, args.batches, args.threads, args.rounds, args.variant, args.layers, kwargs)
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    print(f"{args.model}{extra}, variant={args.variant}, layers={args.layers}, {args.threads} threads, 224x224, "
          f"inference, medians of {args.rounds} interleaved rounds")
    print(f"{'batch':>5} {'original ms':>12} {'converted ms':>13} {'ratio':>7} {'min/min':>8} {'paired':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['original_ms']:>12.2f} {r['converted_ms']:>13.2f} {r['ratio']:>7.3f} "
              f"{r['ratio_of_min']:>8.3f} {r['ratio_paired']:>7.3f}")
    print("ratio: of the medians; min/min: of the fastest rounds; paired: median of per-round ratios")


if __name__ == "__main__":
    main()
