"""Issue-12 failure classes on tiny library models, end to end through find_mlps / localify: what is refused says
what was found, what is converted stays exact. (The position-code proof itself is tested in test_proof.py.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from timm.models.nest import Nest
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
from torch import nn

import localify

warnings.filterwarnings("ignore")


def _sites(model: nn.Module, **kw) -> list[localify.MLPSite]:
    return localify.find_mlps(model.eval(), **kw).sites


def _exact(model: nn.Module, x: torch.Tensor | dict, **kw) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    out = localify.localify(model.eval(), **kw)
    with torch.no_grad():
        a, b = (out(**x), ref(**x)) if isinstance(x, dict) else (out(x), ref(x))
    a, b = (getattr(a, "last_hidden_state", a), getattr(b, "last_hidden_state", b))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return out


def test_hiera_mask_unit_stages_are_refused_and_the_raster_last_stage_converts() -> None:
    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 1, 1, 1))
    sites = _sites(model)
    for s, n in zip(sites[:3], (56, 28, 14)):
        assert s.status == localify.SiteStatus.NO_GRID, s
        assert f"a permutation of a {n}x{n} grid" in s.reason
        assert s.proof is not None and not s.proof.ok and s.proof.permutation is not None
    assert sites[3].status == localify.SiteStatus.CONVERTIBLE and sites[3].tokens.grid == (7, 7)
    _exact(model, torch.randn(1, 3, 224, 224))
    assert [s.status for s in localify.conversion_plan(model).sites][3] == localify.SiteStatus.LOCALIFIED


def test_nest_blocks_are_not_a_grid() -> None:
    model = Nest(img_size=32, patch_size=4, num_levels=3, embed_dims=(16, 32, 64), num_heads=(1, 1, 2),
                 depths=(1, 1, 1), num_classes=0)
    sites = _sites(model)  # (B, blocks, tokens per block, C): rows are blocks, not image rows
    blocked = [s for s in sites if "not a proven raster grid" in s.reason]
    assert blocked and all(s.status == localify.SiteStatus.NO_GRID and not s.proof.ok for s in blocked)
    assert all(s.proof.ok for s in sites if s.status == localify.SiteStatus.CONVERTIBLE)


def test_an_mlp_on_the_class_token_alone_has_no_grid() -> None:
    model = timm.create_model("xcit_nano_12_p16_224", depth=1, embed_dim=32, num_heads=2, cls_attn_layers=1)
    sites = _sites(model)
    assert sites[0].status == localify.SiteStatus.CONVERTIBLE
    assert sites[1].status == localify.SiteStatus.NO_GRID and "single token" in sites[1].reason


def test_a_projection_shared_with_attention_is_refused() -> None:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                              block_fn=ParallelScalingBlock, qkv_bias=False)
    sites = _sites(model)
    assert sites and all(s.status == localify.SiteStatus.UNSUPPORTED and "q, k, v" in s.reason for s in sites)


def test_grn_does_not_hide_the_convnext_v2_mlp() -> None:
    torch.manual_seed(0)  # conv_mlp=False: Linear MLPs on (B, H, W, C) maps, with GRN before fc2
    model = timm.create_model("convnextv2_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), conv_mlp=False)
    sites = _sites(model)
    assert len(sites) == 4 and all(s.tokens is not None and s.tokens.layout == "BHWC" for s in sites)
    _exact(model, torch.randn(2, 3, 64, 64))


def test_grn_does_not_hide_the_hf_convnext_v2_mlp() -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=64)
    model = transformers.ConvNextV2Model(cfg)
    sites = _sites(model)
    assert len(sites) == 2 and all(s.status == localify.SiteStatus.CONVERTIBLE for s in sites)
    _exact(model, {"pixel_values": torch.randn(2, 3, 64, 64)})


@pytest.mark.parametrize("act", ["quick_gelu", "silu"])
def test_activations_written_with_a_mul_are_not_gates(act: str) -> None:
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                              act_layer=act)
    site = _sites(model)[0]
    assert site.activation == act and "glu" not in site.activation
    localify.localify(model, variant="localvit")  # a plain MLP: the paper's block accepts it


class DataDependent(nn.Module):
    """A ViT whose forward branches on a value: torch.export fails on the guard; draft_export follows it."""

    img_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        if t.mean() > -1e9:
            t = t * 1.0
        return t + self.mlp(self.norm(t))


def test_a_model_torch_export_cannot_trace_is_traced_as_it_ran(capfd) -> None:
    torch.manual_seed(0)
    model = DataDependent().eval()
    plan = localify.find_mlps(model)
    assert plan.tracer == "torch.export.draft_export" and "draft_export" in str(plan)
    assert plan.sites[0].status == localify.SiteStatus.CONVERTIBLE and plan.sites[0].tokens.grid == (4, 4)
    _exact(model, torch.randn(2, 3, 32, 32))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the library never prints, not even torch's own reports
