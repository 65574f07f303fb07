"""A small-scale reproduction of LocalViT's claim on real data: does locality make a ViT learn better?

Data: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; ships with the package, offline),
upsampled to 16x16, fixed stratified split (1,397 train / 400 validation, seed 0). Model: a tiny DeiT-style
ViT (timm ``VisionTransformer``: 16x16 input, 2x2 patches -> an 8x8 token grid plus a class token,
embed dim 64, depth 6, 4 heads, MLP ratio 2), trained from scratch, against localified copies
(``variant="localvit"``, the paper's block) on all blocks, the early third, the late third, with GELU instead
of h-swish, with SE, and a control without locality (the same block with a 1x1 depth-wise kernel: BatchNorm
and h-swish but no spatial mixing). Every setting uses the same optimiser, schedule, augmentation, epochs and seeds, and
for a given seed the same initial weights (the localvit blocks take fc1/fc2 from the ViT they replace) and
the same batch order: the comparison is paired.

    python examples/reproduce.py --out out/repro            # the whole study: 7 settings x 3 seeds x 12 epochs
    python examples/reproduce.py --quick --out out/quick    # 1 seed, 3 epochs, 3 settings: a smoke run for CI
    python examples/reproduce.py --epochs 30 --seeds 0 --settings baseline localvit-early --out out/long

The whole study takes 11.6 min (23 min of CPU) with 2 threads on an idle 2-core machine; ``--threads`` sets
torch's thread count (2 by default; use 1 when the cores are busy, 2 threads then run several times slower).

Writes into ``--out``: ``results.json`` (every curve), ``results.md`` (mean +- std table), ``curves.png``
(training loss and validation accuracy per epoch) and ``placement.png`` (final accuracy per setting).
The functions are importable (``examples/03_reproduction.ipynb`` uses them).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import localify

__all__ = [
    "StudyConfig",
    "SETTINGS",
    "QUICK",
    "load_data",
    "make_vit",
    "build_model",
    "train_model",
    "evaluate",
    "locality_only",
    "finetune",
    "run_study",
    "summarize",
    "results_markdown",
    "plot_curves",
    "plot_placement",
    "write_outputs",
    "main",
]

# setting name -> localify options (None: the plain ViT). Same names in results.json / results.md.
SETTINGS: dict[str, dict | None] = {
    "baseline": None,
    "localvit-early": {"layers": "early", "variant": "localvit", "act": "hswish"},
    "localvit-late": {"layers": "late", "variant": "localvit", "act": "hswish"},
    "localvit-all": {"layers": "all", "variant": "localvit", "act": "hswish"},
    "localvit-all-gelu": {"layers": "all", "variant": "localvit", "act": "gelu"},
    "localvit-all-se": {"layers": "all", "variant": "localvit", "act": "hswish", "attention": "se",
                        "se_hidden": 4},
    # control: the same block with a 1x1 "depth-wise" kernel, i.e. BN + h-swish + per-channel scale and no
    # spatial mixing. What localvit-all gains over this is locality; what this gains over baseline is not.
    "localvit-all-k1": {"layers": "all", "variant": "localvit", "act": "hswish", "kernel_size": 1},
}


@dataclass
class StudyConfig:
    """Everything that defines a run. Fixed before any result was looked at; identical for every setting."""

    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3  # AdamW, peak learning rate
    weight_decay: float = 0.05
    warmup_epochs: int = 2  # linear warm-up, then cosine decay to 0 (per step)
    shift: int = 2  # augmentation: random translation by up to +-shift pixels (of 16), zero fill
    image_size: int = 16  # digits are upsampled 8x8 -> image_size x image_size (bilinear)
    patch_size: int = 2
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 2.0
    n_val: int = 400  # fixed stratified validation split
    split_seed: int = 0
    train_fraction: float = 1.0  # use only this (stratified) fraction of the 1,397 training images
    threads: int = 2


QUICK = {"seeds": [0], "epochs": 3, "settings": ["baseline", "localvit-all", "localvit-early"]}


# ------------------------------------------------------------------------------------------------ data
def load_data(cfg: StudyConfig) -> dict[str, torch.Tensor]:
    """The digits as float tensors ``(N, 1, S, S)`` normalised with the training mean/std, and int labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), values 0..1
    y = digits.target.astype(np.int64)
    idx_tr, idx_va = train_test_split(np.arange(len(y)), test_size=cfg.n_val, stratify=y,
                                      random_state=cfg.split_seed)
    if cfg.train_fraction < 1.0:
        idx_tr, _ = train_test_split(idx_tr, train_size=cfg.train_fraction, stratify=y[idx_tr],
                                     random_state=cfg.split_seed)
    t = torch.from_numpy(x).unsqueeze(1)
    if cfg.image_size != 8:
        t = F.interpolate(t, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    mean, std = t[idx_tr].mean(), t[idx_tr].std()
    t = (t - mean) / std
    return {"x_train": t[idx_tr].contiguous(), "y_train": torch.from_numpy(y[idx_tr]),
            "x_val": t[idx_va].contiguous(), "y_val": torch.from_numpy(y[idx_va]),
            "fill": -mean / std}  # the normalised value of a blank pixel, for the augmentation


def random_shift(x: torch.Tensor, max_shift: int, fill: float, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an independent random integer offset in [-max_shift, max_shift]."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=float(fill))
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * p)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


# ----------------------------------------------------------------------------------------------- models
def make_vit(cfg: StudyConfig) -> nn.Module:
    """The tiny DeiT-style ViT (class token, token pooling), random init from the current RNG state."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=1, num_classes=10,
                             embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                             mlp_ratio=cfg.mlp_ratio, class_token=True, global_pool="token")


def build_model(setting: str, seed: int, cfg: StudyConfig) -> nn.Module:
    """The ViT for ``seed``, localified as ``SETTINGS[setting]`` says (the same initial ViT for every setting)."""
    torch.manual_seed(seed)
    model = make_vit(cfg)
    opts = SETTINGS[setting]
    if opts is not None:
        opts = dict(opts)
        layers = opts.pop("layers")
        localify.localify(model, layers, **opts)
    return model


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 200) -> tuple[float, float]:
    """(accuracy in %, mean cross-entropy) in eval mode."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        out = model(x[i:i + batch])
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    model.train(was)
    return 100.0 * correct / len(y), loss / len(y)


def train_model(model: nn.Module, data: dict, cfg: StudyConfig, seed: int, *, epochs: int | None = None,
                params: Any = None, log: Any = None) -> dict:
    """Train with AdamW + warm-up + cosine; returns per-epoch ``train_loss``, ``val_acc``, ``val_loss``.

    ``params`` restricts the optimiser (e.g. locality-only fine-tuning); by default every parameter with
    ``requires_grad``. The batch order and augmentation come from a generator seeded with ``seed``.
    """
    epochs = cfg.epochs if epochs is None else epochs
    gen = torch.Generator().manual_seed(10_000 + seed)
    x, y = data["x_train"], data["y_train"]
    n = len(y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = epochs * steps_per_epoch
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    hist: dict[str, list[float]] = {"train_loss": [], "val_acc": [], "val_loss": [], "epoch_s": []}
    step = 0
    model.train()
    for ep in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        run_loss = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            xb = random_shift(x[idx], cfg.shift, data["fill"], gen)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item() * len(idx)
            step += 1
        acc, vloss = evaluate(model, data["x_val"], data["y_val"])
        hist["train_loss"].append(run_loss / n)
        hist["val_acc"].append(acc)
        hist["val_loss"].append(vloss)
        hist["epoch_s"].append(time.perf_counter() - t0)
        if log is not None:
            log(f"    epoch {ep + 1:3d}/{epochs}  train loss {run_loss / n:.4f}  val acc {acc:6.2f}%")
    return hist


def locality_only(model: nn.Module) -> int:
    """Freeze everything but what localify added (locality-only fine-tuning); returns the trainable count.

    Uses ``localify.mark_trainable(model, "locality")`` where this localify has it, else keeps only the
    parameters whose name contains ``dwconv`` trainable.
    """
    if hasattr(localify, "mark_trainable"):
        localify.mark_trainable(model, "locality")
    else:
        for name, p in model.named_parameters():
            p.requires_grad_("dwconv" in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 10, lr: float = 1e-3,
             batch: int = 32, seed: int = 0) -> list[float]:
    """A few AdamW steps on random batches of ``(x, y)`` over the trainable parameters; returns the losses.
    Works for timm models (logits) and Hugging Face models (``.logits``). Leaves the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=gen)
        out = model(x[idx])
        loss = F.cross_entropy(getattr(out, "logits", out), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------------ study
def run_study(cfg: StudyConfig, *, log: Any = print) -> dict:
    """Train every setting x seed; returns the results dict that :func:`write_outputs` saves."""
    torch.set_num_threads(cfg.threads)
    data = load_data(cfg)
    t_start, c_start = time.perf_counter(), time.process_time()
    runs: dict[str, list[dict]] = {}
    n_params: dict[str, int] = {}
    for setting in cfg.settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
        runs[setting] = []
        for seed in cfg.seeds:
            t0, c0 = time.perf_counter(), time.process_time()
            model = build_model(setting, seed, cfg)
            n_params[setting] = sum(p.numel() for p in model.parameters())
            hist = train_model(model, data, cfg, seed)
            hist["seed"] = seed
            hist["wall_s"] = time.perf_counter() - t0
            hist["cpu_s"] = time.process_time() - c0  # CPU time of all threads: contention does not inflate it
            runs[setting].append(hist)
            if log is not None:
                log(f"{setting:18s} seed {seed}: val acc {hist['val_acc'][-1]:6.2f}%  "
                    f"train loss {hist['train_loss'][-1]:.4f}  ({hist['wall_s']:.1f} s)")
    return {
        "config": asdict(cfg),
        "settings": {s: SETTINGS[s] for s in cfg.settings},
        "params": n_params,
        "n_train": len(data["y_train"]),
        "n_val": len(data["y_val"]),
        "runs": runs,
        "total_s": time.perf_counter() - t_start,
        "total_cpu_s": time.process_time() - c_start,
        "env": {"python": platform.python_version(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "machine": platform.machine()},
    }


def _mean_std(v: list[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(results: dict) -> list[dict]:
    """One row per setting: final val acc / train loss (mean, std over seeds) and the paired difference in
    final val acc to the baseline run of the same seed (when the baseline was run)."""
    runs = results["runs"]
    base = {r["seed"]: r for r in runs.get("baseline", [])}
    rows = []
    for setting, rs in runs.items():
        acc = [r["val_acc"][-1] for r in rs]
        loss = [r["train_loss"][-1] for r in rs]
        row = {"setting": setting, "seeds": len(rs), "params": results["params"][setting],
               "val_acc": _mean_std(acc), "train_loss": _mean_std(loss),
               "best_val_acc": _mean_std([max(r["val_acc"]) for r in rs]),
               "wall_s": float(np.mean([r["wall_s"] for r in rs]))}
        paired = [r["val_acc"][-1] - base[r["seed"]]["val_acc"][-1] for r in rs if r["seed"] in base]
        row["delta_acc"] = _mean_std(paired) if paired and setting != "baseline" else None
        wins = [r["val_acc"][-1] > base[r["seed"]]["val_acc"][-1] for r in rs if r["seed"] in base]
        row["wins"] = f"{sum(wins)}/{len(wins)}" if wins and setting != "baseline" else ""
        rows.append(row)
    return rows


def _describe(setting: str) -> str:
    o = SETTINGS[setting]
    if o is None:
        return "plain ViT (GELU MLP)"
    blocks = {"all": "all 6 blocks", "early": "blocks 1-2", "late": "blocks 5-6"}.get(o["layers"], o["layers"])
    extra = ", SE (hidden 4)" if o.get("attention") == "se" else ""
    if o.get("kernel_size", 3) != 3:
        extra += f", {o['kernel_size']}x{o['kernel_size']} kernel" + (" (no locality)" if o["kernel_size"] == 1
                                                                       else "")
    return f"{blocks}, {o['act'] if o['act'] != 'hswish' else 'h-swish'}{extra}"


def results_markdown(results: dict) -> str:
    """The results table (markdown) with the run's configuration underneath."""
    cfg = results["config"]
    rows = summarize(results)
    lines = [
        "| setting | localvit blocks | params | final val acc (%) | vs baseline, paired (pp) | beats baseline "
        "| final train loss | best val acc (%) |",
        "|---|---|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        def ms(v: tuple[float, float], digits: int = 2, sign: str = "", n: int = r["seeds"]) -> str:
            return f"{v[0]:{sign}.{digits}f}" + (f" ± {v[1]:.{digits}f}" if n > 1 else "")  # no std of 1 seed

        d = r["delta_acc"]
        delta = "" if d is None else ms(d, sign="+")
        lines.append(
            f"| {r['setting']} | {_describe(r['setting'])} | {r['params']:,} | {ms(r['val_acc'])} | {delta} | "
            f"{r['wins']} | {ms(r['train_loss'], 4)} | {ms(r['best_val_acc'])} |"
        )
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    lines += [
        "",
        f"{'mean ± std over seeds' if len(cfg['seeds']) > 1 else 'seed'} {seeds}; {results['n_train']} training / {results['n_val']} validation "
        f"images (1 validation image = {100 / results['n_val']:.2f} pp); {cfg['epochs']} epochs, batch "
        f"{cfg['batch_size']}, AdamW lr {cfg['lr']:g} wd {cfg['weight_decay']:g}, {cfg['warmup_epochs']} "
        f"warm-up epochs + cosine, random shifts of ±{cfg['shift']} px; ViT {cfg['image_size']}x"
        f"{cfg['image_size']} input, patch {cfg['patch_size']}, dim {cfg['embed_dim']}, depth {cfg['depth']}, "
        f"{cfg['num_heads']} heads, MLP ratio {cfg['mlp_ratio']:g}. \"paired\": final val acc minus the "
        f"baseline's for the same seed (same initial weights, same batches). Study time "
        f"{results['total_s'] / 60:.1f} min wall, {results.get('total_cpu_s', 0) / 60:.1f} min CPU "
        f"({results['env']['threads']} thread(s)).",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots
def _colors(settings: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    order = list(SETTINGS)  # a setting keeps its colour whichever settings a run has
    return {s: ("black" if s == "baseline" else cmap(order.index(s) - 1 if s in order else 9)) for s in settings}


def plot_curves(results: dict, path: str | Path | None = None):
    """Training loss and validation accuracy per epoch: mean over seeds, shaded +- std."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = results["runs"]
    colors = _colors(list(runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax, title in (("train_loss", axes[0], "training loss"), ("val_acc", axes[1],
                                                                     "validation accuracy (%)")):
        for setting, rs in runs.items():
            a = np.asarray([r[key] for r in rs], dtype=float)
            ep = np.arange(1, a.shape[1] + 1)
            m = a.mean(0)
            s = a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(m)
            lw = 2.2 if setting == "baseline" else 1.4
            ax.plot(ep, m, color=colors[setting], lw=lw, label=setting)
            ax.fill_between(ep, m - s, m + s, color=colors[setting], alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].set_ylim(0, 100)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    n = len(next(iter(runs.values())))
    fig.suptitle(f"digits, tiny ViT trained from scratch: mean ± std over {n} seed(s)")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    if path is not None:
        fig.savefig(path, dpi=80)
        plt.close(fig)
    return fig


def plot_placement(results: dict, path: str | Path | None = None):
    """Final validation accuracy per setting (bar: mean, line: std, dots: seeds), baseline as a dashed line."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = summarize(results)
    colors = _colors([r["setting"] for r in rows])
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    for i, r in enumerate(rows):
        m, s = r["val_acc"]
        ax.bar(i, m, yerr=s, color=colors[r["setting"]], alpha=0.75, capsize=4)
        pts = [run["val_acc"][-1] for run in results["runs"][r["setting"]]]
        ax.scatter([i] * len(pts), pts, color="k", s=10, zorder=3)
    base = [r["val_acc"][0] for r in rows if r["setting"] == "baseline"]
    if base:
        ax.axhline(base[0], color="k", ls="--", lw=1, label="baseline mean")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(range(len(rows)), [r["setting"] for r in rows], rotation=20, ha="right", fontsize=8)
    vals = [v for rs in results["runs"].values() for v in (run["val_acc"][-1] for run in rs)]
    ax.set_ylim(max(0.0, min(vals) - 3), min(100.0, max(vals) + 1.5))
    ax.set_ylabel("final val. accuracy (%)\n(axis cut)")
    ax.set_title("where locality goes: final validation accuracy per setting")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
        plt.close(fig)
    return fig


def write_outputs(results: dict, out: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md``, ``curves.png``, ``placement.png`` in ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "results.md", "curves.png", "placement.png")}
    paths["results.json"].write_text(json.dumps(results, indent=1))
    paths["results.md"].write_text(results_markdown(results))
    plot_curves(results, paths["curves.png"])
    plot_placement(results, paths["placement.png"])
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/repro"), help="where the table and plots go")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run for CI: {QUICK['epochs']} epochs, seed(s) {QUICK['seeds']}, settings "
                         f"{', '.join(QUICK['settings'])}")
    ap.add_argument("--epochs", type=int, help="override the number of epochs")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="override the settings")
    ap.add_argument("--train-fraction", type=float, default=1.0,
                    help="train on this stratified fraction of the training split (data-size check)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    cfg = StudyConfig(threads=args.threads, train_fraction=args.train_fraction)
    if args.quick:
        cfg.seeds, cfg.epochs, cfg.settings = list(QUICK["seeds"]), QUICK["epochs"], list(QUICK["settings"])
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.settings is not None:
        cfg.settings = args.settings
    print(f"settings: {', '.join(cfg.settings)}; seeds {cfg.seeds}; {cfg.epochs} epochs", flush=True)
    results = run_study(cfg, log=lambda s: print(s, flush=True))
    paths = write_outputs(results, args.out)
    print()
    print(paths["results.md"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
