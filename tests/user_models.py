"""Hand-written Vision Transformers that no library ships, used as "user model" test cases.

Plain PyTorch only (no timm / transformers / localify imports). Both models are tiny and
randomly initialised; they exist to exercise token-layout inference on code localify has
never seen:

* ``T2TViT``  - Tokens-to-Token ViT (T2T-ViT-7 style). Two token-transformer layers run on
  56x56 and 28x28 token grids *without* a class token, with soft splits (``nn.Unfold``) and
  token -> image reshapes in between, followed by a standard ViT backbone on 14x14 patches
  + 1 class token.
* ``PVTv1``   - Pyramid Vision Transformer v1 style. Four stages (56, 28, 14, 7 at 224 input)
  with spatial-reduction attention; only the last stage prepends a class token.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["T2TViT", "PVTv1"]


def _unfold_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MultiHeadAttention(nn.Module):
    """Plain multi-head self-attention on (B, N, C) tokens."""

    def __init__(self, dim: int, num_heads: int = 2):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    """Standard pre-norm ViT block."""

    def __init__(self, dim: int, num_heads: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


# --------------------------------------------------------------------------------------
# T2T-ViT
# --------------------------------------------------------------------------------------


class TokenAttention(nn.Module):
    """Single-head attention whose value/output dim differs from its input dim (as in T2T-ViT).

    Because the dims differ there is no ordinary residual; T2T adds the values instead.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.scale = out_dim**-0.5
        self.qkv = nn.Linear(in_dim, out_dim * 3)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.out_dim).permute(2, 0, 1, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = self.proj(attn @ v)
        return v + x


class TokenTransformer(nn.Module):
    """T2T token-transformer layer: x = attn(norm1(x)); x = x + mlp(norm2(x)) (mlp ratio 1)."""

    def __init__(self, in_dim: int, out_dim: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = TokenAttention(in_dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class T2TViT(nn.Module):
    """Tiny Tokens-to-Token ViT.

    At 224x224 input: soft split 7/4/2 -> 56x56 tokens -> token transformer -> image
    -> soft split 3/2/1 -> 28x28 -> token transformer -> image -> soft split 3/2/1 -> 14x14
    -> Linear to embed_dim -> [cls] + 196 tokens + pos embed -> ``depth`` ViT blocks.
    """

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 10,
        in_chans: int = 3,
        token_dim: int = 16,
        embed_dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        self.img_size = img_size
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenTransformer(in_chans * 7 * 7, token_dim, mlp_ratio=1.0)
        self.attention2 = TokenTransformer(token_dim * 3 * 3, token_dim, mlp_ratio=1.0)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

        g = _unfold_out(_unfold_out(_unfold_out(img_size, 7, 4, 2), 3, 2, 1), 3, 2, 1)
        self.num_patches = g * g
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        # explicit grid sizes from the input size (no sqrt)
        h1, w1 = _unfold_out(H, 7, 4, 2), _unfold_out(W, 7, 4, 2)
        h2, w2 = _unfold_out(h1, 3, 2, 1), _unfold_out(w1, 3, 2, 1)

        x = self.soft_split0(x).transpose(1, 2)  # (B, h1*w1, C*49)
        x = self.attention1(x)  # (B, h1*w1, token_dim)
        x = x.transpose(1, 2).reshape(B, -1, h1, w1)

        x = self.soft_split1(x).transpose(1, 2)  # (B, h2*w2, token_dim*9)
        x = self.attention2(x)
        x = x.transpose(1, 2).reshape(B, -1, h2, w2)

        x = self.soft_split2(x).transpose(1, 2)  # (B, h3*w3, token_dim*9)
        x = self.project(x)

        cls = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.head(x[:, 0])


# --------------------------------------------------------------------------------------
# PVT v1
# --------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Strided-conv patch embedding returning tokens and the explicit (H, W) grid."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x), H, W


class SRAttention(nn.Module):
    """Spatial-reduction attention: keys/values come from a strided conv over the token grid."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        if self.sr_ratio > 1:
            x_ = x.transpose(1, 2).reshape(B, C, H, W)
            x_ = self.sr(x_).reshape(B, C, -1).transpose(1, 2)
            x_ = self.norm(x_)
        else:
            x_ = x
        kv = self.kv(x_).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class PVTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SRAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        x = x + self.mlp(self.norm2(x))
        return x


class PVTv1(nn.Module):
    """Tiny Pyramid Vision Transformer v1 (4 stages, 1 block each, cls token only in stage 4)."""

    def __init__(
        self,
        img_size: int = 224,
        num_classes: int = 10,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (8, 16, 24, 32),
        num_heads: tuple[int, ...] = (1, 2, 3, 4),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        patch_sizes: tuple[int, ...] = (4, 2, 2, 2),
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.num_stages = len(embed_dims)
        self.patch_embeds = nn.ModuleList()
        self.pos_embeds = nn.ParameterList()
        self.blocks = nn.ModuleList()
        size, prev = img_size, in_chans
        for i, (dim, heads, sr, p) in enumerate(
            zip(embed_dims, num_heads, sr_ratios, patch_sizes, strict=True)
        ):
            size = size // p
            n = size * size + (1 if i == self.num_stages - 1 else 0)
            self.patch_embeds.append(PatchEmbed(prev, dim, p))
            pos = nn.Parameter(torch.zeros(1, n, dim))
            nn.init.trunc_normal_(pos, std=0.02)
            self.pos_embeds.append(pos)
            self.blocks.append(PVTBlock(dim, heads, sr, mlp_ratio))
            prev = dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.norm = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        for i in range(self.num_stages):
            x, H, W = self.patch_embeds[i](x)
            last = i == self.num_stages - 1
            if last:
                x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
            x = x + self.pos_embeds[i]
            x = self.blocks[i](x, H, W)
            if not last:
                x = x.transpose(1, 2).reshape(B, -1, H, W)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.head(x[:, 0])


if __name__ == "__main__":  # pragma: no cover - quick manual check
    for cls in (T2TViT, PVTv1):
        m = cls().eval()
        print(cls.__name__, sum(p.numel() for p in m.parameters()), m(torch.randn(2, 3, 224, 224)).shape)
