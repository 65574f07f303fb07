"""The conversion's cost in the runtimes people deploy with: eager PyTorch, torch.compile and ONNX Runtime.

    python benchmarks/bench_runtimes.py                       # deit_tiny, 2 threads, batch 1 and 16, all runtimes
    python benchmarks/bench_runtimes.py --quick               # a rough picture in under 2 minutes
    python benchmarks/bench_runtimes.py --runtimes ort --batches 16 --rounds 21 --threads 1

Models (random init, 224x224, all blocks converted):
  original          the timm model
  original conv-pw  the same, its MLP projections run with the point-wise primitive the converted blocks use
                    (localify.layers.pointwise_backend(): a 1x1 conv of a channels-last view where that is
                    faster, e.g. oneDNN instead of MKL on AMD CPUs): what the original would gain from it
  dwconv            localify's default variant (function-preserving): fc1 wrapped in LocalityLinear, and each
                    MLP module (timm Mlp) run as a localify.layers.LocalityMLP (grid and extra tokens through
                    the whole MLP separately, joined on the narrow side), as localify() converts it
  localvit fused    the LocalViT block (h-swish, no channel attention) after localify.fuse()

Runtimes, each timed in a fresh process (--processes N: N of them, the median of their ratios is shown) in
interleaved rounds (every round times every model back to back, so machine noise hits all of them, starting one
model further along each round; the table shows medians over rounds and the ratio to the original in the same
runtime). The lowest and highest ratio over the processes show how far a ratio moves by chance.
  eager     PyTorch, inference mode
  compile   torch.compile (inductor, static shapes: one graph per batch size), inference mode
  ort       ONNX Runtime, CPU execution provider, the file written by localify.export_onnx (dynamic batch by
            default, --onnx-dynamic full for dynamic H/W as well), intra-op threads = --threads; exported
            files are cached (--cache) under a key of the model, the conversion, localify's source and the
            library versions, so a rerun of unchanged code skips the exporter (20-40 s per model here)

"floor" (eager and compile): the original plus only the depth-wise conv call of every converted block (see
bench_overhead.py --floor), a lower bound for a conversion with PyTorch's CPU convolution that keeps the model's
point-wise primitive (under torch.compile it is the same forward, compiled: the conv is an extern oneDNN call). The training step (eager, forward + backward, batch 16, no optimizer step) is timed last,
for the original, the original conv-pw and dwconv rows and the unfused localvit block (BatchNorms in training
mode).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
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
from _stable import CLOCKS, rotating_rounds, stable_allocator  # noqa: E402
from bench_overhead import conv_call_floor  # noqa: E402

from localify.layers import conv_activation_fusion, linear_rows, pointwise, pointwise_backend  # noqa: E402

RUNTIMES = ("eager", "compile", "ort")
FLOOR_RUNTIMES = {"eager", "compile"}
MODELS = ("original", "original conv-pw", "dwconv", "localvit fused")
QUICK_MODELS = ("original", "dwconv", "localvit fused")


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


class ConvPointwiseLinear(torch.nn.Linear):
    """The original's MLP projections with the primitive the converted blocks use: localify.layers.pointwise
    (eager: the 1x1 conv where pointwise_backend() is 'conv'; under torch.compile tokens take F.linear, as in
    the converted blocks), and in an exported graph the 1x1 conv, the form exported blocks hold."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and torch.compiler.is_exporting():
            return linear_rows(x, self.weight, self.bias, x.shape[0])
        return pointwise(x, self.weight, self.bias)


def same_primitive(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the original whose MLP fc1 / fc2 run with the converted blocks' point-wise primitive."""
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if type(mod) is torch.nn.Linear and name.rsplit(".", 1)[-1] in ("fc1", "fc2") and ".mlp" in f".{name}":
            mod.__class__ = ConvPointwiseLinear
    return m


def convert(base: torch.nn.Module, name: str) -> torch.nn.Module:
    m = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "original":
            return m
        if name == "original conv-pw":
            return same_primitive(m)
        if name.startswith("localvit"):
            localify.localify(m, variant="localvit", act="hswish")
            return localify.fuse(m.eval()) if name.endswith("fused") else m
        return localify.localify(m, variant="dwconv")


def build(model_name: str, names: list[str], floor: bool, train: bool = False) -> dict[str, torch.nn.Module]:
    """The models of the table (eval mode unless ``train``); 'floor' only when asked."""
    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False)
    base.train(train)
    models = {n: convert(base, n).train(train) for n in names}
    if floor:
        models["floor"] = conv_call_floor(models["dwconv"] if "dwconv" in models else convert(base, "dwconv"))
    return models


# --- runners: model -> make(x) -> a call with no arguments -------------------------------------------------
def _timed(fn: Callable[[], object], iters: int, clock: Callable[[], float]) -> float:
    t = clock()
    for _ in range(iters):
        fn()
    return (clock() - t) / iters


def eager_runner(model: torch.nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    def make(x: torch.Tensor) -> Callable[[], object]:
        def call():
            with torch.inference_mode():
                return model(x)
        return call
    return make


def compile_runner(model: torch.nn.Module) -> Callable[[torch.Tensor], Callable[[], object]]:
    return eager_runner(torch.compile(model, dynamic=False))


def onnx_cache_key(model_name: str, name: str, dynamic: str) -> str:
    """Everything the exported file depends on: the model, the conversion, localify's and this script's code,
    the point-wise backend, the exporter's versions."""
    h = hashlib.sha256(f"{model_name}|{name}|{dynamic}|{pointwise_backend()}|{versions()}".encode())
    pkg = os.path.dirname(localify.__file__)
    for f in sorted(os.listdir(pkg)):
        if f.endswith(".py"):
            with open(os.path.join(pkg, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    for fn in (convert, same_primitive, ConvPointwiseLinear):
        h.update(inspect.getsource(fn).encode())
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
                 clock: Callable[[], float]) -> dict[int, dict[str, float]]:
    """Medians (seconds per call) per batch and model; every round times every model back to back (the order
    rotates from one round to the next)."""
    out = {}
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        calls = {name: make(x) for name, make in makers.items()}
        for fn in calls.values():  # warm-up (and the compile of this batch size)
            fn()
            fn()
        iters = iters_for(b)
        times: dict[str, list[float]] = {name: [] for name in calls}
        for order in rotating_rounds(calls, rounds):
            for name, fn in order:
                times[name].append(_timed(fn, iters, clock))
        out[b] = {name: statistics.median(t) for name, t in times.items()}
    return out


def time_training(models: dict[str, torch.nn.Module], batch: int, rounds: int, clock: Callable[[], float]
                  ) -> dict[str, float]:
    x = torch.randn(batch, 3, 224, 224)

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    for m in models.values():
        m.train()
        step(m)
    times: dict[str, list[float]] = {name: [] for name in models}
    for order in rotating_rounds(models, rounds):
        for name, m in order:
            times[name].append(_timed(lambda m=m: step(m), 1, clock))
    return {name: statistics.median(t) for name, t in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    ap.add_argument("--models", nargs="+", choices=MODELS, default=None,
                    help="columns besides the original (default: all; --quick: no 'original conv-pw')")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--processes", type=int, default=1,
                    help="fresh processes per runtime (default 1); the table shows the median of their ratios. "
                         "Ratios differ from one process to the next by more than between the rounds of one "
                         "(seen with ONNX Runtime: 1.02-1.12 for the same file), so more than one is better")
    ap.add_argument("--timer", choices=sorted(CLOCKS), default="wall",
                    help="wall clock (default), or the process's CPU time: steadier on a busy machine, "
                         "meaningful with --threads 1")
    ap.add_argument("--train-rounds", type=int, default=None, help="default: max(3, rounds // 2)")
    ap.add_argument("--no-train", action="store_true", help="skip the training step")
    ap.add_argument("--no-floor", action="store_true", help="skip the conv-call floor (eager, compile)")
    ap.add_argument("--onnx-dynamic", choices=["batch", "full"], default="batch",
                    help="export with a dynamic batch (default) or dynamic batch and H/W")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                    "localify", "bench_runtimes"),
                    help="where exported ONNX files are kept, keyed by model, conversion, localify's source "
                         "and library versions (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="export afresh and keep nothing")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds of short timings, 1 training round, no onnxruntime check of a fresh export "
                         "(a rough picture; under 2 minutes on a quiet machine once the inductor and ONNX caches "
                         "are warm)")
    ap.add_argument("--child", choices=[*RUNTIMES, "train"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.names = ["original"] + [n for n in (args.models or (QUICK_MODELS if args.quick else MODELS))
                                 if n != "original"]
    if args.quick:
        args.rounds = min(args.rounds, 3)
        args.train_rounds = args.train_rounds or 1
    args.train_rounds = args.train_rounds or max(3, args.rounds // 2)
    return args


def measure(args: argparse.Namespace, what: str) -> dict[str, dict[str, float]]:
    """One runtime (or the training step) in this process: {batch: {model: median seconds per call}}."""
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.timer]
    names = args.names
    if what == "train":
        tnames = ["original"] + [n for n in ("original conv-pw", "dwconv") if n in names] + ["localvit"]
        return {"16": time_training(build(args.model, tnames, False, train=True), 16, args.train_rounds, clock)}
    models = build(args.model, names, what in FLOOR_RUNTIMES and not args.no_floor)
    with tempfile.TemporaryDirectory(prefix="bench_runtimes.") as tmp:
        if what == "eager":
            makers = {n: eager_runner(m) for n, m in models.items()}
        elif what == "compile":
            # every model and batch size is one more compile of the same forward code
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       4 * len(names) * len(args.batches))
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 8 * len(names) * len(args.batches))
            makers = {n: compile_runner(m) for n, m in models.items()}
        else:
            makers = {}
            for n in names:
                key = onnx_cache_key(args.model, n, args.onnx_dynamic)
                path = export(models[n], os.path.join(tmp, n.replace(" ", "_") + ".onnx"), args.onnx_dynamic,
                              not args.quick, None if args.no_cache else args.cache, key)
                makers[n] = ort_runner(path, args.threads)

        def iters_for(b: int) -> int:
            return max(1, (8 if args.quick else 32) // b)

        out = time_runtime(makers, args.batches, args.rounds, iters_for, clock)
    return {str(b): row for b, row in out.items()}


def run_child(what: str) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", what]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"bench_runtimes: the {what} measurement failed (exit code {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, tuple[float, float, float, float]]]:
    """Per batch and model: (median seconds, median ratio to the original, lowest and highest ratio) over
    the processes; each ratio is taken within one process."""
    out: dict[str, dict[str, tuple[float, float, float, float]]] = {}
    for b in runs[0]:
        out[b] = {}
        for n in runs[0][b]:
            ratios = [r[b][n] / r[b]["original"] for r in runs]
            out[b][n] = (statistics.median(r[b][n] for r in runs), statistics.median(ratios), min(ratios),
                         max(ratios))
    return out


def main() -> None:
    stable_allocator()
    args = parse_args()
    if args.child:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(measure(args, args.child)))
        return
    t_start = time.perf_counter()
    print(f"{args.model}, random init, 224x224, {args.threads} threads, {args.timer} time; CPU: {cpu_model()} "
          f"({os.cpu_count()} logical CPUs); point-wise backend: {pointwise_backend()}; "
          f"activation in the depth-wise conv: {'on' if conv_activation_fusion() else 'off'}")
    print(versions())
    floor = bool(FLOOR_RUNTIMES & set(args.runtimes)) and not args.no_floor
    results = {}
    for what in [*args.runtimes, *([] if args.no_train else ["train"])]:
        t0 = time.perf_counter()
        results[what] = summarise([run_child(what) for _ in range(args.processes)])
        print(f"  [{what}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    train = results.pop("train", None)

    procs = f" x {args.processes} processes (median of their ratios)" if args.processes > 1 else ""
    print(f"\ninference, medians of {args.rounds} interleaved rounds{procs} per runtime; ratio to the original "
          "in the same runtime (ms per call)")
    cols = args.names[1:]
    head = f"{'runtime':<9}{'batch':>6}{'original ms':>13}" + "".join(f"{n:>19}" for n in cols)
    print(head + (f"{'floor':>8}" if floor else ""))
    for rt, per_batch in results.items():
        for b, row in per_batch.items():
            line = f"{rt:<9}{b:>6}{row['original'][0] * 1e3:>13.2f}"
            for n in cols:
                line += f"{row[n][1]:>10.3f} ({row[n][0] * 1e3:6.1f})"
            if floor:
                line += f"{row['floor'][1]:>8.3f}" if "floor" in row else f"{'-':>8}"
            print(line)
    if args.processes > 1:
        print("lowest - highest ratio over the processes:")
        for rt, per_batch in results.items():
            for b, row in per_batch.items():
                print(f"{rt:<9}{b:>6}{'':>13}" + "".join(f"{f'{row[n][2]:.3f} - {row[n][3]:.3f}':>19}" for n in cols))
    if train is not None:
        row = train["16"]
        print(f"\ntraining step (eager, forward + backward, batch 16), medians of {args.train_rounds} interleaved "
              f"rounds{procs}: original {row['original'][0] * 1e3:.1f} ms, "
              + ", ".join(f"{n} {v[1]:.3f}" for n, v in row.items() if n != "original"))
    print(f"({time.perf_counter() - t_start:.0f} s in all)")


if __name__ == "__main__":
    main()
