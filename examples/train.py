"""Fine-tune a localified Vision Transformer on a folder of images (one sub-folder per class).

    # a dry run on a small synthetic dataset (no data needed, a few seconds on a CPU)
    python examples/train.py deit_tiny_patch16_224 --dry-run --steps 5

    # fine-tune the locality parameters and the head of your pretrained DeiT on DATA/train (+ DATA/val)
    python examples/train.py deit_tiny_patch16_224 --checkpoint deit_tiny.pth --data DATA --epochs 10 \\
        --layers early --variant localvit --locality-only --head -o runs/deit_local

    # timm's released weights, read from the Hugging Face cache without touching the network
    HF_HUB_OFFLINE=1 python examples/train.py deit_small_patch16_224 --pretrained --data DATA --epochs 10

    # a Hugging Face model from a local directory, on 4 GPUs (DDP, DistributedSampler, SyncBatchNorm)
    torchrun --nproc_per_node=4 examples/train.py hf:path/to/vit --pretrained --data DATA --epochs 30 --batch-size 64

The model is built with ``localify.create_model`` (a timm name, ``hf:PATH`` or ``module:factory``; random
weights unless ``--pretrained`` loads the released ones or ``--checkpoint`` gives local ones; a classifier of
another number of classes is left at its initialisation), converted with ``localify.localify`` and trained
with AdamW, a linear warmup and a cosine schedule, mixed precision on CUDA, and DDP when started by torchrun
(``WORLD_SIZE`` > 1). Checkpoints are written with ``localify.save`` (``last.safetensors``, reloaded by
``localify.load``); ``--export-onnx`` writes a fused ONNX file at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import localify

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DRY_RUN_CLASSES = 4


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="timm model name, hf:PATH (local) or module:factory")
    ap.add_argument("--model-kwargs", default="", help="extra model arguments: 'img_size=160,drop_path_rate=0.1'")
    ap.add_argument("--pretrained", action="store_true",
                    help="the model's released weights (timm: from the Hugging Face cache; hf: its directory)")
    ap.add_argument("--checkpoint", type=Path, help="pretrained weights of the base model (.safetensors, .pth)")
    ap.add_argument("--layers", default="all", help="blocks to convert: 'all', 'early', 'late', '1-4', ...")
    ap.add_argument("--variant", default="dwconv", choices=["dwconv", "residual", "localvit"])
    ap.add_argument("--kernel-size", type=int, default=3)
    data = ap.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help="image folder: DATA/train/<class>/*.jpg (+ DATA/val) or DATA/<class>")
    data.add_argument("--dry-run", action="store_true", help="a small synthetic dataset instead of --data")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many optimiser steps (0: all epochs)")
    ap.add_argument("--batch-size", type=int, default=32, help="per process")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (scaled by nothing: set it)")
    ap.add_argument("--min-lr", type=float, default=1e-6)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=-1, help="linear warmup (default: 5%% of the steps)")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    ap.add_argument("--locality-only", action="store_true",
                    help="freeze everything but the new locality parameters (localify.mark_trainable)")
    ap.add_argument("--head", action="store_true", help="with --locality-only: train the classifier head too")
    ap.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                    help="mixed precision (auto: bf16 or fp16 on CUDA, off on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("-o", "--output", type=Path, default=Path("runs/localify"))
    ap.add_argument("--save-every", type=int, default=0, help="also save step_N.safetensors every N steps")
    ap.add_argument("--save-weights", default="all", choices=["all", "trainable"],
                    help="'trainable': store only the trained tensors (load with base_checkpoint=)")
    ap.add_argument("--export-onnx", type=Path, help="write a fused ONNX file of the final model")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.head and not args.locality_only:
        ap.error("--head goes with --locality-only")
    return args


def parse_kwargs(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-kwargs: expected key=value, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key] = {"true": True, "false": False, "none": None}.get(value.lower(), value)
    return out


# ------------------------------------------------------------------------------------------------ distributed
class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()  # every rank is past its last collective before any rank tears the group down
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ model and data
def input_size(model: nn.Module) -> tuple[int, int]:
    def pair(v: Any) -> tuple[int, int] | None:
        if isinstance(v, int) and not isinstance(v, bool):
            return (v, v)
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return (int(v[0]), int(v[1]))
        return None

    cfg = getattr(model, "config", None)
    if cfg is not None and pair(getattr(cfg, "image_size", None)):
        return pair(cfg.image_size)
    for m in model.modules():
        if pair(getattr(m, "img_size", None)):
            return pair(m.img_size)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size:
        return tuple(size[-2:])
    raise SystemExit(f"cannot tell the input size of {type(model).__name__}; pass img_size in --model-kwargs")


def mean_std(model: nn.Module) -> tuple[tuple, tuple]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    if getattr(model, "config", None) is not None:  # Hugging Face ViT image processors
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    return IMAGENET_MEAN, IMAGENET_STD


def load_base_weights(model: nn.Module, path: Path, log) -> None:
    """Pretrained weights into the base model; a classifier of another size is left at its initialisation."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in skipped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in skipped]:
        raise SystemExit(f"{path} does not fit the model: missing {list(missing)[:5]}, unexpected "
                         f"{list(unexpected)[:5]}")
    if skipped:
        log(f"not loaded (another number of classes): {', '.join(skipped)}")


def build_model(args: argparse.Namespace, num_classes: int, log) -> nn.Module:
    kwargs = parse_kwargs(args.model_kwargs)
    kwargs["num_labels" if args.model.startswith("hf:") else "num_classes"] = num_classes
    torch.manual_seed(args.seed)
    model = localify.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if args.checkpoint:
        load_base_weights(model, args.checkpoint, log)
    model.eval()  # conversion traces in eval mode; the new blocks keep the mode of what they replace
    localify.localify(model, args.layers, variant=args.variant, kernel_size=args.kernel_size)
    return model


def train_dir(args: argparse.Namespace) -> Path:
    root = args.data
    if not root.is_dir():
        raise SystemExit(f"--data {root}: not a directory")
    return root / "train" if (root / "train").is_dir() else root


def count_classes(args: argparse.Namespace) -> int:
    if args.dry_run:
        return DRY_RUN_CLASSES
    from torchvision.datasets.folder import find_classes

    return len(find_classes(str(train_dir(args)))[0])


def datasets(args: argparse.Namespace, size: tuple[int, int], mean, std) -> tuple[Dataset, Dataset | None, int]:
    if args.dry_run:
        g = torch.Generator().manual_seed(1234)
        n, classes = 64, DRY_RUN_CLASSES
        y = torch.arange(n) % classes
        x = torch.randn(n, 3, *size, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.25  # learnable, barely
        return TensorDataset(x, y), TensorDataset(x[:16], y[:16]), classes

    from torchvision import datasets as tvd
    from torchvision import transforms as T

    norm = T.Normalize(mean, std)
    train_tf = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    resize = tuple(int(math.floor(s / 0.875)) for s in size)
    val_tf = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(size), T.ToTensor(), norm])
    root, tdir = args.data, train_dir(args)
    val_dir = next((root / d for d in ("val", "validation", "test") if (root / d).is_dir()), None)
    train = tvd.ImageFolder(str(tdir), transform=train_tf)
    val = tvd.ImageFolder(str(val_dir), transform=val_tf) if val_dir is not None else None
    if val is not None and val.classes != train.classes:
        raise SystemExit(f"{val_dir} has other classes than {tdir}")
    return train, val, len(train.classes)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "token" in name
         else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), transient=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: torch.dtype | None) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = logits_of(model(x))
        correct += (logits.argmax(-1) == y).sum().item()
        total += y.numel()
    model.train(was)
    return correct / max(1, total)


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    d = Dist()
    # the gradient of a (C, 1, k, k) depth-wise kernel fed a channels-last grid has strides (9, 1, 3, 1): the
    # same memory layout as the parameter's (9, 9, 3, 1), but DDP compares strides literally and warns once
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    def log(msg: str) -> None:
        if d.main:
            print(msg, flush=True)

    model = build_model(args, count_classes(args), log)  # the head gets the number of classes of the data
    size, (mean, std) = input_size(model), mean_std(model)
    train_set, val_set, num_classes = datasets(args, size, mean, std)
    torch.manual_seed(args.seed + d.rank)
    report = (localify.mark_trainable(model, "locality", head=args.head) if args.locality_only
              else localify.TrainableReport.of(model, "all"))
    log(f"{args.model}: {args.variant} in blocks {args.layers}; {num_classes} classes; input {size[0]}x{size[1]}; "
        f"world size {d.world}; device {d.device}")
    log(str(report))

    model.to(d.device).train()
    if d.world > 1 and args.variant == "localvit":
        localify.sync_batchnorm(model)  # after .to(device): torch's SyncBatchNorm on CUDA, all-reduce BN on CPU
    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                  else None)
    if args.compile:
        net = torch.compile(net)

    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if d.world > 1 else None
    workers = args.workers
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, pin_memory=d.device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0)
    if len(loader) == 0:
        raise SystemExit(f"the training set ({len(train_set)} images over {d.world} process(es)) is smaller than "
                         f"one batch of {args.batch_size}")
    val_loader = (DataLoader(val_set, batch_size=args.batch_size, num_workers=workers)
                  if val_set is not None and d.main else None)
    total = args.steps or args.epochs * len(loader)
    epochs = math.ceil(total / len(loader))
    warmup = args.warmup_steps if args.warmup_steps >= 0 else int(0.05 * total)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, total, warmup, args.min_lr / args.lr))
    amp = None
    if args.amp != "off" and d.device.type == "cuda":
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            args.amp, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    elif args.amp in ("bf16", "fp16"):
        amp = torch.bfloat16  # CPU autocast runs bf16
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp == torch.float16)

    out = args.output
    if d.main:
        out.mkdir(parents=True, exist_ok=True)

    def save(name: str) -> Path | None:
        path = None
        if d.main:
            path = localify.save(model, out / name, weights=args.save_weights, force=True)
        d.barrier()
        return path

    step, loss_avg, t0 = 0, float("nan"), time.perf_counter()
    acc = None
    with progress(d.main and not args.no_progress) as bar:
        task = bar.add_task("train", total=total, info="") if bar is not None else None
        for epoch in range(epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            for x, y in loader:
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
                    loss = F.cross_entropy(logits_of(net(x)).float(), y, label_smoothing=args.label_smoothing)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if args.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
                if task is not None:
                    bar.update(task, advance=1, info=f"loss {loss_avg:.4f} lr {sched.get_last_lr()[0]:.2e}")
                elif step % args.log_every == 0 or step == total:
                    log(f"step {step}/{total} loss {loss_avg:.4f} lr {sched.get_last_lr()[0]:.2e}")
                if args.save_every and step % args.save_every == 0:
                    save(f"step_{step}.safetensors")
                if step >= total:
                    break
            if val_loader is not None:
                acc = evaluate(model, val_loader, d.device, amp)
                log(f"epoch {epoch + 1}/{epochs}: val top-1 {100 * acc:.2f}%")
            d.barrier()
            if step >= total:
                break

    final = save("last.safetensors")
    elapsed = time.perf_counter() - t0
    log(f"{step} steps in {elapsed:.1f} s; final loss {d.mean(loss_avg):.4f}; saved {out / 'last.safetensors'}")
    if args.export_onnx and d.main:
        info = localify.export_onnx(model.eval(), args.export_onnx, force=True)
        log(str(info))
    summary = {"steps": step, "world_size": d.world, "loss": loss_avg, "val_acc": acc, "trainable": str(report),
               "num_classes": num_classes, "checkpoint": final, "seconds": elapsed}
    # DDP's reducer and the last step's autograd graph (all-reduce BatchNorm) hold the process group: let them go
    # before it is destroyed, not at interpreter exit (a gloo abort at exit was seen once under load)
    net = loss = None
    gc.collect()
    d.close()
    return summary


if __name__ == "__main__":
    main()
