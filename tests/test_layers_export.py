"""Export-friendly converted blocks: LocalityMLP, the point-wise primitive, and what an exported graph holds.

ONNX graphs of converted tiny ViTs: onnxruntime matches eager PyTorch (<= 1e-5 of the output scale) at three
(batch, H, W) sizes of one dynamic export, and the wide hidden tensor (4x the model width) is never
concatenated (LocalityMLP, LocalViTFFN) nor transposed (LocalViTFFN) in the exported graph.
"""

from __future__ import annotations

import collections
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from fc1_only import splice_fc1_only
from op_names import OpNames
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

import localify
from localify._grid import GridSource, GridSpec
from localify._splice import get_state
from localify.ffn import LocalViTFFN
from localify.layers import (
    LocalityLinear,
    LocalityMLP,
    PointwiseLinear,
    conv_activation_fusion,
    linear_channels_last,
    linear_rows,
    per_token_module,
    pointwise,
    pointwise_backend,
    pointwise_replacement,
    set_conv_activation_fusion,
    set_pointwise_backend,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, HID = 32, 128  # HID appears in no other tensor of the tiny models below
P = 8
SIZES = [(1, 32, 48), (2, 48, 32), (3, 56, 40)]  # (batch, H, W) in pixels: 4x6, 6x4 and 7x5 patches
BACKENDS = ["conv", "linear"]
# (prefix, suffix) of the block-level tests
TOKENS = [(0, 0), (1, 0), (2, 3), (0, 1)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def localify_fc1_only(model: nn.Module, variant: str) -> nn.Module:
    """The conversion as a save without ``per_token`` replays it: fc1 wrapped, the MLP modules kept."""
    return splice_fc1_only(model, get_state(localify.localify(copy.deepcopy(model), variant=variant)))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        if isinstance(m, (LocalityLinear, LocalViTFFN)):
            m.dwconv.weight.add_(torch.randn(m.dwconv.weight.shape, generator=g) * 0.2)
    return model


def tiny_vit(variant: str, reg_tokens: int = 0, depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = localify.create_model("vit_small_patch16_224", embed_dim=DIM, depth=depth, num_heads=2, patch_size=P,
                                  img_size=32, dynamic_img_size=True, num_classes=5, reg_tokens=reg_tokens).eval()
    if variant.endswith("-fc1"):  # the MLP modules kept, as before localify ran them as LocalityMLPs
        localify_fc1_only(model, variant.split("-")[0])
    else:
        localify.localify(model, variant=variant.split("-")[0])
    randomise(model)
    if variant == "localvit-fused":
        localify.fuse(model)
    return model


def img(b: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b * 1000 + h * 10 + w))


# ------------------------------------------------------------------------------------------------ ONNX
def wide_nodes(path) -> collections.Counter:
    """Transpose / Concat / Split nodes of the exported graph whose output has the hidden width."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    count = collections.Counter()
    for n in model.graph.node:
        if n.op_type in ("Transpose", "Concat", "Split") and any(HID in shapes.get(o, ()) for o in n.output):
            count[n.op_type] += 1
    return count


# variant -> the most wide Transpose / Concat nodes per converted block in the exported graph. dwconv-fc1: the
# way back from the conv to tokens and the join with the class token (LocalityLinear returns every token).
# dwconv (a LocalityMLP): the MLP's own activation runs on a (B, H, W, hidden) map between two 1x1 convolutions
# (two transposes, which onnxruntime's transpose optimizer cancels); nothing concatenated. localvit: nothing.
WIDE = {"dwconv-fc1": (1, 1), "dwconv": (2, 0), "localvit-fused": (0, 0)}


@pytest.mark.parametrize("variant", list(WIDE))
def test_onnx_export_exact_at_three_sizes_and_no_wide_concat(variant, tmp_path):
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)
    import onnxruntime

    model = tiny_vit(variant, reg_tokens=1, depth=1)  # class + register token: two prefix tokens
    info = localify.export_onnx(model, tmp_path / "m.onnx", img(2, 32, 48), verify=False)
    assert info.dynamic_batch and info.dynamic_hw, info
    sess = onnxruntime.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    for b, h, w in SIZES:
        x = img(b, h, w)
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        assert got.shape == want.shape
        assert rel_err(got, want) <= 1e-5, (b, h, w)
    wide = wide_nodes(info.path)
    transposes, concats = WIDE[variant]
    assert wide["Transpose"] <= transposes and wide["Concat"] <= concats and wide["Split"] == 0, wide


# ------------------------------------------------------------------------------------------------ LocalityMLP
def static_grid(hw) -> GridSource:
    return GridSource(GridSpec(kind="static", static=hw))


def make_mlp(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return Mlp(DIM, HID, act_layer=nn.GELU)
    if kind == "glu":
        return GluMlp(DIM, 2 * HID, act_layer=nn.SiLU)
    if kind == "swiglu":
        return SwiGLU(DIM, HID, norm_layer=nn.LayerNorm)
    raise ValueError(kind)


FC1 = {"mlp": ["fc1"], "glu": ["fc1"], "swiglu": ["fc1_g", "fc1_x"]}


def convert(mlp: nn.Module, kind: str, hw, p: int, s: int, residual: bool = False) -> LocalityMLP:
    grid = static_grid(hw)
    for name in FC1[kind]:
        ll = LocalityLinear(getattr(mlp, name), grid, p, s, residual=residual)
        with torch.no_grad():
            ll.dwconv.weight.add_(torch.randn(ll.dwconv.weight.shape, generator=torch.Generator().manual_seed(3)))
        setattr(mlp, name, ll)
    mlp.fc2 = pointwise_replacement(mlp.fc2)  # as localify() does
    return LocalityMLP(mlp, grid, p, s)


class ReferenceFc1(nn.Module):
    """fc1 then the depth-wise conv over the grid tokens in plain NCHW code (h + conv(h) if residual)."""

    def __init__(self, ll: LocalityLinear, hw) -> None:
        super().__init__()
        self.ll, self.hw = ll, hw

    def forward(self, x):
        ll, (h, w) = self.ll, self.hw
        y = F.linear(x, ll.linear.weight, ll.linear.bias)
        p, s, n = ll.prefix, ll.suffix, x.shape[1]
        g = y[:, p:n - s].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        c = F.conv2d(g, ll.dwconv.weight, None, padding=ll.dwconv.padding, groups=g.shape[1])
        c = g + c if ll.residual else c
        return torch.cat([y[:, :p], c.flatten(2).transpose(1, 2), y[:, n - s:]], dim=1)


def reference(block: LocalityMLP, kind: str, hw) -> nn.Module:
    ref = copy.deepcopy(block.get_base_layer())
    for name in FC1[kind]:
        setattr(ref, name, ReferenceFc1(getattr(ref, name), hw))
    return ref


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"p{t[0]}s{t[1]}")
@pytest.mark.parametrize("kind", ["mlp", "glu", "swiglu"])
def test_locality_mlp_matches_plain_reference(kind, tokens, residual, backend):
    p, s = tokens
    hw = (4, 5)
    block = convert(make_mlp(kind), kind, hw, p, s, residual).eval()
    ref = reference(block, kind, hw)
    for b in (1, 3):
        x = torch.randn(b, p + 20 + s, DIM, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            want = ref(x)
            assert rel_err(block(x), want) <= 1e-5
        assert rel_err(block(x).detach(), want) <= 1e-5  # with autograd


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("tokens", TOKENS + [(6, 0)], ids=lambda t: f"p{t[0]}s{t[1]}")
def test_locality_linear_matches_plain_reference(tokens, residual, backend):
    """Every path: one sample or more, inference (row-padded conv, a strided view) or autograd (concat),
    and a prefix wider than a grid row (6 > 5: the concatenating path)."""
    p, s = tokens
    hw = (4, 5)
    torch.manual_seed(0)
    ll = LocalityLinear(nn.Linear(DIM, HID), static_grid(hw), p, s, residual=residual)
    with torch.no_grad():
        ll.dwconv.weight.add_(torch.randn(ll.dwconv.weight.shape))
    ref = ReferenceFc1(ll, hw)
    for b in (1, 3):
        x = torch.randn(b, p + 20 + s, DIM, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            want = ref(x)
            got = ll(x)
            assert rel_err(got, want) <= 1e-5
            assert rel_err(F.gelu(got), F.gelu(want)) <= 1e-5  # what reads it next
        xg = x.clone().requires_grad_()
        got = ll(xg)
        assert rel_err(got, want) <= 1e-5
        got.square().sum().backward()
        xr = x.clone().requires_grad_()
        ref(xr).square().sum().backward()
        assert rel_err(xg.grad, xr.grad) <= 1e-5


def test_locality_mlp_keeps_keys_children_and_gradients():
    mlp = make_mlp("mlp")
    mlp.note = "kept"
    block = convert(mlp, "mlp", (4, 5), 1, 0)
    plain = convert(make_mlp("mlp"), "mlp", (4, 5), 1, 0).get_base_layer()
    assert list(block.state_dict()) == list(plain.state_dict())  # fc1.linear.weight, fc1.dwconv.weight, ...
    assert [n for n, _ in block.named_modules()] == [n for n, _ in plain.named_modules()]
    assert block.get_base_layer() is mlp and block.fc1 is mlp.fc1 and type(block.fc2) is PointwiseLinear
    assert isinstance(block.fc2, nn.Linear) and block.note == "kept"  # attributes of the MLP read through
    block.train()
    assert mlp.training and block.drop1.training
    x = torch.randn(2, 21, DIM, requires_grad=True)
    block(x).square().mean().backward()
    for name, prm in block.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    block.eval()
    assert not mlp.training and not block.drop1.training


def test_locality_mlp_child_replaced_on_wrapper_is_used():
    """A child set on the wrapper (as PEFT does) is the MLP's child too, and its forward runs."""
    block = convert(make_mlp("mlp"), "mlp", (4, 5), 1, 0).eval()
    x = torch.randn(2, 21, DIM)
    seen = []
    new_fc2 = nn.Linear(HID, DIM)
    new_fc2.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    block.fc2 = new_fc2
    assert block.get_base_layer().fc2 is new_fc2
    with torch.no_grad():
        block(x)
    assert sorted(len(s) for s in seen) == [2, 4]  # the extra tokens as rows, the grid as a (B, H, W, C) map


def test_locality_mlp_copies_and_pickles_consistently():
    block = convert(make_mlp("glu"), "glu", (4, 5), 2, 1).eval()
    x = torch.randn(2, 23, DIM)
    with torch.no_grad():
        want = block(x)
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    for other in (copy.deepcopy(block), torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(block))):
        assert other.get_base_layer().fc1 is other.fc1  # still one set of children
        with torch.no_grad():
            assert torch.equal(other(x), want)
            other.fc2.weight.mul_(2)
            assert not torch.equal(other(x), want)
    with torch.no_grad():
        assert torch.equal(block(x), want)  # the copies share nothing with the original


def test_locality_mlp_in_a_model_loads_the_state_dict_of_the_unwrapped_conversion():
    wrapped, plain = tiny_vit("dwconv"), tiny_vit("dwconv-fc1")
    assert type(wrapped.blocks[0].mlp) is LocalityMLP and type(plain.blocks[0].mlp) is Mlp
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())
    x = img(2, 32, 40)
    with torch.no_grad():
        assert rel_err(wrapped(x), plain(x)) <= 1e-5


def test_fuse_replaces_the_residual_fc1_inside_locality_mlp():
    """localify.fuse swaps each residual LocalityLinear on its parent, here the LocalityMLP: the MLP it runs
    gets the fused one too (shared children), and the output is unchanged."""
    model = tiny_vit("residual")
    x = img(2, 32, 40)
    with torch.no_grad():
        want = model(x)
        localify.fuse(model)
        for blk in model.blocks:
            assert not blk.mlp.fc1.residual and blk.mlp.get_base_layer().fc1 is blk.mlp.fc1
        assert rel_err(model(x), want) <= 1e-5


def test_converted_model_with_locality_mlp_is_still_recognised_as_converted():
    """localify's own trace sees fc1 / fc2 as linear layers (its module hooks keep the module calls)."""
    plan = localify.find_mlps(tiny_vit("dwconv"))
    assert [s.path for s in plan.sites] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(s.status == "localified" for s in plan.sites)


def test_locality_mlp_compiles_without_graph_breaks():
    import torch._dynamo

    model = tiny_vit("dwconv")
    assert type(model.blocks[0].mlp) is LocalityMLP
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(img(2, 32, 48))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason) for r in ex.break_reasons]


def test_one_sample_paths_are_eager_only(monkeypatch):
    """With one sample, eager mode runs fc1 once over every token (row-padded conv); while a graph is captured
    the grid goes through the MLP as a (1, H, W, C) map and the extra tokens as rows, as for more samples."""
    model = tiny_vit("dwconv", reg_tokens=1)
    lin = model.blocks[0].mlp.fc1
    seen = []
    lin.register_forward_pre_hook(lambda m, args: seen.append(args[0].dim()))
    x = img(1, 32, 48)
    with torch.no_grad():
        want = model(x)
        assert seen == [3]
        seen.clear()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert rel_err(model(x), want) <= 1e-5
        assert seen == [4, 2]


@pytest.mark.parametrize("variant", ["dwconv-fc1", "dwconv", "localvit-fused"])
def test_compile_one_sample_matches_eager(variant):
    """torch.compile at batch 1 (the grid path; the fc1-only block keeps its row-padded conv): no graph break,
    same result."""
    import torch._dynamo

    model = tiny_vit(variant, reg_tokens=1)
    x = img(1, 32, 48)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(x)
        assert ex.graph_break_count == 0, [str(r.reason) for r in ex.break_reasons]
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        assert rel_err(got, model(x)) <= 1e-5


def test_locality_mlp_config_errors_change_nothing():
    mlp = make_mlp("mlp")
    for kw, match in [({"layout": "NCHW"}, "unknown layout"), ({"prefix": -1}, "must be >= 0")]:
        with pytest.raises(localify.ConfigError, match=match):
            LocalityMLP(mlp, static_grid((4, 5)), **kw)
        assert type(mlp.fc2) is nn.Linear
    with pytest.raises(localify.ConfigError, match="needs a grid source"):
        LocalityMLP(mlp, None)


def test_per_token_module_probe():
    assert all(per_token_module(make_mlp(k), DIM) for k in ("mlp", "glu", "swiglu"))

    class TokenMixing(nn.Module):  # mixes tokens: not a per-token MLP
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(DIM, DIM)

        def forward(self, x):
            return self.fc(x - x.mean(-2, keepdim=True))

    class Only3d(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(DIM, DIM)

        def forward(self, x):
            b, n, c = x.shape
            return self.fc(x)

    mixing = TokenMixing().train()
    mixing.fc.eval()
    assert not per_token_module(mixing, DIM) and mixing.training and not mixing.fc.training
    assert not per_token_module(Only3d(), DIM)


# ------------------------------------------------------------------------------------------------ point-wise
def test_pointwise_primitives_equal_linear(backend):
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(HID, DIM, generator=g), torch.randn(HID, generator=g)
    x = torch.randn(3, 4, 5, DIM, generator=g)
    want = F.linear(x, w, bias)
    assert rel_err(linear_channels_last(x, w, bias), want) <= 1e-6
    assert rel_err(linear_channels_last(x[:, :, 1:], w, None), F.linear(x[:, :, 1:], w)) <= 1e-6  # strided
    rows = x.reshape(-1, DIM)
    assert rel_err(linear_rows(rows, w, bias, 3), want.reshape(-1, HID)) <= 1e-6
    lin = nn.Linear(DIM, HID)
    lin.__class__ = PointwiseLinear
    for t in (x, rows, x[0]):
        assert rel_err(lin(t), F.linear(t, lin.weight, lin.bias)) <= 1e-6


def test_pointwise_conv_of_one_sample_with_batch_stride_0_stays_channels_last():
    """A one-sample grid whose batch stride is 0 (how torch.compile hands over a buffer reused in place) still
    runs as a channels-last conv: the result is a dense (1, H, W, out) view, not a transposed NCHW output."""
    g = torch.Generator().manual_seed(2)
    w, bias = torch.randn(HID, DIM, generator=g), torch.randn(HID, generator=g)
    x = torch.randn(4, 5, DIM, generator=g).as_strided((1, 4, 5, DIM), (0, 5 * DIM, DIM, 1))
    y = linear_channels_last(x, w, bias)
    assert y.is_contiguous() and rel_err(y, F.linear(x, w, bias)) <= 1e-6


@pytest.mark.parametrize("shape, batch", [((1, 4, 5, DIM), None), ((2, 4, 5, DIM), None), ((1, 9, DIM), None),
                                          ((3, 9, DIM), None), ((12, DIM), 3), ((1, DIM), 1), ((5, DIM), None)])
def test_pointwise_runs_the_chosen_primitive_at_every_batch(backend, shape, batch):
    """pointwise(): the 1x1 conv under the conv backend for grids, tokens and rows of known batch, one
    sample included (faster there too on the CPUs measured); F.linear otherwise, and always for rows of unknown
    batch (a block's few extra tokens). Same values as F.linear either way."""
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(HID, DIM, generator=g), torch.randn(HID, generator=g)
    x = torch.randn(*shape, generator=g)
    with torch.inference_mode(), OpNames() as ops:
        y = pointwise(x, w, bias, batch)
    assert y.shape == (*shape[:-1], HID)
    assert rel_err(y, F.linear(x, w, bias)) <= 1e-6
    conv = backend == "conv" and not (len(shape) == 2 and batch is None)
    assert bool(ops.names & {"conv2d", "convolution"}) == conv, ops.names
    assert bool(ops.names & {"linear", "addmm", "mm"}) == (not conv), ops.names


def test_pointwise_tokens_take_linear_when_compiled(monkeypatch):
    """Under torch.compile (and export) only grids run as a 1x1 conv; tokens and rows take F.linear."""
    prev = set_pointwise_backend("conv")
    try:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        w = torch.randn(HID, DIM)
        for x, batch, conv in [(torch.randn(1, 4, 5, DIM), None, True), (torch.randn(1, 9, DIM), None, False),
                               (torch.randn(6, DIM), 2, False)]:
            with torch.inference_mode(), OpNames() as ops:
                pointwise(x, w, None, batch)
            assert bool(ops.names & {"conv2d", "convolution"}) == conv, (x.shape, ops.names)
    finally:
        set_pointwise_backend(prev)


# (setter, getter, environment variable, (value a, value b), what an unknown name is called)
SETTINGS = {
    "pointwise": (set_pointwise_backend, pointwise_backend, "LOCALIFY_POINTWISE", ("linear", "conv"),
                  "point-wise backend"),
    "conv_act": (set_conv_activation_fusion, lambda: "on" if conv_activation_fusion() else "off",
                 "LOCALIFY_CONV_ACT", ("off", "on"), "conv-activation setting"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_cpu_dependent_settings(monkeypatch, name):
    """Both CPU-dependent choices: set by a function, else by the environment variable as read at import or at
    the last set(None), else auto; an unknown name raises (setter) or warns and falls back to auto (variable)."""
    set_, get, env, (a, b), what = SETTINGS[name]
    prev = set_(None)
    try:
        monkeypatch.setenv(env, a)
        set_(None)  # the environment variable is read now (and at import)
        assert get() == a
        monkeypatch.setenv(env, b)
        assert get() == a  # not read on every call
        set_(None)
        assert get() == b
        set_(a)
        assert get() == a
        with pytest.raises(ValueError, match=f"unknown {what}"):
            set_("gemm")
        assert get() == a
        set_("auto")
        assert get() in (a, b)
        monkeypatch.setenv(env, "gemm")
        with pytest.warns(UserWarning, match=f"{env}='gemm'"):
            set_(None)
        assert get() in (a, b)
    finally:
        monkeypatch.delenv(env)
        set_(prev)


@pytest.mark.parametrize("backend", ["auto", "measure"])
def test_first_compiled_call_has_no_graph_break(backend):
    """The backend is resolved at import: a fresh process whose first call is compiled traces one graph (in
    ``measure`` mode too: nothing is timed in a graph)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])  # this checkout's localify, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "LOCALIFY_POINTWISE": backend}
    code = (
        "import torch, torch._dynamo\n"
        "from torch import nn\n"
        "from localify.layers import PointwiseLinear\n"
        "lin = nn.Linear(4, 8)\n"
        "lin.__class__ = PointwiseLinear\n"
        "ex = torch._dynamo.explain(lin)(torch.randn(2, 3, 5, 4))\n"
        "print(ex.graph_break_count)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "0", out.stderr[-2000:]


@pytest.mark.parametrize("variant", ["dwconv-fc1", "dwconv", "localvit-fused"])
def test_backends_agree_on_a_converted_model(variant):
    model = tiny_vit(variant, reg_tokens=1)
    outs = []
    for name in BACKENDS:
        prev = set_pointwise_backend(name)
        try:
            with torch.no_grad():
                outs.append([model(img(b, 32, 48)) for b in (1, 2)])
        finally:
            set_pointwise_backend(prev)
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 1e-5
