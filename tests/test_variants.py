"""The locality-FFN family at the model level: variants and options through ``localify()``, ``fuse()``,
parameter counts, exactness of the preserving variants, dtypes."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

import localify
from localify import LocalityLinear, LocalViTFFN

TINY = dict(embed_dim=32, depth=3, num_heads=2, num_classes=10)


def _deit(**kw):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}).eval()


def _x(b=2, size=(224, 224)):
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def _randomize_dw(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (LocalityLinear, LocalViTFFN)):
            with torch.no_grad():
                m.dwconv.weight.normal_(0, 0.3)


def test_localvit_parameter_count_matches_paper() -> None:
    """LocalViT-T: every DeiT-T FFN replaced with SE hidden 4 -> 5,913,304 params with norm2 kept."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    localify.localify(model, variant="localvit", act="hswish", attention="se", se_hidden=4)
    assert sum(p.numel() for p in model.parameters()) == 5_913_304
    assert sum(isinstance(m, LocalViTFFN) for m in model.modules()) == 12
    norm2 = sum(p.numel() for b in model.blocks for p in b.norm2.parameters())
    assert 5_913_304 - norm2 == 5_908_696


VARIANTS = [
    dict(variant="dwconv"),
    dict(variant="dwconv", kernel_size=5),
    dict(variant="residual"),
    dict(variant="residual", kernel_size=7),
    dict(variant="localvit"),
    dict(variant="localvit", act="relu6", attention="se", se_reduction=4),
    dict(variant="localvit", act="gelu", attention="eca"),
    dict(variant="localvit", act="silu", attention="se", se_hidden=8, kernel_size=5),
    dict(variant="localvit", act="relu", attention="eca", eca_kernel=3),
]


def _vid(v):
    return "-".join(f"{k}={val}" for k, val in v.items())


@pytest.mark.parametrize("opts", VARIANTS, ids=_vid)
def test_variant_forward_backward_and_fuse(opts) -> None:
    model = _deit()
    ref = copy.deepcopy(model)
    localify.localify(model, **opts)
    kind = LocalViTFFN if opts["variant"] == "localvit" else LocalityLinear
    blocks = [m for m in model.modules() if isinstance(m, kind)]
    assert len(blocks) == 3
    k = opts.get("kernel_size", 3)
    assert all(b.dwconv.kernel_size == (k, k) for b in blocks)
    x = _x()
    with torch.no_grad():
        if opts["variant"] != "localvit":  # the preserving variants are exact at conversion
            assert _rel(ref(x), model(x)) <= 1e-5
    # forward + backward in train mode reaches every new depth-wise kernel
    model.train()
    model.forward_features(x).pow(2).mean().backward()
    assert all(b.dwconv.weight.grad is not None and b.dwconv.weight.grad.abs().sum() > 0 for b in blocks)
    # fuse: same eval outputs with trained-looking kernels and random BN statistics, no BatchNorm left
    model.eval()
    _randomize_dw(model)
    _randomize_bn(model)
    with torch.no_grad():
        before = model(x)
        localify.fuse(model)
        after = model(x)
        assert _rel(before, after) <= 1e-5
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                       for b in model.modules() if isinstance(b, (LocalityLinear, LocalViTFFN)) for m in b.modules())
        assert not any(getattr(m, "residual", False) for m in model.modules() if isinstance(m, LocalityLinear))
        localify.fuse(model)  # fusing twice changes nothing
        assert torch.equal(after, model(x))


def test_fuse_refuses_train_mode_and_unconverted_models() -> None:
    model = _deit()
    with pytest.raises(localify.FuseError, match="convert it"):
        localify.fuse(model)
    localify.localify(model, variant="localvit")
    model.train()
    with pytest.raises(localify.FuseError, match=r"eval\(\)"):
        localify.fuse(model)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 9  # untouched


def test_localvit_prefix_tokens_skip_only_the_spatial_part() -> None:
    model = _deit()
    localify.localify(model, variant="localvit", attention="se")
    ffn = model.blocks[0].mlp
    tokens = torch.randn(2, 197, 32)
    ffn.grid_source.hw = (14, 14)
    ffn.eval()
    with torch.no_grad():
        a = ffn(tokens)
        ffn.dwconv.weight.normal_()
        ffn.attn.fc1.weight.normal_() if hasattr(ffn.attn, "fc1") else None
        b = ffn(tokens)
    assert torch.equal(a[:, :1], b[:, :1])
    assert not torch.allclose(a[:, 1:], b[:, 1:])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant="dwconv", attention="se"), "localvit"),
        (dict(variant="residual", act="relu"), "localvit"),
        (dict(variant="localvit", act="tanh"), "hswish"),
        (dict(variant="localvit", attention="cbam"), "'se'"),
        (dict(variant="localvit", attention="se", se_hidden=4, se_reduction=4), "not both"),
        (dict(variant="localvit", se_hidden=4), "attention='se'"),
        (dict(variant="localvit", attention="se", eca_kernel=3), "attention='eca'"),
    ],
)
def test_option_errors(kwargs, match) -> None:
    model = _deit()
    keys = list(model.state_dict())
    with pytest.raises(localify.ConfigError, match=match):
        localify.localify(model, **kwargs)
    assert list(model.state_dict()) == keys


def test_localvit_needs_a_self_contained_plain_mlp() -> None:
    """EVA02's gated MLP cannot take the paper's block: skipped with a reason, never converted wrongly."""
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, embed_dim=32, num_heads=2)
    with pytest.raises(localify.NotLocalifiableError, match="gated"):
        localify.localify(model, variant="localvit")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["dwconv", "localvit"])
def test_low_precision(dtype, variant) -> None:
    model = _deit()
    ref = copy.deepcopy(model).to(dtype)
    localify.localify(model, variant=variant)
    model.to(dtype)
    x = _x().to(dtype)
    with torch.no_grad():
        out = model(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
        if variant == "dwconv":
            assert _rel(ref(x).float(), out.float()) <= 2e-2
    model.train()
    model(x).float().sum().backward()


def test_channels_last_model() -> None:
    model = _deit()
    ref = copy.deepcopy(model)
    localify.localify(model)
    model.to(memory_format=torch.channels_last)
    x = _x().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _rel(ref(x), model(x)) <= 1e-5


def test_convert_a_bf16_model_directly() -> None:
    model = _deit().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(model, example_inputs=_x().to(torch.bfloat16))
    lin = model.blocks[0].mlp.fc1
    assert lin.dwconv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(_x().to(torch.bfloat16))).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dwconv", "residual", "localvit"])
def test_torch_compile_fullgraph(variant) -> None:
    model = _deit(dynamic_img_size=True)
    localify.localify(model, variant=variant)
    model.eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = _x()
    with torch.no_grad():
        assert _rel(model(x), compiled(x)) <= 1e-4
