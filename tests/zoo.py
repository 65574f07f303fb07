"""A zoo of tiny, randomly initialised Vision Transformers with the MLP sites localify should find.

Every ``Case`` builds a fresh tiny model (``torch.manual_seed(0)`` first, no pretrained weights,
nothing downloaded) and lists, in forward execution order, one ``ExpSite`` per transformer MLP
(Linear -> activation/GLU -> Linear) with the token layout that MLP sees at ``input_size``.

The expectations were derived from the model sources (timm 1.0.31 / transformers 5.24) and
checked by running each model with forward pre-hooks on its MLP modules (see
``tests/test_zoo_sanity.py`` which re-checks token counts on every run).

Pure PyTorch / timm / transformers: this module must not import localify.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ExpSite", "Case", "CASES", "CASES_BY_ID", "output_tensor", "make_input"]


@dataclass(frozen=True)
class ExpSite:  # what localify should find for one MLP, in execution order
    # "convertible" | "no_grid" (MLP on tokens without a patch grid, e.g. CaiT class-attention)
    # | "already_local" (MLP already has a depth-wise conv, e.g. pvt_v2)
    # | "folded" (tokens of several patches folded into the batch dim, e.g. TNT inner pixel MLPs)
    status: str
    grid: tuple[int, int] | None = None  # token grid (rows, cols) at the case's input_size
    prefix: int = 0  # tokens before the grid (class, distillation, registers)
    suffix: int = 0  # tokens after the grid (e.g. YOLOS detection tokens)
    layout: str = "BNC"  # "BNC" if the MLP input is (B, N, C), "BHWC" if it is (B, H, W, C)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]  # fresh random-init tiny model; calls torch.manual_seed(0) first
    input_size: tuple[int, int]  # (H, W) of the image used for tracing
    second_size: tuple[int, int] | None  # another (H, W) the ORIGINAL model accepts, or None
    expected: tuple[ExpSite, ...]  # one per MLP in forward execution order
    in_chans: int = 3
    input_name: str | None = None  # None: image passed positionally; "pixel_values" for HF
    call_kwargs: dict = field(default_factory=dict)  # extra forward kwargs needed at second_size
    family: str = "timm"  # "timm" | "hf" | "user"
    slow: bool = False


def output_tensor(out) -> torch.Tensor:
    """Main tensor of any model output.

    Tensor -> itself; HF ``ModelOutput`` (or any object/dict with them) -> ``logits`` if present,
    else ``last_hidden_state``; tuple/list -> first element (recursively).
    """
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        val = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(val, torch.Tensor):
            return val
    if isinstance(out, (tuple, list)) and len(out) > 0:
        return output_tensor(out[0])
    if isinstance(out, dict) and len(out) > 0:  # plain dict / ModelOutput without the usual keys
        return output_tensor(next(iter(out.values())))
    raise TypeError(f"cannot find a tensor in model output of type {type(out).__name__}")


def make_input(
    case: Case, size: tuple[int, int] | None = None, batch: int = 2, seed: int = 0
) -> torch.Tensor:
    """Deterministic random image batch for ``case`` at ``size`` (default: its input_size)."""
    h, w = size or case.input_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, case.in_chans, h, w, generator=g)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _conv(grid, prefix=0, suffix=0, layout="BNC"):
    return ExpSite("convertible", grid, prefix, suffix, layout)


def _local(grid, prefix=0, suffix=0, layout="BNC"):
    return ExpSite("already_local", grid, prefix, suffix, layout)


NO_GRID = ExpSite("no_grid")
FOLDED = ExpSite("folded")

# tiny ViT body shared by the timm ViT-family cases
_TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs).eval()

    build.__name__ = f"build_{name}"
    return build


def _hf(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg).eval()

    build.__name__ = f"build_{model_cls}"
    return build


def _import_user_models():
    # works whether tests/ is a package (``tests.zoo``) or on sys.path (``zoo``, pytest rootdir mode)
    try:
        from . import user_models
    except ImportError:
        try:
            import user_models
        except ImportError:
            from tests import user_models
    return user_models


def _user(cls_name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        user_models = _import_user_models()

        torch.manual_seed(0)
        return getattr(user_models, cls_name)(**kwargs).eval()

    build.__name__ = f"build_{cls_name}"
    return build


_HF_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_INTERP = {"interpolate_pos_encoding": True}

G14 = (14, 14)

# --------------------------------------------------------------------------------------
# the zoo
# --------------------------------------------------------------------------------------

CASES: list[Case] = [
    # ---------------------------------------------------------------- timm
    Case(
        # [cls] + 14x14 patches; timm PatchEmbed is strict about the image size
        id="deit_tiny_patch16_224",
        build=_timm("deit_tiny_patch16_224", **_TINY_VIT),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv(G14, prefix=1),) * 2,
    ),
    Case(
        # [cls, dist] + 14x14
        id="deit_tiny_distilled_patch16_224",
        build=_timm("deit_tiny_distilled_patch16_224", **_TINY_VIT),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv(G14, prefix=2),) * 2,
    ),
    Case(
        # [cls, reg x4] + 14x14 (timm puts registers after the class token, before the patches)
        id="vit_reg4",
        build=_timm("vit_small_patch16_224", reg_tokens=4, **_TINY_VIT),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv(G14, prefix=5),) * 2,
    ),
    Case(
        # no class token, average pooling: the MLP sees exactly the 14x14 patch tokens
        id="vit_no_cls_avgpool",
        build=_timm("vit_small_patch16_224", class_token=False, global_pool="avg", **_TINY_VIT),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv(G14, prefix=0),) * 2,
    ),
    Case(
        # non-square training size: 160x224 -> 10x14 grid (rows, cols)
        id="vit_nonsquare_160x224",
        build=_timm("vit_small_patch16_224", img_size=(160, 224), **_TINY_VIT),
        input_size=(160, 224),
        second_size=None,
        expected=(_conv((10, 14), prefix=1),) * 2,
    ),
    Case(
        # dynamic_img_size: pos-embed is resampled on the fly, any multiple of 16 works
        id="vit_dynamic_img_size",
        build=_timm("vit_small_patch16_224", dynamic_img_size=True, **_TINY_VIT),
        input_size=(224, 224),
        second_size=(160, 256),
        expected=(_conv(G14, prefix=1),) * 2,
    ),
    Case(
        # [cls] + 16x16 (patch 14), RoPE. eva02_tiny has scale_mlp=False, so its SwiGLU is timm's
        # packed GluMlp: one fused fc1 (C -> 2*hidden) -> chunk(2) -> SiLU(x1) * x2 -> fc2.
        # Strict about the image size unless dynamic_img_size=True.
        id="eva02_tiny_patch14_224",
        build=_timm("eva02_tiny_patch14_224", **_TINY_VIT),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv((16, 16), prefix=1),) * 2,
    ),
    Case(
        # same body with scale_mlp=True (as eva02_small/base use): timm SwiGLU with separate
        # fc1_g / fc1_x -> SiLU(g) * x -> LayerNorm -> fc2
        id="eva02_tiny_swiglu_scale_mlp",
        build=_timm("eva02_tiny_patch14_224", scale_mlp=True, **_TINY_VIT),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv((16, 16), prefix=1),) * 2,
    ),
    Case(
        # no class token; per-stage grids 56, 28, 14 (x2 blocks, 2nd shifted), 7.
        # timm Swin MLP input is (B, H*W, C) (blocks reshape BHWC -> BNC around the MLP).
        # strict_img_size=True by default -> other sizes rejected.
        id="swin_tiny_patch4_window7_224",
        build=_timm(
            "swin_tiny_patch4_window7_224",
            embed_dim=16,
            depths=(1, 1, 2, 1),
            num_heads=(1, 2, 4, 8),
            num_classes=10,
        ),
        input_size=(224, 224),
        second_size=None,
        expected=(
            _conv((56, 56)),
            _conv((28, 28)),
            _conv((14, 14)),
            _conv((14, 14)),
            _conv((7, 7)),
        ),
    ),
    Case(
        # MlpWithDepthwiseConv (fc1 -> dwconv3x3 -> GELU -> fc2) already local; no pos-embed, so
        # any size works (overlapping conv patch embeds: 7/4/3, then 3/2/1).
        id="pvt_v2_b0",
        build=_timm(
            "pvt_v2_b0",
            depths=(1, 1, 1, 1),
            embed_dims=(16, 32, 48, 64),
            num_heads=(1, 2, 3, 4),
            num_classes=10,
        ),
        input_size=(224, 224),
        second_size=(160, 256),
        expected=(
            _local((56, 56)),
            _local((28, 28)),
            _local((14, 14)),
            _local((7, 7)),
        ),
    ),
    Case(
        # MaxViT: every MLP runs on a (B, H, W, C) feature map; each block has a window (block) and a
        # grid-attention MLP. Added by the lead: the BHWC layout.
        id="maxvit_pico_rw_256",
        build=_timm("maxvit_pico_rw_256", depths=(1, 1, 1, 1), embed_dim=(32, 32, 64, 64), stem_width=(16, 32),
                    num_classes=10),
        input_size=(256, 256),
        second_size=None,
        expected=tuple(
            ExpSite("convertible", (g, g), layout="BHWC") for g in (64, 64, 32, 32, 16, 16, 8, 8)
        ),
    ),
    Case(
        # each block: inner pixel MLP on (B*196, 16 pixels, inner_dim) = folded,
        # then outer MLP on [cls] + 14x14 patch tokens. PixelEmbed asserts the image size.
        id="tnt_s_patch16_224",
        build=_timm(
            "tnt_s_patch16_224",
            embed_dim=32,
            inner_dim=8,
            depth=2,
            num_heads_inner=2,
            num_heads_outer=2,
            num_classes=10,
        ),
        input_size=(224, 224),
        second_size=None,
        expected=(FOLDED, _conv(G14, prefix=1), FOLDED, _conv(G14, prefix=1)),
    ),
    Case(
        # self-attention blocks on the 14x14 patch tokens only (class token is not in the
        # sequence yet), then 2 class-attention blocks whose MLP runs on the class token alone.
        id="cait_xxs24_224",
        build=_timm("cait_xxs24_224", embed_dim=32, depth=2, num_heads=2, num_classes=10),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv(G14), _conv(G14), NO_GRID, NO_GRID),
    ),
    # ---------------------------------------------------------------- Hugging Face
    Case(
        # [cls] + 14x14; the MLP is a single ViTMLP module in transformers 5.x
        id="hf_vit",
        build=_hf("ViTModel", "ViTConfig", image_size=224, patch_size=16, **_HF_VIT),
        input_size=(224, 224),
        second_size=(160, 256),
        expected=(_conv(G14, prefix=1),) * 2,
        input_name="pixel_values",
        call_kwargs=_INTERP,
        family="hf",
    ),
    Case(
        # [cls, dist] + 14x14
        id="hf_deit_with_teacher",
        build=_hf(
            "DeiTForImageClassificationWithTeacher",
            "DeiTConfig",
            image_size=224,
            patch_size=16,
            num_labels=10,
            **_HF_VIT,
        ),
        input_size=(224, 224),
        second_size=(160, 256),
        expected=(_conv(G14, prefix=2),) * 2,
        input_name="pixel_values",
        call_kwargs=_INTERP,
        family="hf",
    ),
    Case(
        # [cls, reg x4] + 16x16 (registers inserted after cls, after pos-embed); pos-embed is
        # always interpolated, so any size works without kwargs.
        id="hf_dinov2_with_registers",
        build=_hf(
            "Dinov2WithRegistersModel",
            "Dinov2WithRegistersConfig",
            image_size=224,
            patch_size=14,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            num_register_tokens=4,
        ),
        input_size=(224, 224),
        second_size=(168, 252),
        expected=(_conv((16, 16), prefix=5),) * 2,
        input_name="pixel_values",
        family="hf",
    ),
    Case(
        # [cls] + 14x14 (pre_layrnorm before the encoder); CLIPMLP fc1 -> quick_gelu -> fc2
        id="hf_clip_vision",
        build=_hf("CLIPVisionModel", "CLIPVisionConfig", image_size=224, patch_size=16, **_HF_VIT),
        input_size=(224, 224),
        second_size=(160, 256),
        expected=(_conv(G14, prefix=1),) * 2,
        input_name="pixel_values",
        call_kwargs=_INTERP,
        family="hf",
    ),
    Case(
        # no class token; per-stage grids, MLP input (B, H*W, C) (SwinMLP). HF Swin pads the image
        # and the windows, so other sizes work (grids at 256x320: 64x80, 32x40, 16x20, 8x10) -
        # BUT only while every stage's shorter side is >= window_size: below that,
        # SwinLayer.set_shift_and_window_size shrinks window_size while the relative-position
        # bias table stays 7x7 and forward crashes (e.g. 160x256 -> stage 4 is 5x8). That method
        # also mutates window_size/shift_size in place (stateful across calls) when min side <= 7.
        id="hf_swin",
        build=_hf(
            "SwinModel",
            "SwinConfig",
            image_size=224,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 2, 1],
            num_heads=[1, 2, 4, 8],
            window_size=7,
        ),
        input_size=(224, 224),
        second_size=(256, 320),
        expected=(
            _conv((56, 56)),
            _conv((28, 28)),
            _conv((14, 14)),
            _conv((14, 14)),
            _conv((7, 7)),
        ),
        input_name="pixel_values",
        family="hf",
    ),
    Case(
        # [cls] + 14x14 + 4 detection tokens (suffix); pos-embed always interpolated. The MLP is
        # split over two modules: YolosIntermediate (dense, act) and YolosOutput (dense, +residual)
        id="hf_yolos",
        build=_hf(
            "YolosModel",
            "YolosConfig",
            image_size=[224, 224],
            patch_size=16,
            num_detection_tokens=4,
            use_mid_position_embeddings=False,
            **_HF_VIT,
        ),
        input_size=(224, 224),
        second_size=(160, 256),
        expected=(_conv(G14, prefix=1, suffix=4),) * 2,
        input_name="pixel_values",
        family="hf",
    ),
    # ---------------------------------------------------------------- user-written
    Case(
        # token transformers on 56x56 and 28x28 (no prefix), then ViT blocks on [cls] + 14x14.
        # Fixed-size pos-embed -> only 224.
        id="user_t2t_vit",
        build=_user("T2TViT", img_size=224, num_classes=10),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv((56, 56)), _conv((28, 28)), _conv(G14, prefix=1), _conv(G14, prefix=1)),
        family="user",
    ),
    Case(
        # stages 56, 28, 14 without prefix, 7x7 with the class token prepended
        id="user_pvt_v1",
        build=_user("PVTv1", img_size=224, num_classes=10),
        input_size=(224, 224),
        second_size=None,
        expected=(_conv((56, 56)), _conv((28, 28)), _conv(G14), _conv((7, 7), prefix=1)),
        family="user",
    ),
]

CASES_BY_ID: dict[str, Case] = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case ids"
