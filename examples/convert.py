"""Convert a timm ViT with localify, check that its outputs are unchanged, and save the weights.

    python examples/convert.py                                   # deit_tiny_patch16_224, blocks 1-4
    python examples/convert.py vit_small_patch16_224 --layers early --kernel-size 5 -o out/vit_s.safetensors
    python examples/convert.py deit_tiny_patch16_224 --checkpoint my_deit.pth   # retrofit your own weights
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

import localify


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="deit_tiny_patch16_224", help="timm model name")
    ap.add_argument("--layers", default="1-4", help="'all', 'early', 'late', '1-4', '1,3,5-6'")
    ap.add_argument("--variant", default="dwconv", choices=["dwconv", "residual"])
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--checkpoint", type=Path, help="local pretrained weights (.safetensors or .pth)")
    ap.add_argument("-o", "--output", type=Path, default=Path("out/model.safetensors"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    if args.checkpoint:
        if args.checkpoint.suffix == ".safetensors":
            state = load_file(args.checkpoint)
        else:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    original = copy.deepcopy(model)

    t = time.perf_counter()
    plan = localify.find_mlps(model, layers=args.layers)
    print(plan)
    localify.localify(model, args.layers, variant=args.variant, kernel_size=args.kernel_size, plan=plan)
    print(f"converted {len(plan.convertible())} MLP(s) in {time.perf_counter() - t:.2f} s")

    x = torch.randn(2, 3, *plan.input_size)
    with torch.no_grad():
        a, b = original(x), model(x)
    print(f"max |output difference| at {tuple(x.shape)}: {(a - b).abs().max().item():.3e} "
          f"(output scale {a.abs().max().item():.3e})")
    n0 = sum(p.numel() for p in original.parameters())
    n1 = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n0:,} -> {n1:,} (+{n1 - n0:,})")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.output), metadata={"model": args.model, "layers": str(args.layers)})
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
