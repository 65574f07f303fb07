"""A plain re-implementation of the LocalViT paper's own locality FFN, to benchmark localify against.

It follows the structure of the paper's public code (arXiv 2104.05707): the class token is split off and
bypasses the FFN, the remaining tokens become an image with ``transpose(1, 2).view(B, C, s, s)`` where
``s = int(sqrt(N))`` (square grids and exactly one class token only), then 1x1 conv + BN + act, depth-wise
3x3 conv + BN + act, optional SE, 1x1 conv + BN, and back to tokens with ``flatten(2).transpose(1, 2)`` and
``torch.cat`` with the class token. Written from the paper's description; no code copied.

Note: used as a timm ``Block.mlp`` the class token leaves the FFN unchanged, so the block adds ``norm2(cls)``
to its residual (the paper's block skips the FFN for the class token instead). The cost is the same.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ReferenceLocalityFFN", "replace_mlps_with_reference"]

_ACTS = {"hswish": nn.Hardswish, "relu6": nn.ReLU6}


class _SELayer(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Hardsigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        y = self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)
        return x * y


class ReferenceLocalityFFN(nn.Module):
    """The paper's locality FFN on (B, 1 + s*s, C) tokens with one class token."""

    def __init__(self, dim: int, hidden: int, act: str = "hswish", se_hidden: int | None = None) -> None:
        super().__init__()
        act_cls = _ACTS[act]
        layers: list[nn.Module] = [
            nn.Conv2d(dim, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            act_cls(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            act_cls(),
        ]
        if se_hidden:
            layers.append(_SELayer(hidden, se_hidden))
        layers += [nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        s = int(math.sqrt(n))  # as in the paper's code: 197 tokens -> 14
        cls_token, x = torch.split(x, [1, n - 1], dim=1)
        x = x.transpose(1, 2).view(b, c, s, s)
        x = self.conv(x).flatten(2).transpose(1, 2)
        return torch.cat([cls_token, x], dim=1)


def replace_mlps_with_reference(
    model: nn.Module, act: str = "hswish", se_hidden: int | None = 4
) -> nn.Module:
    """Replace ``blocks[i].mlp`` of a timm DeiT/ViT (one class token, square grid) in place; returns the model.

    The 1x1 convs are initialised from the MLP's fc1 / fc2 weights (biases dropped), like localify does.
    """
    for blk in model.blocks:
        mlp = blk.mlp
        ffn = ReferenceLocalityFFN(mlp.fc1.in_features, mlp.fc1.out_features, act=act, se_hidden=se_hidden)
        w = mlp.fc1.weight
        ffn = ffn.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            ffn.conv[0].weight.copy_(mlp.fc1.weight[:, :, None, None])
            ffn.conv[-2].weight.copy_(mlp.fc2.weight[:, :, None, None])
        blk.mlp = ffn
    return model
