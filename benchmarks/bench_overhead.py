"""Runtime overhead of a conversion, measured against the original model in the same, interleaved run.

    python benchmarks/bench_overhead.py                      # deit_tiny, default variant, batch 1 and 16
    python benchmarks/bench_overhead.py --model deit_small_patch16_224 --batches 1 8 --threads 2
    python benchmarks/bench_overhead.py --kw class_token=False --kw global_pool="'avg'"   # no extra tokens
    python benchmarks/bench_overhead.py --floor              # + the cost of the conv calls alone
    python benchmarks/bench_overhead.py --pointwise conv linear measure   # the converted model per backend

Each round times the original and the converted model back to back (inference mode, 224x224, random
weights), so machine noise hits both, starting one model further along each round (the position in a round
moved a ratio by several % at batch 1); the table shows medians over rounds and their ratio.

--floor times a third model in the same rounds: the original plus, in every converted MLP, one depth-wise conv
over the hidden grid right after fc1 whose result is thrown away (a contiguous grid of the same size, so no
layout work, no copy, no concatenation). Any LocalViT conversion runs at least that conv, so its ratio is a
lower bound for what a conversion can reach with PyTorch's CPU convolution on this machine, as long as it keeps
the model's point-wise primitive: where localify runs the projections of a converted block as 1x1 convolutions
(localify.layers.pointwise_backend() is "conv", e.g. on AMD CPUs), a converted model can run below it, and
benchmarks/bench_runtimes.py times the original with that primitive too.

--pointwise NAME... times the converted model once per point-wise backend (localify.layers.pointwise_backend:
conv, linear, measure, auto) in the same rounds, the backend switched right before each of its calls (the
choices of "measure" are made in the warm-up and kept across the switches).
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
import torch.nn.functional as F

import localify
from localify.layers import (
    LocalityLinear,
    LocalityMLP,
    PointwiseLinear,
    conv_activation_fusion,
    pointwise_backend,
    set_pointwise_backend,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stable import CLOCKS, per_call, rotating_rounds, stable_allocator  # noqa: E402


class ConvCallOnly(LocalityLinear):
    """fc1, then the depth-wise conv over a contiguous grid of the hidden tensor's size, result unused (under
    torch.compile one element of it is added to fc1's output, in the fused kernel of the next point-wise op,
    since inductor drops a convolution whose result nothing reads)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        hgt, wid = self.grid_source.get()
        c = h.shape[-1]
        g = h.reshape(-1, c)[: h.shape[0] * hgt * wid].view(h.shape[0], hgt, wid, c).permute(0, 3, 1, 2)
        y = F.conv2d(g, self.dwconv.weight, None, 1, self.dwconv.padding, 1, self.dwconv.groups)
        if torch.compiler.is_compiling():
            h = h + y[0, 0, 0, 0] * 0.0
        return h


def conv_call_floor(converted: torch.nn.Module) -> torch.nn.Module:
    floor = copy.deepcopy(converted)
    for name, m in list(floor.named_modules()):
        if isinstance(m, LocalityMLP):  # the MLP module runs once on all tokens, as in the original
            parent, _, child = name.rpartition(".")
            setattr(floor.get_submodule(parent), child, m.get_base_layer())
    for m in floor.modules():
        if type(m) is LocalityLinear and m.layout == "BNC":
            m.__class__ = ConvCallOnly
        elif type(m) is PointwiseLinear:  # fc2 with the original's primitive
            m.__class__ = torch.nn.Linear
    return floor


def bench(model_name: str, batches: list[int], threads: int, rounds: int, variant: str, layers: str,
          model_kwargs: dict | None = None, floor: bool = False, timer: str = "wall",
          backends: list[str] | tuple[str, ...] = ()) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False, **(model_kwargs or {})).eval()
    conv = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(conv, layers=layers, variant=variant)
    default = pointwise_backend()
    prev = set_pointwise_backend(default)  # restored at the end
    runs = [(base, default), (conv, default)] + ([(conv_call_floor(conv), default)] if floor else [])
    runs += [(conv, name) for name in backends]
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, 3, 224, 224)
            iters = max(2, 16 // b)
            for m, backend in runs:  # warm-up
                set_pointwise_backend(backend)
                per_call(m, x, 2)
            times = [[] for _ in runs]
            for order in rotating_rounds(dict(enumerate(runs)), rounds):
                for i, (m, backend) in order:
                    set_pointwise_backend(backend)
                    times[i].append(per_call(m, x, iters, CLOCKS[timer]))
            tb, tc = times[0], times[1]
            mb, mc = statistics.median(tb), statistics.median(tc)
            rows.append({"batch": b, "original_ms": mb * 1e3, "converted_ms": mc * 1e3, "ratio": mc / mb,
                         "ratio_of_min": min(tc) / min(tb),
                         "ratio_paired": statistics.median(c / o for c, o in zip(tc, tb))})
            if floor:
                rows[-1]["floor"] = statistics.median(times[2]) / mb
            extra = times[len(times) - len(backends):]
            rows[-1]["backends"] = {name: statistics.median(t) / mb for name, t in zip(backends, extra)}
    set_pointwise_backend(prev)
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
    ap.add_argument("--floor", action="store_true", help="also time the conv calls alone (a lower bound)")
    ap.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                    help="wall clock, or CPU time (steadier on a busy machine; use with --threads 1)")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                    help="timm.create_model keyword (VALUE is a Python literal), e.g. class_token=False")
    ap.add_argument("--pointwise", nargs="+", default=[], metavar="BACKEND",
                    choices=["auto", "conv", "linear", "measure"],
                    help="also time the converted model with each of these point-wise backends")
    args = ap.parse_args()
    kwargs = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.kw)}
    rows = bench(args.model, args.batches, args.threads, args.rounds, args.variant, args.layers, kwargs,
                 args.floor, args.timer, args.pointwise)
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    print(f"{args.model}{extra}, variant={args.variant}, layers={args.layers}, {args.threads} threads, 224x224, "
          f"inference, medians of {args.rounds} interleaved rounds, point-wise backend {pointwise_backend()}, "
          f"activation in the conv {'on' if conv_activation_fusion() else 'off'}")
    print(f"{'batch':>5} {'original ms':>12} {'converted ms':>13} {'ratio':>7} {'min/min':>8} {'paired':>7}"
          + (f" {'floor':>7}" if args.floor else "") + "".join(f" {'pw=' + n:>10}" for n in args.pointwise))
    for r in rows:
        print(f"{r['batch']:>5} {r['original_ms']:>12.2f} {r['converted_ms']:>13.2f} {r['ratio']:>7.3f} "
              f"{r['ratio_of_min']:>8.3f} {r['ratio_paired']:>7.3f}" + (f" {r['floor']:>7.3f}" if args.floor else "")
              + "".join(f" {v:>10.3f}" for v in r["backends"].values()))
    print("ratio: of the medians; min/min: of the fastest rounds; paired: median of per-round ratios"
          + ("; floor: the conv calls alone, ratio of the medians" if args.floor else "")
          + ("; pw=NAME: the converted model with that point-wise backend, ratio of the medians"
             if args.pointwise else ""))


if __name__ == "__main__":
    main()
