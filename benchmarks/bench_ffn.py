"""The locality-FFN family against the original model and the paper's plain design, in one interleaved run.

    python benchmarks/bench_ffn.py                    # deit_tiny, 2 threads, 224x224, batch 1 and 16 + train step
    python benchmarks/bench_ffn.py --rounds 5 --batches 16
    python benchmarks/bench_ffn.py --se               # the LocalViT-T design (SE hidden 4) on both sides

Rows (all layers converted; medians over rounds; every round times each model back to back):
  original                    timm deit_tiny_patch16_224
  dwconv                      localify default variant (function-preserving)
  localvit                    localify's LocalViT block (BN, h-swish; --se adds SE hidden 4 as LocalViT-T), unfused
  localvit fused              the same after localify.fuse()
  reference localvit          the same design written plainly, as the paper's code does it
                              (benchmarks/reference_localvit.py)
Inference columns are latency ratios to the original; the training column is one forward + backward at
batch 16 (SGD step excluded, one call per round, as many rounds as for inference), also as a ratio to the
original. The order of the models rotates from one round to the next.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import timm
import torch

import localify
from localify.layers import conv_activation_fusion, pointwise_backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stable import CLOCKS, per_call, rotating_rounds, stable_allocator  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from reference_localvit import replace_mlps_with_reference  # noqa: E402


def _build(model_name: str, se_hidden: int | None) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False).eval()
    models = {"original": base}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = copy.deepcopy(base)
        localify.localify(m, variant="dwconv")
        models["dwconv"] = m
        m = copy.deepcopy(base)
        opts = {"attention": "se", "se_hidden": se_hidden} if se_hidden else {}
        localify.localify(m, variant="localvit", act="hswish", **opts)
        models["localvit"] = m.eval()
        models["localvit fused"] = localify.fuse(copy.deepcopy(m).eval())
    models["reference localvit"] = replace_mlps_with_reference(copy.deepcopy(base), act="hswish",
                                                               se_hidden=se_hidden).eval()
    return models


def _infer(model, x, iters, clock=time.perf_counter):
    with torch.inference_mode():
        return per_call(model, x, iters, clock)


def _train_step(model, x, iters, clock=time.perf_counter):
    model.train()
    t = clock()
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
    dt = (clock() - t) / iters
    model.eval()
    return dt


def main() -> None:
    stable_allocator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                    help="wall clock, or CPU time (steadier on a busy machine; use with --threads 1)")
    ap.add_argument("--se", action="store_true", help="SE (hidden 4) in both localvit and the reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = _build(args.model, 4 if args.se else None)
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    cols = []
    for b in args.batches:
        x = torch.randn(b, 3, 224, 224)
        iters = max(2, 32 // b)
        col = f"infer b{b}"
        cols.append(col)
        for m in models.values():
            _infer(m, x, 1)
        times = {name: [] for name in models}
        for order in rotating_rounds(models, args.rounds):
            for name, m in order:
                times[name].append(_infer(m, x, iters, CLOCKS[args.timer]))
        for name in models:
            results[name][col] = statistics.median(times[name])
    if not args.no_train:
        x = torch.randn(16, 3, 224, 224)
        col = "train b16"
        cols.append(col)
        train_models = {k: v for k, v in models.items() if k != "localvit fused"}
        for m in train_models.values():
            _train_step(m, x, 1)
        times = {name: [] for name in train_models}
        for order in rotating_rounds(train_models, max(3, args.rounds)):
            for name, m in order:
                times[name].append(_train_step(m, x, 1, CLOCKS[args.timer]))
        for name in train_models:
            results[name][col] = statistics.median(times[name])

    design = "h-swish + SE hidden 4" if args.se else "h-swish, no channel attention"
    print(f"{args.model}, all blocks, localvit and reference: {design}, {args.threads} threads, 224x224, "
          f"medians of interleaved rounds, point-wise backend {pointwise_backend()}, activation in the conv "
          f"{'on' if conv_activation_fusion() else 'off'}; ratio to the original (ms)")
    print(f"{'':<20}" + "".join(f"{c:>20}" for c in cols))
    base = results["original"]
    for name, row in results.items():
        cells = []
        for c in cols:
            if c in row:
                cells.append(f"{row[c] / base[c]:>8.3f}x ({row[c] * 1e3:7.1f})")
            else:
                cells.append(f"{'-':>20}")
        print(f"{name:<20}" + "".join(f"{s:>20}" for s in cells))
    ref, unf = results["reference localvit"], results["localvit"]
    print("localvit unfused speed-up over the plain reference: "
          + ", ".join(f"{c}: {ref[c] / unf[c]:.2f}x" for c in cols if c in unf))


if __name__ == "__main__":
    main()
