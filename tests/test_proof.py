"""The position-code proof (``localify._proof.prove_grids``): raster grids are proven with their prefix,
suffix, size and stride; layouts that only look like grids (mask units, blocks, channels as tokens, frames, tiles,
shuffles, windows folded into the batch) are refused with what was found."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from localify._match import match_mlps
from localify._ops import GraphIndex, val_shape
from localify._proof import GridProof, prove_grids
from localify._trace import ExampleInputs, make_example_inputs, trace_model

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16  # token width of the hand-written models


def prove(model: nn.Module, example=None) -> list[GridProof]:
    """Proofs for every MLP of ``model``, in execution order."""
    torch.manual_seed(0)
    model.eval()
    ex = example if isinstance(example, ExampleInputs) else make_example_inputs(model, example)
    tr = trace_model(model, ex)
    idx = GraphIndex(tr.graph, tr.param_names, tr.user_inputs, tr.batch)
    mlps = match_mlps(idx)
    assert mlps, "no MLP found"
    nodes = {m.input: "BHWC" if len(val_shape(m.input)) == 4 else "BNC" for m in mlps}
    res = prove_grids(tr.program, ex, nodes)
    return [res[m.input] for m in mlps]


def image_example(x: torch.Tensor) -> ExampleInputs:
    """Example inputs whose image is ``x`` (any rank: video and tile inputs are not found automatically)."""
    return ExampleInputs((x,), {}, (pytree.SequenceKey(0), pytree.SequenceKey(0)))


# --------------------------------------------------------------------------------------------------- models
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden or 2 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden or 2 * dim, out or dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return self.proj(attn @ v)


class Block(nn.Module):
    def __init__(self, dim: int = D, attn: bool = True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim) if attn else None
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x):
        if self.attn is not None:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Patches(nn.Module):
    """Conv patch embedding -> (B, N, D) raster tokens."""

    def __init__(self, patch: int = 8, dim: int = D, chans: int = 3, **conv):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, conv.pop("kernel_size", patch), stride=patch, **conv)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class UserViT(nn.Module):
    """``prefix`` learned tokens, the patch grid, ``suffix`` learned tokens; a block; optionally the grid
    tokens permuted by ``perm`` and a second block."""

    def __init__(self, img=(32, 32), patch=8, prefix=1, suffix=0, perm=None):
        super().__init__()
        self.img_size = img
        self.patch = Patches(patch)
        n = (img[0] // patch) * (img[1] // patch)
        self.pre = nn.Parameter(torch.randn(1, prefix, D))
        self.post = nn.Parameter(torch.randn(1, suffix, D))
        self.pos = nn.Parameter(torch.randn(1, prefix + n + suffix, D))
        self.prefix, self.n = prefix, n
        self.block1 = Block()
        self.block2 = Block(attn=False) if perm is not None else None
        self.register_buffer("perm", torch.as_tensor(perm if perm is not None else [], dtype=torch.long))

    def forward(self, x):
        x = self.patch(x)
        b = x.shape[0]
        x = torch.cat([self.pre.expand(b, -1, -1), x, self.post.expand(b, -1, -1)], dim=1) + self.pos
        x = self.block1(x)
        if self.block2 is not None:
            p, n = self.prefix, self.n
            x = torch.cat([x[:, :p], x[:, p:p + n][:, self.perm], x[:, p + n:]], dim=1)
            x = self.block2(x)
        return x.mean(1)


class HieraUnroll(nn.Module):
    """Hiera's Unroll (op for op): strided sub-grids moved into the batch, then back: mask-unit order."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(4)  # 8x8 tokens
        self.size, self.schedule = [8, 8], [[2, 2], [2, 2]]
        self.block = Block()

    def unroll(self, x):
        B, _, C = x.shape
        cur = self.size
        x = x.view(*([B] + cur + [C]))
        for strides in self.schedule:
            cur = [i // s for i, s in zip(cur, strides)]
            new_shape = [B] + sum([[i, s] for i, s in zip(cur, strides)], []) + [C]
            x = x.view(new_shape)
            L = len(new_shape)
            x = x.permute([0] + list(range(2, L - 1, 2)) + list(range(1, L - 1, 2)) + [L - 1])
            x = x.flatten(0, len(strides))
            B *= math.prod(strides)
        return x.reshape(-1, math.prod(self.size), C)

    def forward(self, x):
        return self.block(self.unroll(self.patch(x)))


class NestBlockify(nn.Module):
    """NesT: (B, H, W, C) -> (B, blocks, tokens per block, C); the MLP runs on the 4-D tensor."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(4)
        self.mlp = Mlp(D)

    def forward(self, x):
        x = self.patch(x).reshape(x.shape[0], 8, 8, D)
        B, H, W, C = x.shape
        x = x.reshape(B, H // 4, 4, W // 4, 4, C).transpose(2, 3).reshape(B, 4, -1, C)
        return x + self.mlp(x)


class TokenMixer(nn.Module):
    """GroupViT / Mixer style token-mixing MLP on the transposed (B, C, N) tensor."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(8)
        self.norm = nn.LayerNorm(D)
        self.mix = Mlp(16, 32, 16)

    def forward(self, x):
        x = self.patch(x)
        return x + self.mix(self.norm(x).transpose(1, 2)).transpose(1, 2)


class Video(nn.Module):
    """(B, T, C, H, W) -> per-frame patches -> TimeSformer's (patch, time) token order."""

    def __init__(self, frame_major=False):
        super().__init__()
        self.patch = Patches(8)
        self.frame_major = frame_major
        self.block = Block()

    def forward(self, x):
        B, T = x.shape[:2]
        x = self.patch(x.flatten(0, 1))  # (B*T, n, D)
        n = x.shape[1]
        x = x.reshape(B, T, n, D)
        x = x.reshape(B, T * n, D) if self.frame_major else x.transpose(1, 2).reshape(B, n * T, D)
        return self.block(x)


class Tiles(nn.Module):
    """Mllama style (B, images, tiles, C, H, W): each tile's tokens, optionally a class token and padding,
    concatenated on one token axis."""

    def __init__(self, cls=False, pad=0):
        super().__init__()
        self.patch = Patches(8)
        self.cls = nn.Parameter(torch.randn(1, 1, D)) if cls else None
        self.pad = pad
        self.block = Block()

    def forward(self, x):
        B, imgs, T = x.shape[:3]
        x = self.patch(x.flatten(0, 2))  # (B*I*T, n, D)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = F.pad(x, (0, 0, 0, self.pad))
        x = x.reshape(B, imgs * T * x.shape[1], D)
        return self.block(x)


class MaeShuffle(nn.Module):
    """MAE: tokens shuffled by argsort of noise, the first 75 % kept."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(4)
        self.block = Block()

    def forward(self, x):
        x = self.patch(x)
        B, N, C = x.shape
        ids = torch.argsort(torch.rand(B, N, device=x.device), dim=1)[:, : N * 3 // 4]
        x = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, C))
        return self.block(x)


class WindowMlp(nn.Module):
    """Swin's window partition, with the MLP run on the windows (folded into the batch)."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(4)
        self.mlp = Mlp(D)

    def forward(self, x):
        x = self.patch(x).reshape(x.shape[0], 8, 8, D)
        B, H, W, C = x.shape
        w = x.view(B, H // 4, 4, W // 4, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, C)
        return w + self.mlp(w)


class FlipMix(nn.Module):
    """Each token added to the token mirrored across the grid: positions mixed elementwise."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(8)
        self.mlp = Mlp(D)

    def forward(self, x):
        x = self.patch(x)
        x = x + x.flip(1)
        return x + self.mlp(x)


class ImageMix(FlipMix):
    """Each image's tokens added to the next image's tokens: images mixed elementwise."""

    def forward(self, x):
        x = self.patch(x)
        x = x + x.roll(1, dims=0)
        return x + self.mlp(x)


class OverlapPEG(nn.Module):
    """PVT-v2 style overlapping patch embedding (7x7, stride 4, padding 3), a conditional position encoding
    (depth-wise 3x3 conv added to the tokens), a squeeze-excite gate, then a block."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(4, kernel_size=7, padding=3)
        self.peg = nn.Conv2d(D, D, 3, padding=1, groups=D)
        self.gate = nn.Linear(D, D)
        self.block = Block()

    def forward(self, x):
        x = self.patch(x)
        B, N, C = x.shape
        m = x.transpose(1, 2).reshape(B, C, 8, 8)
        x = x + self.peg(m).flatten(2).transpose(1, 2)
        x = x * self.gate(x.mean(1, keepdim=True)).sigmoid()
        return self.block(x)


class MergeViT(nn.Module):
    """Swin's 2x2 patch merging (reshape / permute / Linear) between two raster stages."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(4)
        self.block1 = Block()
        self.reduce = nn.Linear(4 * D, D)
        self.block2 = Block()

    def forward(self, x):
        x = self.block1(self.patch(x))
        B, N, C = x.shape
        x = x.reshape(B, 4, 2, 4, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.block2(self.reduce(x).reshape(B, 16, C))


class StrideTwoResidual(nn.Module):
    """ResNet-v2 (TF "same" padding) downsample: a padded 3x3/2 conv and a 1x1/2 shortcut meet half a cell
    apart; then patches and a block."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.stem = nn.Conv2d(3, D, 3, padding=1)
        self.conv = nn.Conv2d(D, D, 3, stride=2)
        self.short = nn.Conv2d(D, D, 1, stride=2)
        self.patch = Patches(4, chans=D)
        self.block = Block()

    def forward(self, x):
        x = self.stem(x)
        x = self.conv(F.pad(x, (0, 1, 0, 1))) + self.short(x)
        return self.block(self.patch(x))


class OutlookFold(nn.Module):
    """VOLO's outlook attention: unfold 3x3 windows (stride 2), per-window attention from a pooled map,
    fold back, residual."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(4)
        self.attn = nn.Linear(D, 81)
        self.mlp = Mlp(D)

    def forward(self, x):
        x = self.patch(x)
        B, N, C = x.shape
        m = x.transpose(1, 2).reshape(B, C, 8, 8)
        v = F.unfold(m, 3, padding=1, stride=2).reshape(B, C, 9, 16).permute(0, 3, 2, 1)
        a = self.attn(F.avg_pool2d(m, 2).flatten(2).transpose(1, 2)).reshape(B, 16, 9, 9).softmax(-1)
        out = (a @ v).permute(0, 3, 2, 1).reshape(B, C * 9, 16)
        x = x + F.fold(out, (8, 8), 3, padding=1, stride=2).flatten(2).transpose(1, 2)
        return x + self.mlp(x)


class ChannelAttention(nn.Module):
    """XCiT's cross-covariance attention: a (C x C) attention applied to the values' channels."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(8)
        self.qkv = nn.Linear(D, 3 * D)
        self.mlp = Mlp(D)

    def forward(self, x):
        x = self.patch(x)
        q, k, v = self.qkv(x).transpose(1, 2).chunk(3, dim=1)  # (B, C, N) each
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)).softmax(-1)
        x = x + (attn @ v).transpose(1, 2)
        return x + self.mlp(x)


class Resampled(nn.Module):
    """CrossViT's second branch: the image resampled (bicubic, 32 -> 28) before 7x7 patches."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(7)
        self.block = Block()

    def forward(self, x):
        return self.block(self.patch(F.interpolate(x, size=(28, 28), mode="bicubic", align_corners=False)))


class Spectral(nn.Module):
    """FNet-style Fourier token mixing: the positions after a Fourier transform cannot be followed."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(8)
        self.mlp = Mlp(D)

    def forward(self, x):
        x = torch.fft.fft2(self.patch(x)).real
        return x + self.mlp(x)


class DroppedColumn(nn.Module):
    """A 4x4 grid with its third column taken out: raster order, but the columns are not evenly spaced."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(8)
        self.register_buffer("keep", torch.tensor([c + 4 * r for r in range(4) for c in (0, 1, 3)]))
        self.block = Block()

    def forward(self, x):
        return self.block(self.patch(x)[:, self.keep])


class Transposed(nn.Module):
    """A 4x6 grid flattened column by column (a (B, W, H, C) map flattened as if it were (B, H, W, C))."""

    def __init__(self):
        super().__init__()
        self.img_size = (32, 48)
        self.patch = Patches(8)
        self.block = Block()

    def forward(self, x):
        m = self.patch.proj(x)  # (B, C, 4, 6)
        return self.block(m.transpose(2, 3).flatten(2).transpose(1, 2))


class Wrapped(nn.Module):
    """Regions under autocast / no_grad (torch.export wraps them in higher-order ops with a subgraph), and
    an in-place op on a tensor read later (it must run for real, not on a stand-in)."""

    def __init__(self):
        super().__init__()
        self.img_size = 32
        self.patch = Patches(8)
        self.block = Block()

    def forward(self, x):
        x = self.patch(x)
        with torch.autocast("cpu", enabled=False):
            x = x + 0.1 * x.float().softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = x + (x @ x.new_ones(x.shape[-1], x.shape[-1])).float()
        x = x.clone()
        x.mul_(0.5)
        with torch.no_grad():
            x = x * 2
        return self.block(x)


# --------------------------------------------------------------------------------------------------- positives
def _timm_vit(**kw):
    base = dict(pretrained=False, img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", **{**base, **kw})


def _hf_vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    return ViTModel(cfg)


POSITIVE = {
    # name: (model factory, example inputs or None, [(prefix, suffix, grid, stride) per MLP])
    "timm vit class token": (lambda: _timm_vit(), None, [(1, 0, (4, 4), (8.0, 8.0))]),
    "timm vit 4 registers": (lambda: _timm_vit(reg_tokens=4), None, [(5, 0, (4, 4), (8.0, 8.0))]),
    "timm vit no_embed_class": (lambda: _timm_vit(reg_tokens=4, no_embed_class=True), None,
                                [(5, 0, (4, 4), (8.0, 8.0))]),
    "timm vit no class token": (lambda: _timm_vit(class_token=False, global_pool="avg"), None,
                                [(0, 0, (4, 4), (8.0, 8.0))]),
    "timm vit 32x48": (lambda: _timm_vit(img_size=(32, 48)), None, [(1, 0, (4, 6), (8.0, 8.0))]),
    "timm swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16,
                                            depths=(1, 1), num_heads=(1, 1), img_size=56, window_size=7),
                  None, [(0, 0, (14, 14), (4.0, 4.0)), (0, 0, (7, 7), (8.0, 8.0))]),
    "hf vit pixel_values": (_hf_vit, {"pixel_values": torch.randn(2, 3, 32, 32)},
                            [(1, 0, (4, 4), (8.0, 8.0))]),
    "user vit 3 suffix tokens": (lambda: UserViT(prefix=0, suffix=3), None, [(0, 3, (4, 4), (8.0, 8.0))]),
    "user vit prefix and suffix": (lambda: UserViT(prefix=2, suffix=3), None, [(2, 3, (4, 4), (8.0, 8.0))]),
    "class token + padding on one tile": (lambda: Tiles(cls=True, pad=3), torch.randn(2, 1, 1, 3, 32, 32),
                                          [(1, 3, (4, 4), (8.0, 8.0))]),
    "overlapping patches, PEG, SE gate": (OverlapPEG, None, [(0, 0, (8, 8), (4.0, 4.0))]),
    "2x2 patch merging": (MergeViT, None, [(0, 0, (8, 8), (4.0, 4.0)), (0, 0, (4, 4), (8.0, 8.0))]),
    "stride-2 residual, TF-same padding": (StrideTwoResidual, None, [(0, 0, (4, 4), (8.0, 8.0))]),
    "outlook attention unfold / fold": (OutlookFold, None, [(0, 0, (8, 8), (4.0, 4.0))]),
    "cross-covariance (channel) attention": (ChannelAttention, None, [(0, 0, (4, 4), (8.0, 8.0))]),
    "bicubic resampling before patches": (Resampled, None, [(0, 0, (4, 4), (8.0, 8.0))]),
    "autocast and no_grad regions": (Wrapped, None, [(0, 0, (4, 4), (8.0, 8.0))]),
}


@pytest.mark.parametrize("name", list(POSITIVE))
def test_raster_grids_are_proven(name):
    factory, example, want = POSITIVE[name]
    if isinstance(example, torch.Tensor) and example.dim() != 4:
        example = image_example(example)
    proofs = prove(factory(), example)
    got = [(p.ok, p.reason, p.prefix, p.suffix, p.grid, p.stride, p.permutation) for p in proofs]
    assert got == [(True, "", pre, suf, grid, stride, None) for pre, suf, grid, stride in want]


# --------------------------------------------------------------------------------------------------- negatives
NEGATIVE = {
    # name: (model factory, example, key words of the reason)
    "nest blockify (B, blocks, tokens, C)": (NestBlockify, None,
                                             ["permutation", "8x8", "not in raster order"]),
    "token-mixing MLP on (B, C, N)": (TokenMixer, None, ["channel axis"]),
    "video (patch, time) order": (lambda: Video(), torch.randn(2, 2, 3, 32, 32),
                                  ["time and space", "interleaved"]),
    "video frame-major order": (lambda: Video(frame_major=True), torch.randn(2, 2, 3, 32, 32),
                                ["time and space", "2 frames of 4x4"]),
    "two tiles concatenated": (lambda: Tiles(), torch.randn(2, 1, 2, 3, 32, 32), ["2 grids of 4x4", "tile"]),
    "two padded tiles with class tokens": (lambda: Tiles(cls=True, pad=3), torch.randn(2, 1, 2, 3, 32, 32),
                                           ["2 grids of 4x4", "tile"]),
    "MAE shuffle by argsort of noise": (MaeShuffle, None, ["differs between images", "shuffled"]),
    "windows folded into the batch": (WindowMlp, None, ["batch", "folded"]),
    "positions mixed elementwise": (FlipMix, None, ["different positions are mixed elementwise", "add"]),
    "images mixed elementwise": (ImageMix, None, ["different images are mixed elementwise", "add"]),
    "a 1-D sequence (1x8 grid)": (lambda: UserViT(img=(8, 64), prefix=1), None, ["1-D sequence", "row"]),
    "Fourier token mixing": (Spectral, None, ["cannot follow", "Fourier"]),
    "a grid with a column taken out": (DroppedColumn, None, ["not a grid", "evenly spaced"]),
    "a grid in column-major order": (Transposed, None, ["permutation of a 4x6 grid", "column-major"]),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_layouts_that_are_not_raster_grids_are_refused(name):
    factory, example, words = NEGATIVE[name]
    if isinstance(example, torch.Tensor) and example.dim() != 4:
        example = image_example(example)
    proofs = prove(factory(), example)
    assert len(proofs) == 1
    (p,) = proofs
    assert not p.ok
    for w in words:
        assert w in p.reason, (w, p.reason)


def test_hiera_mask_units_are_a_permutation_with_the_right_order():
    model = HieraUnroll()
    (p,) = prove(model)
    assert not p.ok and "permutation of a 8x8 grid" in p.reason
    assert (p.prefix, p.suffix, p.grid, p.stride) == (0, 0, (8, 8), (4.0, 4.0))
    # token i of the unrolled sequence is the raster cell the same unroll moves there
    raster = torch.arange(64, dtype=torch.float32).view(1, 64, 1)
    assert p.permutation == tuple(int(v) for v in model.unroll(raster).flatten())
    assert sorted(p.permutation) == list(range(64)) and p.permutation != tuple(range(64))


def _caller(model):
    def call(x):
        return model(x)

    return call


@pytest.mark.parametrize("pre_dispatch", [True, False])
def test_make_fx_graph_with_flat_inputs(pre_dispatch):
    """The fallback path: any GraphModule plus its flat placeholder values (here a make_fx trace, whose
    parameters are constants; the post-dispatch graph spells Linear as view + addmm)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    results = []
    for model in (UserViT(prefix=2, suffix=1).eval(), HieraUnroll().eval()):
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            gm = make_fx(_caller(model), tracing_mode="real", pre_dispatch=pre_dispatch)(x)
        if pre_dispatch:
            users = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
            mlps = match_mlps(GraphIndex(gm.graph, {}, users, 2))
            nodes = {m.input: "BNC" for m in mlps}
        else:  # the (B, N, C) tensor flattened into fc1's addmm
            bias = model.block.mlp.fc1.bias if isinstance(model, HieraUnroll) else model.block1.mlp.fc1.bias
            fc1 = next(n for n in gm.graph.nodes if n.op == "call_function" and "addmm" in str(n.target)
                       and torch.equal(getattr(gm, n.args[0].target), bias))
            nodes = {fc1.args[1].args[0]: "BNC"}
        assert len(nodes) == 1
        (p,) = prove_grids(gm, [x], nodes).values()
        results.append((p.ok, p.prefix, p.suffix, p.grid))
    assert results == [(True, 2, 1, (4, 4)), (False, 0, 0, (8, 8))]


def test_proof_does_not_change_the_model_or_print(capsys):
    model = OverlapPEG().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = make_example_inputs(model)
    img = ex.image.clone()
    prove(model, ex)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(img, ex.image)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_bad_layout_is_rejected():
    model = UserViT()
    ex = make_example_inputs(model)
    tr = trace_model(model, ex)
    node = next(n for n in tr.graph.nodes if n.op == "call_function")
    with pytest.raises(ValueError, match="layout"):
        prove_grids(tr.program, ex, {node: "BCHW"})


# --------------------------------------------------------------------------------------------------- property
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(prefix=st.integers(0, 5), suffix=st.integers(0, 4), gh=st.integers(2, 6), gw=st.integers(2, 6),
       patch=st.sampled_from([4, 8]), seed=st.integers(0, 2**16))
def test_random_user_vits(prefix, suffix, gh, gw, patch, seed):
    n = gh * gw
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if torch.equal(perm, torch.arange(n)):
        perm = perm.roll(1)
    model = UserViT(img=(gh * patch, gw * patch), patch=patch, prefix=prefix, suffix=suffix,
                    perm=perm.tolist())
    raster, permuted = prove(model)
    assert (raster.ok, raster.prefix, raster.suffix, raster.grid, raster.stride) == (
        True, prefix, suffix, (gh, gw), (float(patch), float(patch)))
    assert not permuted.ok
    assert (permuted.prefix, permuted.suffix, permuted.grid) == (prefix, suffix, (gh, gw))
    assert permuted.permutation == tuple(perm.tolist())
