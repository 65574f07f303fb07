"""The depth-wise conv with the MLP's activation inside (one oneDNN convolution with a post-op).

``LocalityMLP`` runs the grid of a timm ``Mlp`` as fc1's projection, the conv with the activation applied in it,
and fc2 (eager inference, :func:`localify.layers.conv_activation_fusion` on). The reference is computed here by
hand from the block's weights (F.linear, F.conv2d, the activation module, F.linear); the path is taken only for
the MLPs whose forward it reproduces, and never with autograd or in a captured graph.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from op_names import OpNames
from timm.layers import Mlp
from torch import nn

import localify
from localify.layers import (
    LocalityMLP,
    onednn_activation,
    set_conv_activation_fusion,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")]

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5, img_size=32, patch_size=8)  # 4x4 patches
FUSED_OP = "_convolution_pointwise"
ACTS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
        "silu": nn.SiLU, "hardswish": nn.Hardswish}
# (timm kwargs, prefix tokens)
TOKENS = {"cls": ({}, 1), "no_cls": ({"class_token": False, "global_pool": "avg"}, 0), "reg4": ({"reg_tokens": 4}, 5)}


@pytest.fixture(params=["on", "off"])
def fusion(request):
    prev = set_conv_activation_fusion(request.param)
    yield request.param == "on"
    set_conv_activation_fusion(prev)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def converted(act: str = "gelu", tokens: str = "cls", variant: str = "dwconv", mlp_layer=Mlp, seed: int = 0,
              **extra):
    kw, _ = TOKENS[tokens]
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, act_layer=ACTS[act], mlp_layer=mlp_layer,
                              **TINY, **kw, **extra).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(model, variant=variant, example_inputs=torch.randn(2, 3, 32, 32))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "dwconv"):
                m.dwconv.weight.add_(torch.randn(m.dwconv.weight.shape, generator=g) * 0.3)
    return model


def reference_mlp(mlp: nn.Module, x: torch.Tensor, prefix: int, hw: tuple[int, int]) -> torch.Tensor:
    """fc1 -> depth-wise conv over the grid tokens (prefix tokens skip it) -> act -> fc2, written out."""
    fc1, conv = mlp.fc1.linear, mlp.fc1.dwconv
    h = F.linear(x, fc1.weight, fc1.bias)
    b, n, c = h.shape
    grid = h[:, prefix:].transpose(1, 2).reshape(b, c, *hw)
    grid = F.conv2d(grid, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)
    h = torch.cat([h[:, :prefix], grid.flatten(2).transpose(1, 2)], dim=1)
    return F.linear(mlp.act(h), mlp.fc2.weight, mlp.fc2.bias)


def off_then_on(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set, torch.Tensor, set]:
    """``model(x)`` in inference with the post-op off, then on: (output, ops that ran) of each."""
    prev = set_conv_activation_fusion("off")
    try:
        with torch.inference_mode(), OpNames() as off:
            ref = model(x)
        set_conv_activation_fusion("on")
        with torch.inference_mode(), OpNames() as on:
            y = model(x)
    finally:
        set_conv_activation_fusion(prev)
    return ref, off.names, y, on.names


@pytest.mark.parametrize("tokens", list(TOKENS))
@pytest.mark.parametrize("act", list(ACTS))
def test_mlp_matches_the_reference_and_fuses_when_on(act, tokens, fusion, backend):
    model = converted(act, tokens)
    prefix = TOKENS[tokens][1]
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, LocalityMLP) and mlp.conv_act_chain() is not None
    mlp.grid_source.hw = (4, 4)  # the block alone: the grid its patch embedding would give
    x = torch.randn(3, prefix + 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), OpNames() as ops:
        y = mlp(x)
    assert rel_err(y, reference_mlp(mlp, x, prefix, (4, 4))) <= 1e-5
    assert (FUSED_OP in ops.names) == fusion, ops.names


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_whole_model_same_with_and_without_fusion(act):
    model = converted(act, "reg4", dynamic_img_size=True)
    x = torch.randn(4, 3, 40, 32, generator=torch.Generator().manual_seed(3))  # 5x4 patches: another grid
    ref, off, y, on = off_then_on(model, x)
    assert FUSED_OP in on and FUSED_OP not in off
    assert rel_err(y, ref) <= 1e-5


class SubMlp(Mlp):
    """Same forward; a subclass may override it, so it is not recognised."""


def _hook_act(model):
    model.blocks[0].mlp.act.register_forward_hook(lambda *a: None)


def _hook_fc2(model):
    model.blocks[0].mlp.fc2.register_forward_pre_hook(lambda *a: None)


def _train_dropout(model):
    model.blocks[0].mlp.drop1 = nn.Dropout(0.1)  # in training mode: it would drop under no_grad too


@pytest.mark.parametrize("build, change", [
    (lambda: converted(variant="residual"), None),  # h + dw(h): the post-op would skip the residual
    (lambda: converted(mlp_layer=SubMlp), None),
    (lambda: converted(mlp_layer=lambda *a, **k: Mlp(*a, **{**k, "norm_layer": nn.LayerNorm})), None),
    (converted, _hook_act),
    (converted, _hook_fc2),
    (converted, _train_dropout),
], ids=["residual", "subclass", "norm", "hooked_act", "hooked_fc2", "train_dropout"])
def test_chain_refused_where_the_post_op_would_not_compute_the_forward(build, change, fusion):
    model = build()
    if change is not None:
        change(model)
        assert model.blocks[1].mlp.conv_act_chain() is not None  # control: the block left as it was
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, LocalityMLP)
    assert mlp.conv_act_chain() is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with OpNames() as ops:
            y = mlp_output(model, x)
        prev = set_conv_activation_fusion("off")
        try:
            ref = mlp_output(model, x)
        finally:
            set_conv_activation_fusion(prev)
    assert FUSED_OP not in ops.names or change is not None  # with a change, block 1 may still fuse
    if change is not _train_dropout:
        assert rel_err(y, ref) <= 1e-5


def mlp_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Block 0's MLP output in a whole-model call, read at the module after it (a hook on the MLP itself
    would make it run once on all tokens)."""
    out = []
    h = model.blocks[0].ls2.register_forward_hook(lambda m, a, y: out.append(a[0]))
    try:
        model(x)
    finally:
        h.remove()
    return out[0]


def test_onednn_activation_knows_exact_classes_only():
    assert onednn_activation(nn.GELU()) == ("gelu", "none")
    assert onednn_activation(nn.GELU(approximate="tanh")) == ("gelu", "tanh")
    assert onednn_activation(nn.Tanh()) is None
    assert onednn_activation(type("MyGELU", (nn.GELU,), {})()) is None
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda *a: None)
    assert onednn_activation(hooked) is None


def test_never_with_autograd_nor_in_a_captured_graph():
    model = converted()
    x = torch.randn(2, 3, 32, 32)
    prev = set_conv_activation_fusion("on")
    try:
        with OpNames() as ops:  # grad enabled (eval mode): gradients must flow through the plain ops
            model(x)
        assert FUSED_OP not in ops.names
        ep = torch.export.export(model, (x,), strict=False)
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert not any(FUSED_OP in t for t in targets), targets
        assert any("conv" in t for t in targets), targets
    finally:
        set_conv_activation_fusion(prev)


@pytest.mark.parametrize("act", ["hswish", "gelu", "relu"])
@pytest.mark.parametrize("batch", [1, 3])
def test_localvit_block_same_with_and_without_fusion(act, batch):
    """LocalViTFFN after fuse(): the second activation inside the depth-wise conv of the grid map (more than
    one sample; one sample in eager mode keeps its row-padded conv and the activation apart), same outputs as
    the conv and the activation apart."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **TINY, reg_tokens=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(model, variant="localvit", act=act, example_inputs=torch.randn(2, 3, 32, 32))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if hasattr(m, "dwconv"):
                m.dwconv.weight.add_(torch.randn(m.dwconv.weight.shape, generator=g) * 0.3)
    model = localify.fuse(model)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    ref, off, y, on = off_then_on(model, x)
    assert (FUSED_OP in on) == (batch > 1) and FUSED_OP not in off
    assert rel_err(y, ref) <= 1e-5


def test_one_sample_keeps_the_activation_apart():
    """Batch 1 (here without extra tokens, where the grid path would otherwise apply): no post-op."""
    model = converted("gelu", "no_cls")
    prev = set_conv_activation_fusion("on")
    try:
        with torch.inference_mode(), OpNames() as one:
            model(torch.randn(1, 3, 32, 32))
        with torch.inference_mode(), OpNames() as two:
            model(torch.randn(2, 3, 32, 32))
    finally:
        set_conv_activation_fusion(prev)
    assert FUSED_OP not in one.names and FUSED_OP in two.names
