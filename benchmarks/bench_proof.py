"""Cost of the position-code grid proof (``localify._proof.prove_grids``), and of serving a permuted grid.

    python benchmarks/bench_proof.py              # both parts, one thread
    python benchmarks/bench_proof.py --proof      # proof cost only
    python benchmarks/bench_proof.py --permute    # gather / scatter cost only

Part 1: timm vit_base_patch16_224 (random init) at batch 2, 224x224: one torch.export of the model against
one prove_grids call over all 12 MLP inputs (time, and peak resident memory above the level before the call,
sampled every 2 ms; this part runs with glibc's default allocator, which returns freed memory, so that the
resident size follows what is live).

Part 2: an MLP whose tokens are a permutation of a 56x56 grid (Swin-T stage 1: C=96, hidden=384, batch 16):
what reordering to raster order and back costs, against the MLP (fc1, GELU, fc2) and the LocalViT MLP (with
a depth-wise 3x3 conv and GELU on the hidden map): reordering the (B, N, hidden) tensor around the conv, or
the (B, N, C) tensor at the MLP's boundary (the MLP is token-wise, so the whole converted MLP can run in
raster order). Best of interleaved rounds.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _stable import stable_allocator  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def proof_cost() -> None:
    import timm

    from localify._match import match_mlps
    from localify._ops import GraphIndex
    from localify._proof import prove_grids
    from localify._trace import make_example_inputs, trace_model

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    ex = make_example_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace_model(model, ex)  # warm-up: the first export pays one-time import and registration costs
        t = time.perf_counter()
        tr = trace_model(model, ex)
        t_export = time.perf_counter() - t
    idx = GraphIndex(tr.graph, tr.param_names, tr.user_inputs, tr.batch)
    nodes = {m.input: "BNC" for m in match_mlps(idx)}
    prove_grids(tr.program, ex, nodes)  # warm-up
    gc.collect()
    base, peak, stop = _rss(), [0], [False]

    def sample() -> None:
        while not stop[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    t = time.perf_counter()
    proofs = prove_grids(tr.program, ex, nodes)
    t_proof = time.perf_counter() - t
    stop[0] = True
    th.join()
    ok = sum(p.ok for p in proofs.values())
    print(f"vit_base_patch16_224, batch 2, 224x224, {torch.get_num_threads()} thread(s)")
    print(f"  torch.export (trace_model)      {t_export:6.2f} s")
    share = 100 * t_proof / t_export
    print(f"  prove_grids, {len(nodes)} MLP inputs      {t_proof:6.2f} s  ({share:.0f}% of one export), "
          f"{ok}/{len(nodes)} proven")
    print(f"  extra peak resident memory      {(max(peak[0], base) - base) / 2**20:6.1f} MB")


def permute_cost(rounds: int = 3, reps: int = 5) -> None:
    torch.manual_seed(0)
    B, H, W, C, HID = 16, 56, 56, 96, 384
    N = H * W
    fc1, fc2 = nn.Linear(C, HID), nn.Linear(HID, C)
    dw = nn.Conv2d(HID, HID, 3, padding=1, groups=HID)
    x = torch.randn(B, N, C)
    perm = torch.randperm(N)  # token i sits at raster cell perm[i]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(N)  # raster cell j holds token inv[j]
    with torch.no_grad():
        hidden = F.gelu(fc1(x))

    def mlp(t=x):
        return fc2(F.gelu(fc1(t)))

    def localvit_mlp(t=x):
        h = F.gelu(fc1(t)).transpose(1, 2).reshape(B, HID, H, W)
        return fc2(F.gelu(dw(h)).flatten(2).transpose(1, 2))

    def reorder_hidden():
        return hidden.index_select(1, inv).index_select(1, perm)  # to raster order and back

    def reorder_boundary():
        return x.index_select(1, inv).index_select(1, perm)

    def localvit_in_raster_order():
        return localvit_mlp(x.index_select(1, inv)).index_select(1, perm)

    fns = {"mlp": mlp, "localvit": localvit_mlp, "hidden": reorder_hidden, "boundary": reorder_boundary,
           "localvit_raster": localvit_in_raster_order}
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                for _ in range(reps):
                    t = time.perf_counter()
                    f()
                    best[k] = min(best[k], time.perf_counter() - t)
    ms = {k: 1e3 * v for k, v in best.items()}
    print(f"tokens permuted from a {H}x{W} grid, C={C}, hidden={HID}, batch {B}, "
          f"{torch.get_num_threads()} thread(s), best of {rounds}x{reps} (ms)")
    print(f"  MLP (fc1, GELU, fc2)                         {ms['mlp']:7.1f}")
    print(f"  LocalViT MLP (+ dw 3x3 conv, GELU)           {ms['localvit']:7.1f}")
    for key, what in (("hidden", "reorder (B, N, hidden) to raster and back "),
                      ("boundary", "reorder (B, N, C) at the MLP boundary     ")):
        print(f"  {what}   {ms[key]:7.1f}  = {100 * ms[key] / ms['mlp']:.0f}% of the MLP, "
              f"{100 * ms[key] / ms['localvit']:.0f}% of the LocalViT MLP")
    print(f"  LocalViT MLP run in raster order (boundary)  {ms['localvit_raster']:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proof", action="store_true", help="only the proof cost")
    ap.add_argument("--permute", action="store_true", help="only the gather / scatter cost")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if os.environ.get("LOCALIFY_BENCH_RAW") == "1" and args.proof:  # the child of the run below
        proof_cost()
        return
    stable_allocator()  # re-executes this script once with the stable allocator settings
    if not args.permute:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env["LOCALIFY_BENCH_RAW"] = "1"
        cmd = [sys.executable, __file__, "--proof", "--threads", str(args.threads)]
        subprocess.run(cmd, env=env, check=True)
    if not args.proof:
        permute_cost()

if __name__ == "__main__":
    main()
