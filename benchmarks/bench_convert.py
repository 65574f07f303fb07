"""Conversion cost: time and peak extra memory of ``localify`` against one ``torch.export`` of the model.

    python benchmarks/bench_convert.py                       # vit_base_patch16_224
    python benchmarks/bench_convert.py --model deit_tiny_patch16_224 --rounds 3

Time: rounds alternate a plain ``torch.export.export(model, strict=False)`` and ``localify.localify``
(trace + splice) on fresh copies; medians are compared. Memory: each measurement runs in a fresh
subprocess and reports peak RSS minus the RSS after the model was built, next to the model's own size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings

import timm
import torch

import localify


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child(model_name: str, what: str) -> None:
    torch.set_num_threads(2)
    model = timm.create_model(model_name, pretrained=False).eval()
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    base = _rss_mb()
    t = time.perf_counter()
    if what == "export":
        torch.export.export(model, (torch.randn(2, 3, 224, 224),), strict=False)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            localify.localify(model)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": dt, "extra_mb": peak - base, "model_mb": size_mb}))


def _run(model_name: str, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, "--model", model_name],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["export", "localify"])
    args = ap.parse_args()
    if args.child:
        _child(args.model, args.child)
        return
    runs = {"export": [], "localify": []}
    for _ in range(args.rounds):
        for what in runs:
            runs[what].append(_run(args.model, what))
    exp_t = statistics.median(r["seconds"] for r in runs["export"])
    loc_t = statistics.median(r["seconds"] for r in runs["localify"])
    loc_m = statistics.median(r["extra_mb"] for r in runs["localify"])
    exp_m = statistics.median(r["extra_mb"] for r in runs["export"])
    size = runs["localify"][0]["model_mb"]
    print(f"{args.model}: model {size:.0f} MB, medians of {args.rounds} rounds (fresh process each)")
    print(f"  torch.export alone : {exp_t:6.2f} s, peak extra memory {exp_m:7.0f} MB")
    print(f"  localify (all)     : {loc_t:6.2f} s, peak extra memory {loc_m:7.0f} MB")
    print(f"  time ratio localify / export = {loc_t / exp_t:.3f}   (target < 1.20)")
    print(f"  extra memory / model size    = {loc_m / size:.3f}   (target <= 1.5)")


if __name__ == "__main__":
    main()
