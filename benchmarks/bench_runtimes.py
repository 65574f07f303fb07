"""The conversion's cost in the runtimes people deploy with: eager PyTorch, torch.compile and ONNX Runtime.

    python benchmarks/bench_runtimes.py                       # deit_tiny, 2 threads, batch 1 and 16, all runtimes
    python benchmarks/bench_runtimes.py --quick               # a rough picture in under 2 minutes
    python benchmarks/bench_runtimes.py --runtimes ort --batches 16 --rounds 21 --threads 1

Models (random init, 224x224, all blocks converted):
  original          the timm model
  dwconv            localify's default variant (function-preserving)
  localvit fused    the LocalViT block (h-swish, no channel attention) after localify.fuse()

Runtimes, each timed in its own interleaved rounds (every round times every model back to back, so machine
noise hits all of them; the table shows medians over rounds and the ratio to the original in the same runtime):
  eager     PyTorch, inference mode
  compile   torch.compile (inductor, static shapes: one graph per batch size), inference mode
  ort       ONNX Runtime, CPU execution provider, the file written by localify.export_onnx (dynamic batch by
            default, --onnx-dynamic full for dynamic H/W as well), intra-op threads = --threads; exported
            files are cached (--cache) under a key of the model, the conversion, localify's source and the
            library versions, so a rerun of unchanged code skips the exporter (20-40 s per model here)

"floor" (eager, dwconv only): the original plus only the depth-wise conv call of every converted block (see
bench_overhead.py --floor), a lower bound for any conversion with PyTorch's CPU convolution. The training step
(eager, forward + backward, batch 16, no optimizer step) is timed last, for the original, dwconv and the
unfused localvit block (BatchNorms in training mode).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib import metadata

import numpy as np
import timm
import torch

import localify

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _stable import stable_allocator  # noqa: E402
from bench_overhead import conv_call_floor  # noqa: E402

RUNTIMES = ("eager", "compile", "ort")
MODELS = ("original", "dwconv", "localvit fused")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in ("torch", "timm", "onnxruntime", "onnx", "onnxscript", "numpy"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} -")
    out.append(f"localify {getattr(localify, '__version__', '?')} ({os.path.dirname(localify.__file__)})")
    return ", ".join(out)


def build(model_name: str, floor: bool) -> dict[str, torch.nn.Module]:
    """The models of the table (eval mode); 'floor' only when asked."""
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False).eval()
    models = {"original": base}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = copy.deepcopy(base)
        localify.localify(m, variant="dwconv")
        models["dwconv"] = m.eval()
        lv = copy.deepcopy(base)
        localify.localify(lv, variant="localvit", act="hswish")
        models["localvit fused"] = localify.fuse(copy.deepcopy(lv).eval())
    if floor:
        models["floor"] = conv_call_floor(models["dwconv"])
    return models


def train_models(model_name: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False)
    models = {"original": base}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in ("dwconv", "localvit"):
            m = copy.deepcopy(base)
            localify.localify(m, variant=variant)
            models[variant] = m
    return models


# --- runners: name -> callable(batch) -> timing function -----------------------------------------------------
def _timed(fn: Callable[[], object], iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def eager_runner(model: torch.nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    def make(x: torch.Tensor) -> Callable[[], object]:
        def call():
            with torch.inference_mode():
                return model(x)
        return call
    return make


def compile_runner(model: torch.nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    compiled = torch.compile(model, dynamic=False)
    return eager_runner(compiled)


def onnx_cache_key(model_name: str, name: str, dynamic: str) -> str:
    """Everything the exported file depends on: the model, the conversion, localify's code, the exporter."""
    h = hashlib.sha256(f"{model_name}|{name}|{dynamic}|{versions()}".encode())
    pkg = os.path.dirname(localify.__file__)
    for f in sorted(os.listdir(pkg)):
        if f.endswith(".py"):
            with open(os.path.join(pkg, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()[:20]


def export(model: torch.nn.Module, path: str, dynamic: str, check: bool, cache: str | None, key: str) -> str:
    """``localify.export_onnx`` into ``path``, or a cached file of an identical export."""
    cached = os.path.join(cache, key + ".onnx") if cache else None
    if cached and os.path.exists(cached):
        return cached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.export_onnx(model, path, dynamic=True if dynamic == "full" else "batch", verify=check, force=True)
    if cached:
        os.makedirs(cache, exist_ok=True)
        shutil.copyfile(path, cached + ".tmp")
        os.replace(cached + ".tmp", cached)
    return path


def ort_runner(path: str, threads: int) -> Callable[[torch.Tensor], Callable[[], object]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name

    def make(x: torch.Tensor) -> Callable[[], object]:
        feed = {in_name: np.ascontiguousarray(x.numpy())}
        return lambda: sess.run(None, feed)
    return make


def time_runtime(makers: dict[str, Callable], batches: list[int], rounds: int, iters_for: Callable[[int], int],
                 ) -> dict[int, dict[str, float]]:
    """Medians (seconds per call) per batch and model; every round times every model back to back."""
    out = {}
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        calls = {name: make(x) for name, make in makers.items()}
        for fn in calls.values():  # warm-up (and the compile of this batch size)
            fn()
            fn()
        iters = iters_for(b)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                times[name].append(_timed(fn, iters))
        out[b] = {name: statistics.median(t) for name, t in times.items()}
    return out


def time_training(models: dict[str, torch.nn.Module], batch: int, rounds: int) -> dict[str, float]:
    x = torch.randn(batch, 3, 224, 224)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    for m in models.values():
        m.train()
        step(m)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(_timed(lambda m=m: step(m), 1))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    stable_allocator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--train-rounds", type=int, default=None, help="default: max(3, rounds // 2)")
    ap.add_argument("--no-train", action="store_true", help="skip the training step")
    ap.add_argument("--no-floor", action="store_true", help="skip the eager conv-call floor")
    ap.add_argument("--onnx-dynamic", choices=["batch", "full"], default="batch",
                    help="export with a dynamic batch (default) or dynamic batch and H/W")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                    "localify", "bench_runtimes"),
                    help="where exported ONNX files are kept, keyed by model, conversion, localify's source "
                         "and library versions (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="export afresh and keep nothing")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds of short timings, 1 training round, no onnxruntime check of a fresh export "
                         "(a rough picture; under 2 minutes once the inductor and ONNX caches are warm)")
    args = ap.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 3)
        args.train_rounds = args.train_rounds or 1
    train_rounds = args.train_rounds or max(3, args.rounds // 2)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def iters_for(b: int) -> int:
        return max(1, (8 if args.quick else 32) // b)

    print(f"{args.model}, random init, 224x224, {args.threads} threads; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs)")
    print(versions())
    floor = "eager" in args.runtimes and not args.no_floor
    models = build(args.model, floor)
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_runtimes.") as tmp:
        for rt in args.runtimes:
            t0 = time.perf_counter()
            if rt == "eager":
                makers = {n: eager_runner(m) for n, m in models.items()}
            elif rt == "compile":
                torch._dynamo.reset()
                makers = {n: compile_runner(models[n]) for n in MODELS}
            else:
                makers = {}
                for n in MODELS:
                    key = onnx_cache_key(args.model, n, args.onnx_dynamic)
                    path = export(models[n], os.path.join(tmp, n.replace(" ", "_") + ".onnx"), args.onnx_dynamic,
                                  not args.quick, None if args.no_cache else args.cache, key)
                    makers[n] = ort_runner(path, args.threads)
            results[rt] = time_runtime(makers, args.batches, args.rounds, iters_for)
            print(f"  [{rt}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    train = None
    if not args.no_train:
        t0 = time.perf_counter()
        train = time_training(train_models(args.model), 16, train_rounds)
        print(f"  [train: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    print(f"\ninference, medians of {args.rounds} interleaved rounds per runtime; ratio to the original in the "
          "same runtime (ms per call)")
    head = f"{'runtime':<9}{'batch':>6}{'original ms':>13}"
    head += "".join(f"{n:>22}" for n in MODELS[1:]) + (f"{'floor':>8}" if floor else "")
    print(head)
    for rt, per_batch in results.items():
        for b, row in per_batch.items():
            base = row["original"]
            line = f"{rt:<9}{b:>6}{base * 1e3:>13.2f}"
            for n in MODELS[1:]:
                line += f"{row[n] / base:>13.3f} ({row[n] * 1e3:6.1f})"
            if floor:
                line += f"{row['floor'] / base:>8.3f}" if "floor" in row else f"{'-':>8}"
            print(line)
    if train is not None:
        base = train["original"]
        print(f"\ntraining step (eager, forward + backward, batch 16), medians of {train_rounds} interleaved rounds:"
              f" original {base * 1e3:.1f} ms, "
              + ", ".join(f"{n} {train[n] / base:.3f}" for n in train if n != "original"))
    print(f"({time.perf_counter() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
