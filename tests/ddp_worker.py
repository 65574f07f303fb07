"""Worker for tests/test_ddp.py, started by ``python -m torch.distributed.run --nproc_per_node=2``.

For each variant: a tiny converted ViT (same seed on every rank) trains 3 SGD steps under
DistributedDataParallel (gloo, CPU) on different data per rank; ``localvit`` BatchNorms are synchronised with
``localify.sync_batchnorm``. Every rank writes its final state dict; rank 0 also saves the model with
``localify.save``, the outputs of that model on a fixed input, and a single-process reference trained on the
concatenated batch of both ranks (with plain BatchNorm), which DDP + SyncBatchNorm must reproduce.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

import localify

STEPS = 3
PER_RANK = 4


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(PER_RANK, 3, 32, 32, generator=g), torch.randint(0, 4, (PER_RANK,), generator=g)


def build(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = localify.create_model("vit_small_patch16_224", embed_dim=32, depth=2, num_heads=2, img_size=32,
                                  num_classes=4)
    localify.localify(model, variant=variant)
    with torch.no_grad():  # the identity kernels would make every rank's update look alike: perturb them
        for m in model.modules():
            if isinstance(m, (localify.LocalityLinear, localify.LocalViTFFN)):
                m.dwconv.weight.add_(0.1 * torch.randn_like(m.dwconv.weight))
    return model


def train(model: torch.nn.Module, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for x, y in steps:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(out: Path, variants: list[str]) -> None:
    torch.set_num_threads(1)  # tests/test_ddp.py recomputes outputs with as many threads (WORKER_THREADS)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for variant in variants:
        model = build(variant)
        reference = copy.deepcopy(model)
        if variant == "localvit":
            localify.sync_batchnorm(model)
            assert sum(isinstance(m, localify.AllReduceBatchNorm) for m in model.modules()) == 6
        ddp = DistributedDataParallel(model)
        train(ddp, [batch(rank, s) for s in range(STEPS)])
        model.eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{variant}-rank{rank}.safetensors"))
        if rank == 0:
            localify.save(model, out / f"{variant}-ckpt.safetensors")
            x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                save_file({"x": x, "y": model(x)}, str(out / f"{variant}-outputs.safetensors"))
            full = [tuple(torch.cat(t) for t in zip(*(batch(r, s) for r in range(world)))) for s in range(STEPS)]
            train(reference, full)
            save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
                      str(out / f"{variant}-reference.safetensors"))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
