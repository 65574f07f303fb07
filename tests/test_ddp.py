"""Distributed training of converted models: DDP on CPU (gloo) with two processes on loopback,
SyncBatchNorm for the ``localvit`` BatchNorms, checkpoints from rank 0; and the example training script."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import localify

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


ARCH = dict(embed_dim=32, depth=2, num_heads=2, img_size=32)  # the tiny ViT of ddp_worker.py
ARCH_ARG = ",".join(f"{k}={v}" for k, v in ARCH.items())
WORKER_THREADS = 1  # torch threads of every worker process (OMP_NUM_THREADS and ddp_worker.py)


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, as the worker processes do: reductions then split the same way."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(WORKER_THREADS), "MASTER_ADDR": "127.0.0.1",
           "PYTHONPATH": str(ROOT)}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """Ranks train on different data and end with identical weights; with SyncBatchNorm the run equals one
    process training on the whole batch; rank 0's localify.save checkpoint reloads with localify.load."""
    _torchrun([str(HERE / "ddp_worker.py"), str(tmp_path), "dwconv,localvit"])
    for variant in ("dwconv", "localvit"):
        r0 = load_file(str(tmp_path / f"{variant}-rank0.safetensors"))
        r1 = load_file(str(tmp_path / f"{variant}-rank1.safetensors"))
        assert r0.keys() == r1.keys()
        for k in r0:  # bitwise: every rank applies the same all-reduced gradients to the same weights
            assert torch.equal(r0[k], r1[k]), (variant, k)
        ref = load_file(str(tmp_path / f"{variant}-reference.safetensors"))
        start = localify.create_model("vit_small_patch16_224", **ARCH, num_classes=4)
        moved = 0
        for k in r0:  # equal to the single-process full-batch run (SyncBatchNorm statistics included)
            assert torch.allclose(r0[k].double(), ref[k].double(), rtol=1e-4, atol=1e-5), (variant, k)
            moved += k in start.state_dict() and not torch.equal(r0[k], start.state_dict()[k])
        assert moved > 0
        if variant == "localvit":
            assert "blocks.0.mlp.bn2.running_var" in r0
            assert not torch.equal(r0["blocks.0.mlp.bn2.running_mean"], torch.zeros_like(r0["blocks.0.mlp.bn2.running_mean"]))
        back = localify.load(tmp_path / f"{variant}-ckpt.safetensors")
        sd = back.state_dict()
        for k in r0:
            assert torch.equal(sd[k], r0[k]), (variant, k)
        io = load_file(str(tmp_path / f"{variant}-outputs.safetensors"))
        with torch.no_grad(), _num_threads(WORKER_THREADS):  # same thread count as the workers, and a
            torch.testing.assert_close(back(io["x"]), io["y"], rtol=1e-5, atol=1e-6)  # tolerance all the same


def test_sync_batchnorm_converts_localvit_blocks():
    torch.manual_seed(0)
    model = localify.create_model("vit_small_patch16_224", **ARCH, num_classes=4)
    localify.localify(model, variant="localvit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn = model.blocks[0].mlp.bn1
    out = localify.sync_batchnorm(model)
    assert out is model
    new = model.blocks[0].mlp.bn1
    assert isinstance(new, localify.AllReduceBatchNorm)  # on CPU; torch.nn.SyncBatchNorm on CUDA
    assert new.weight is bn.weight and new.running_mean is bn.running_mean  # shared, not copied
    assert model.state_dict().keys() == before.keys()
    # without a process group it is a plain BatchNorm: same outputs in train and eval mode on (rows, C)
    x = torch.randn(2, 3, 32, 32)
    ref = localify.create_model("vit_small_patch16_224", **ARCH, num_classes=4)
    localify.localify(ref, variant="localvit")
    ref.load_state_dict(before)
    for mode in (True, False):
        model.train(mode)
        ref.train(mode)
        torch.testing.assert_close(model(x), ref(x))
    # torch's own converter also accepts the (rows, C) BatchNorm1d calls (it needs CUDA to synchronise)
    ref2 = torch.nn.SyncBatchNorm.convert_sync_batchnorm(ref)
    assert isinstance(ref2.blocks[1].mlp.bn3, torch.nn.SyncBatchNorm)
    ref2.eval()
    model.eval()
    torch.testing.assert_close(ref2(x), model(x))


# ------------------------------------------------------------------------------------------------ examples/train.py
def _train_script():
    spec = importlib.util.spec_from_file_location("localify_train_example", ROOT / "examples" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_script_dry_run(tmp_path):
    train = _train_script()
    out = tmp_path / "run"
    summary = train.main([
        "vit_small_patch16_224", "--model-kwargs", ARCH_ARG,
        "--dry-run", "--steps", "2", "--batch-size", "4", "--variant", "localvit", "--locality-only", "--head",
        "--output", str(out), "--workers", "0", "--no-progress",
    ])
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert summary["trainable"].startswith("trainable params:")
    ckpt = out / "last.safetensors"
    assert ckpt.exists()
    recipe = localify.read_recipe(ckpt)
    assert recipe["config"]["variant"] == "localvit" and recipe["weights"] == "all"
    model = localify.load(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, summary["num_classes"])
        assert torch.isfinite(F.softmax(model(x), -1)).all()


def test_train_script_pretrained(tmp_path, offline_hf_cache):
    """--pretrained: timm's released weights from the (offline) cache, the head re-made for the new classes;
    with --locality-only the backbone stays what was released."""
    torch.manual_seed(4)
    released = localify.create_model("vit_small_patch16_224", **ARCH).state_dict()
    offline_hf_cache("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", released)
    summary = _train_script().main([
        "vit_small_patch16_224", "--model-kwargs", ARCH_ARG, "--pretrained",
        "--dry-run", "--steps", "1", "--batch-size", "4", "--locality-only", "--head", "--output",
        str(tmp_path / "run"), "--workers", "0", "--no-progress",
    ])
    model = localify.load(tmp_path / "run" / "last.safetensors")
    assert model.head.out_features == summary["num_classes"] != 1000
    for name in ("patch_embed.proj.weight", "pos_embed", "blocks.1.attn.qkv.weight"):
        assert torch.equal(model.get_parameter(name), released[name]), name
    assert torch.equal(model.blocks[0].mlp.fc1.linear.weight, released["blocks.0.mlp.fc1.weight"])


@pytest.mark.slow
def test_train_script_torchrun_imagefolder(tmp_path):
    """The script under torchrun (DDP, DistributedSampler, SyncBatchNorm) on a small ImageFolder dataset."""
    pytest.importorskip("PIL")
    from PIL import Image

    for c, color in enumerate(("red", "blue")):
        d = tmp_path / "data" / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40 + 4 * i, 36), color).save(d / f"{i}.png")
    out = tmp_path / "run"
    proc = _torchrun([str(ROOT / "examples" / "train.py"), "vit_small_patch16_224", "--model-kwargs",
                      ARCH_ARG, "--data", str(tmp_path / "data"),
                      "--steps", "2", "--batch-size", "2", "--variant", "localvit", "--output", str(out),
                      "--workers", "0", "--no-progress", "--save-every", "1"])
    assert "world size 2" in proc.stdout
    model = localify.load(out / "last.safetensors")
    assert model.head.out_features == 2  # the classes of the folder
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 6  # plain BatchNorm again
