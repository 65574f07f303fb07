"""LocalViTFFN (the paper's locality FFN), its BatchNorm fusion, and the residual LocalityLinear fusion."""

from __future__ import annotations

import copy
import importlib.util
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localify._grid import GridSource, GridSpec
from localify.errors import ConfigError, FuseError
from localify.ffn import LocalViTFFN, eca_kernel_size, fuse_ffn, fuse_locality_linear
from localify.layers import LocalityLinear, set_conv_activation_fusion, set_pointwise_backend

IN, HID, OUT = 16, 32, 24
B = 2
H, W = 14, 14

ACTS = ["hswish", "relu6", "relu", "silu", "swish", "gelu"]
ATTNS = [None, "se", "eca"]
KERNELS = [3, 5]
# (layout, prefix, suffix)
TOKENS = [("BNC", 0, 0), ("BNC", 1, 0), ("BNC", 0, 2), ("BNC", 4, 1), ("BHWC", 0, 0)]


pytestmark = pytest.mark.usefixtures("one_thread")


def static_grid(hw=(H, W)) -> GridSource:
    return GridSource(GridSpec(kind="static", static=hw))


def make_ffn(act="hswish", attention=None, k=3, layout="BNC", prefix=0, suffix=0, hw=(H, W), seed=0, **kw):
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(IN, HID), nn.Linear(HID, OUT)
    grid = static_grid(hw) if layout == "BNC" else None
    return LocalViTFFN(
        fc1, fc2, grid, prefix, suffix, kernel_size=k, act=act, attention=attention, layout=layout, **kw
    )


def make_input(m: LocalViTFFN, hw=(H, W), seed=1, dtype=torch.float32, batch=B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if m.layout == "BHWC":
        return torch.randn(batch, *hw, IN, generator=g).to(dtype)
    n = hw[0] * hw[1] + m.prefix + m.suffix
    return torch.randn(batch, n, IN, generator=g).to(dtype)


@torch.no_grad()
def randomise(m: nn.Module, seed=2) -> nn.Module:
    """Random BatchNorm running statistics and affine parameters, random depth-wise kernels."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            c = mod.num_features
            mod.running_mean.copy_(torch.randn(c, generator=g))
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            mod.weight.copy_(torch.randn(c, generator=g))
            mod.bias.copy_(torch.randn(c, generator=g))
        if isinstance(mod, nn.Conv2d):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.3)
    return m


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bn_eval(t: torch.Tensor, bn: nn.Module | None, dim: int = -1) -> torch.Tensor:
    if bn is None:
        return t
    shape = [1] * t.dim()
    shape[dim] = -1
    v = lambda z: z.view(shape)  # noqa: E731
    return (t - v(bn.running_mean)) / torch.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)


def naive_forward(m: LocalViTFFN, x: torch.Tensor, hw) -> torch.Tensor:
    """An independent eval-mode computation in plain NCHW layout (what the paper's code does)."""
    if m.layout == "BHWC":
        x = x.flatten(1, 2)
    n = x.shape[1]
    p, s = m.prefix, m.suffix

    def pw1(t):
        return m.act(bn_eval(F.linear(t, m.fc1.weight, m.fc1.bias), m.bn1))

    def pw2(t):
        return bn_eval(F.linear(t, m.fc2.weight, m.fc2.bias), m.bn3)

    pre, grid, suf = x[:, :p], x[:, p : n - s], x[:, n - s :]
    h = pw1(grid)
    img = h.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])
    img = F.conv2d(img, m.dwconv.weight, m.dwconv.bias, padding=m.kernel_size // 2, groups=img.shape[1])
    img = m.act(bn_eval(img, m.bn2, dim=1))
    pooled = img.mean((2, 3))
    if m.attention_name == "se":
        a = m.attn
        gate = F.hardsigmoid(a.fc2(F.relu(a.fc1(pooled))))
        img = img * gate[:, :, None, None]
    elif m.attention_name == "eca":
        gate = torch.sigmoid(m.attn.conv(pooled[:, None]))[:, 0]
        img = img * gate[:, :, None, None]
    grid_out = pw2(img.flatten(2).transpose(1, 2))
    out = torch.cat([pw2(pw1(pre)), grid_out, pw2(pw1(suf))], dim=1)
    if m.layout == "BHWC":
        out = out.view(x.shape[0], hw[0], hw[1], -1)
    return out


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- forward / backward over the option table --------------------------------------------------------------
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"{t[0]}-p{t[1]}-s{t[2]}")
@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize("attention", ATTNS)
@pytest.mark.parametrize("act", ACTS)
def test_forward_backward_shapes(act, attention, k, tokens):
    layout, p, s = tokens
    m = make_ffn(act, attention, k, layout, p, s)
    x = make_input(m).requires_grad_()
    y = m(x)
    expected = (B, H, W, OUT) if layout == "BHWC" else (B, H * W + p + s, OUT)
    assert y.shape == expected
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, prm in m.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    assert int(m.bn2.num_batches_tracked) == 1  # BatchNorms ran in training mode


@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"{t[0]}-p{t[1]}-s{t[2]}")
@pytest.mark.parametrize("attention", ATTNS)
@pytest.mark.parametrize("act", ["hswish", "gelu"])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_naive_nchw_computation(act, attention, tokens, batch, backend):
    """Eval mode (BatchNorms folded on the fly; one sample: the row-padded conv) against plain NCHW."""
    layout, p, s = tokens
    m = randomise(make_ffn(act, attention, 3, layout, p, s)).eval()
    x = make_input(m, batch=batch)
    with torch.no_grad():
        assert rel_err(m(x), naive_forward(m, x, (H, W))) < 1e-5
    assert rel_err(m(x).detach(), naive_forward(m, x, (H, W))) < 1e-5  # with autograd


@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"{t[0]}-p{t[1]}-s{t[2]}")
@pytest.mark.parametrize("attention", [None, "se"])
def test_training_step_same_with_both_pointwise_primitives(attention, tokens):
    """Training mode (BatchNorm batch statistics over all tokens): outputs, input and parameter gradients and
    the running statistics agree between the 1x1-conv and the F.linear point-wise layers."""
    layout, p, s = tokens
    results = []
    for name in ("conv", "linear"):
        prev = set_pointwise_backend(name)
        try:
            m = randomise(make_ffn("hswish", attention, 3, layout, p, s)).train()
            x = make_input(m, batch=3).requires_grad_()
            y = m(x)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
            results.append((y.detach(), x.grad, {n: q.grad for n, q in m.named_parameters()},
                            m.bn1.running_var.clone()))
        finally:
            set_pointwise_backend(prev)
    (y0, gx0, g0, v0), (y1, gx1, g1, v1) = results
    assert rel_err(y0, y1) < 1e-5 and rel_err(gx0, gx1) < 1e-5 and rel_err(v0, v1) < 1e-5
    for n in g0:
        assert rel_err(g0[n], g1[n]) < 1e-4, n


def test_eval_folding_follows_every_change():
    """The folded eval weights are reused only while nothing changed: in-place edits, load_state_dict,
    new running statistics, a dtype change and train mode all give the fresh module-by-module result."""
    m = randomise(make_ffn(attention="se", prefix=1)).eval()
    x = make_input(m)

    def check():
        with torch.no_grad():
            got = m(x)
            assert m.__dict__.get("_folded") is not None  # the cache is in use
        assert rel_err(got, naive_forward(m, x, (H, W))) < 1e-5

    check()
    with torch.no_grad():
        m.fc1.weight.mul_(2)
    check()
    sd = randomise(make_ffn(attention="se", prefix=1), seed=7).state_dict()
    m.load_state_dict(sd)
    check()
    with torch.no_grad():
        m.bn2.running_var.mul_(3)
        m.bn3.bias.add_(1)
    check()
    m.train()
    assert "_folded" not in m.__dict__
    m.eval()
    check()
    m.double()
    x = x.double()
    check()


def test_pickling_leaves_out_the_folded_weights():
    """torch.save(model) and deepcopy do not carry the eval cache (an extra copy of every weight)."""
    m = randomise(make_ffn(attention="se", prefix=1)).eval()
    x = make_input(m)
    with torch.no_grad():
        want = m(x)
    assert "_folded" in m.__dict__
    buf = io.BytesIO()
    torch.save(m, buf)
    size_without = len(buf.getvalue())
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(m)):
        assert "_folded" not in other.__dict__
        with torch.no_grad():
            assert torch.equal(other(x), want)
    assert "_folded" in m.__dict__  # the original keeps its cache
    m.__dict__.pop("_folded")
    buf = io.BytesIO()
    torch.save(m, buf)
    assert len(buf.getvalue()) == size_without


def test_eval_mode_gradients_reach_the_unfolded_parameters():
    """In eval mode with autograd the BatchNorms are folded on every call, differentiably."""
    m = randomise(make_ffn(attention="eca", prefix=2)).eval()
    x = make_input(m)
    m(x).square().mean().backward()
    for name in ("fc1.weight", "bn1.weight", "bn1.bias", "dwconv.weight", "bn2.weight", "fc2.weight", "bn3.bias"):
        g = m.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert "_folded" not in m.__dict__


def test_eval_path_respects_hooks_and_train_mode_batchnorm():
    """A hook on an inner layer, or a BatchNorm left in training mode, keeps the module-by-module path."""
    m = randomise(make_ffn(attention="se", prefix=1)).eval()
    x = make_input(m)
    calls = []
    handle = m.bn2.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        y_hook = m(x)
    assert calls == [1]
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(m(x), y_hook, rtol=1e-5, atol=1e-6)
        m.bn1.train()  # batch statistics: cannot be folded
        y_bn_train = m(x)
    assert int(m.bn1.num_batches_tracked) == 1
    assert rel_err(y_bn_train, y_hook) > 1e-4


@pytest.mark.parametrize("hw", [(6, 10), (10, 6), (1, 7)])
def test_non_square_grid(hw):
    m = randomise(make_ffn(attention="se", prefix=2, suffix=3, hw=hw)).eval()
    x = make_input(m, hw)
    with torch.no_grad():
        assert rel_err(m(x), naive_forward(m, x, hw)) < 1e-5
    mb = randomise(make_ffn(attention="eca", layout="BHWC")).eval()
    xb = make_input(mb, hw)
    with torch.no_grad():
        assert rel_err(mb(xb), naive_forward(mb, xb, hw)) < 1e-5


def test_grid_read_at_run_time():
    m = randomise(make_ffn(prefix=1)).eval()
    for hw in [(14, 14), (7, 9)]:
        m.grid_source.hw = hw
        x = make_input(m, hw)
        with torch.no_grad():
            assert m(x).shape == (B, hw[0] * hw[1] + 1, OUT)
            assert rel_err(m(x), naive_forward(m, x, hw)) < 1e-5


def test_token_count_mismatch_raises():
    m = make_ffn(prefix=1)
    with pytest.raises(RuntimeError, match="grid is 14x14 with 1 prefix"):
        m(torch.randn(B, 14 * 14 + 3, IN))


def test_unset_grid_raises():
    m = LocalViTFFN(nn.Linear(IN, HID), nn.Linear(HID, OUT), GridSource(GridSpec(module="patch_embed")))
    with pytest.raises(RuntimeError, match="never set"):
        m(torch.randn(B, 196, IN))


@pytest.mark.parametrize("p,s", [(1, 0), (0, 3), (4, 1)])
@pytest.mark.parametrize("attention", ATTNS)
def test_extra_tokens_skip_spatial_part(p, s, attention):
    m = randomise(make_ffn(attention=attention, prefix=p, suffix=s)).eval()
    x = make_input(m)
    n = x.shape[1]
    with torch.no_grad():
        y0 = m(x)
        m.dwconv.weight.normal_()
        if m.attn is not None:
            for prm in m.attn.parameters():
                prm.normal_()
        m.bn2.running_mean.normal_()
        y1 = m(x)
        # extras: exactly the point-wise path, untouched by the depth-wise conv / attention
        assert torch.equal(y0[:, :p], y1[:, :p])
        assert torch.equal(y0[:, n - s :], y1[:, n - s :])
        assert not torch.allclose(y0[:, p : n - s], y1[:, p : n - s])
        xe = torch.cat([x[:, :p], x[:, n - s :]], 1)
        pw = bn_eval(m.fc2(m.act(bn_eval(m.fc1(xe), m.bn1))), m.bn3)
        torch.testing.assert_close(torch.cat([y1[:, :p], y1[:, n - s :]], 1), pw)


def test_depthwise_conv_gets_a_channels_last_view():
    """The hidden grid is never copied: the depth-wise conv reads a channels-last view of the fc1 rows."""
    m = make_ffn(attention="se", prefix=1, suffix=2)
    seen = {}

    def pre(mod, args):
        seen["in"] = args[0].is_contiguous(memory_format=torch.channels_last)

    def post(mod, args, out):
        seen["out"] = out.is_contiguous(memory_format=torch.channels_last)

    m.dwconv.register_forward_pre_hook(pre)
    m.dwconv.register_forward_hook(post)
    m(make_input(m))
    assert seen == {"in": True, "out": True}


def test_weights_initialised_from_mlp():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(IN, HID), nn.Linear(HID, OUT)
    m = LocalViTFFN(fc1, fc2, static_grid())
    assert torch.equal(m.fc1.weight, fc1.weight) and m.fc1.bias is None
    assert torch.equal(m.fc2.weight, fc2.weight) and m.fc2.bias is None
    assert m.fc1.weight.data_ptr() != fc1.weight.data_ptr()
    assert (m.in_features, m.hidden_features, m.out_features) == (IN, HID, OUT)


# --- parameter counts --------------------------------------------------------------------------------------
def expected_params(attention, k, se_hidden=4, eca_k=None):
    n = IN * HID + 2 * HID + HID * k * k + 2 * HID + HID * OUT + 2 * OUT
    if attention == "se":
        n += HID * se_hidden + se_hidden + se_hidden * HID + HID
    elif attention == "eca":
        n += eca_k if eca_k is not None else eca_kernel_size(HID)
    return n


@pytest.mark.parametrize(
    "attention,k,kw,se_hidden,eca_k",
    [
        (None, 3, {}, None, None),
        (None, 7, {}, None, None),
        ("se", 3, {}, 4, None),  # default SE hidden 4 (LocalViT-T)
        ("se", 3, {"se_hidden": 8}, 8, None),
        ("se", 5, {"se_reduction": 4}, HID // 4, None),  # "SE4"
        ("eca", 3, {}, None, None),
        ("eca", 3, {"eca_kernel": 7}, None, 7),
    ],
)
def test_parameter_counts(attention, k, kw, se_hidden, eca_k):
    m = make_ffn(attention=attention, k=k, **kw)
    assert count_params(m) == expected_params(attention, k, se_hidden, eca_k)


def test_eca_kernel_formula():
    assert eca_kernel_size(768) == 5 and eca_kernel_size(1536) == 5
    m = LocalViTFFN(nn.Linear(192, 768), nn.Linear(768, 192), static_grid(), attention="eca")
    assert m.attn.conv.kernel_size == (5,)


def test_deit_tiny_matches_paper_parameter_count():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_patch16_224")
    grid = static_grid()
    for blk in model.blocks:
        mlp = blk.mlp
        blk.mlp = LocalViTFFN(mlp.fc1, mlp.fc2, grid, prefix=1, act="hswish", attention="se", se_hidden=4)
    assert count_params(model) == 5_913_304  # LOCALVIT.md section 3 (norm2 kept)
    assert count_params(model) - sum(count_params(b.norm2) for b in model.blocks) == 5_908_696
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)

    spec = importlib.util.spec_from_file_location(
        "reference_localvit", Path(__file__).resolve().parents[1] / "benchmarks" / "reference_localvit.py"
    )
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    rmodel = ref.replace_mlps_with_reference(timm.create_model("deit_tiny_patch16_224"))
    assert count_params(rmodel) == 5_913_304


# --- configuration errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,match",
    [
        ({"act": "mish"}, "hswish"),
        ({"attention": "cbam"}, "eca"),
        ({"layout": "NCHW"}, "BHWC"),
        ({"k": 4}, "odd"),
        ({"k": 0}, "odd"),
        ({"attention": "se", "se_hidden": 4, "se_reduction": 4}, "not both"),
        ({"attention": "se", "se_reduction": 64}, "does not fit"),
        ({"attention": "eca", "eca_kernel": 4}, "odd"),
        ({"layout": "BHWC", "prefix": 1}, "prefix"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        make_ffn(**kw)


def test_bnc_needs_grid_source():
    with pytest.raises(ConfigError, match="grid source"):
        LocalViTFFN(nn.Linear(IN, HID), nn.Linear(HID, OUT), None)


# --- fusion ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"{t[0]}-p{t[1]}-s{t[2]}")
@pytest.mark.parametrize("attention", ATTNS)
@pytest.mark.parametrize("act,k", [("hswish", 3), ("relu6", 5), ("gelu", 3)])
def test_fuse_ffn_equivalence(act, k, attention, tokens):
    layout, p, s = tokens
    m = randomise(make_ffn(act, attention, k, layout, p, s)).eval()
    before = {k_: v.clone() for k_, v in m.state_dict().items()}
    f = fuse_ffn(m)
    assert f.fused and not m.fused
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in f.modules())
    assert f.grid_source is m.grid_source
    x = make_input(m)
    with torch.no_grad():
        ref = m(x)
        assert rel_err(f(x), ref) <= 1e-5
    # the original is untouched
    after = m.state_dict()
    assert all(torch.equal(before[k_], after[k_]) for k_ in before)
    # in float64 the folding is exact up to rounding
    md = m.double()
    with torch.no_grad():
        assert rel_err(fuse_ffn(md)(x.double()), md(x.double())) <= 1e-12


def test_fuse_ffn_idempotent_and_method():
    m = randomise(make_ffn(attention="se", prefix=1, suffix=1)).eval()
    f1 = m.fuse()
    f2 = fuse_ffn(f1)
    assert f2 is not f1
    s1, s2 = f1.state_dict(), f2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    x = make_input(m)
    with torch.no_grad():
        assert torch.equal(f1(x), f2(x))


def test_fuse_ffn_bf16():
    m = randomise(make_ffn(attention="se", prefix=1)).eval()
    mb = m.to(torch.bfloat16)
    f = fuse_ffn(mb)
    assert f.fc1.weight.dtype == torch.bfloat16 and f.fc1.bias.dtype == torch.bfloat16
    x = make_input(m, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_err(f(x), mb(x)) < 3e-2


def test_fused_can_still_train():
    f = fuse_ffn(randomise(make_ffn(attention="eca", prefix=1)).eval()).train()
    f(make_input(f)).sum().backward()
    assert f.fc1.bias.grad is not None and f.dwconv.bias.grad is not None


@pytest.mark.parametrize("what", ["ffn", "locality"])
def test_fuse_in_train_mode_raises(what):
    if what == "ffn":
        m = make_ffn()
        fn = fuse_ffn
    else:
        m = LocalityLinear(nn.Linear(IN, HID), static_grid(), residual=True)
        fn = fuse_locality_linear
    with pytest.raises(FuseError, match=r"\.eval\(\)"):
        fn(m.train())


@pytest.mark.parametrize("p,s", [(0, 0), (1, 0), (2, 3)])
@pytest.mark.parametrize("k", [3, 5])
def test_fuse_locality_linear(p, s, k):
    torch.manual_seed(0)
    m = LocalityLinear(nn.Linear(IN, HID), static_grid(), p, s, kernel_size=k, residual=True)
    with torch.no_grad():
        m.dwconv.weight.normal_()
    m.eval()
    w_before = m.dwconv.weight.clone()
    f = fuse_locality_linear(m)
    assert not f.residual and m.residual
    assert torch.equal(m.dwconv.weight, w_before)
    assert f.grid_source is m.grid_source
    x = torch.randn(B, H * W + p + s, IN)
    with torch.no_grad():
        assert rel_err(f(x), m(x)) <= 1e-6
        f2 = fuse_locality_linear(f)
        assert not f2.residual and torch.equal(f2.dwconv.weight, f.dwconv.weight)
        assert torch.equal(f2(x), f(x))


def naive_locality_linear(m: LocalityLinear, x: torch.Tensor, hw) -> torch.Tensor:
    """fc1 on every token, then the depth-wise conv on the grid in plain NCHW layout; extras skip it."""
    h = m.linear(x)
    n, p, s = x.shape[1], m.prefix, m.suffix
    g = h[:, p : n - s].transpose(1, 2).reshape(x.shape[0], -1, *hw).contiguous()
    y = F.conv2d(g, m.dwconv.weight, None, 1, m.dwconv.kernel_size[0] // 2, 1, g.shape[1])
    if m.residual:
        y = y + g
    return torch.cat([h[:, :p], y.flatten(2).transpose(1, 2), h[:, n - s :]], 1)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("residual", [False, True], ids=["dwconv", "residual"])
@pytest.mark.parametrize(
    "p,s,hw", [(0, 0, (H, W)), (1, 0, (H, W)), (2, 3, (5, 7)), (4, 1, (7, 5)), (9, 0, (6, 3)), (0, 4, (1, 3))]
)
def test_locality_linear_matches_naive(p, s, hw, residual, batch, backend):
    """Every token path (a view of a row-padded conv: dense for one sample, strided for more, in inference;
    split + concat with autograd; more extra tokens than a grid row: the fallback) gives the plain
    computation, with a random kernel, in and out of autograd, with either point-wise primitive."""
    torch.manual_seed(0)
    m = LocalityLinear(nn.Linear(IN, HID), static_grid(hw), p, s, residual=residual)
    with torch.no_grad():
        m.dwconv.weight.normal_()
    x = torch.randn(batch, hw[0] * hw[1] + p + s, IN, requires_grad=True)
    ref = naive_locality_linear(m, x, hw)
    y = m(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    (gx,) = torch.autograd.grad((y * ref.detach()).sum(), x)
    (gr,) = torch.autograd.grad((ref * ref.detach()).sum(), x)
    torch.testing.assert_close(gx, gr, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref.detach(), rtol=1e-5, atol=1e-6)


def test_locality_linear_hooks_on_dwconv_still_run():
    """A hook on the depth-wise conv (or a replaced conv module) is honoured on every path."""
    m = LocalityLinear(nn.Linear(IN, HID), static_grid(), prefix=1)
    calls = []
    m.dwconv.register_forward_hook(lambda mod, a, out: calls.append(out.shape))
    for batch in (1, 2):
        m(torch.randn(batch, H * W + 1, IN))
    assert calls == [(1, HID, H, W), (2, HID, H, W)]


def test_fuse_locality_linear_identity_init():
    """A freshly converted residual block (zero kernel) fuses into the Dirac kernel of the plain block."""
    lin = nn.Linear(IN, HID)
    r = fuse_locality_linear(LocalityLinear(lin, static_grid(), residual=True).eval())
    plain = LocalityLinear(lin, static_grid(), residual=False)
    assert torch.equal(r.dwconv.weight, plain.dwconv.weight)


# --- dtypes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tokens", [("BNC", 1, 2), ("BHWC", 0, 0)], ids=["BNC", "BHWC"])
def test_low_precision(dtype, tokens):
    layout, p, s = tokens
    m = randomise(make_ffn(attention="se", layout=layout, prefix=p, suffix=s)).eval()
    x = make_input(m)
    with torch.no_grad():
        ref = m(x)
    ml = m.to(dtype)
    try:
        with torch.no_grad():
            y = ml(x.to(dtype))
    except (NotImplementedError, RuntimeError) as e:
        if "not implemented" in str(e).lower():
            pytest.skip(f"CPU lacks a {dtype} kernel: {e}")
        raise
    assert y.dtype == dtype
    assert rel_err(y, ref) < 5e-2
    ml.train()
    y = ml(x.to(dtype))
    y.float().square().mean().backward()
    assert all(torch.isfinite(prm.grad.float()).all() for prm in ml.parameters())


# --- torch.compile -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compile_fullgraph():
    m = randomise(make_ffn(attention="se", prefix=1, suffix=2))
    x = make_input(m)
    c = torch.compile(m, fullgraph=True)
    m.train()
    y = c(x)
    y.square().mean().backward()
    assert m.fc1.weight.grad is not None
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-4, atol=1e-5)
    f = fuse_ffn(m)
    cf = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(cf(x), m(x), rtol=1e-4, atol=1e-5)


@pytest.fixture
def conv_act_off():
    prev = set_conv_activation_fusion("off")
    yield
    set_conv_activation_fusion(prev)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("act", ["hswish", "gelu"])
@pytest.mark.parametrize(
    "tokens", [("BNC", 0, 0), ("BNC", 2, 1), ("BHWC", 0, 0)], ids=["BNC", "BNC-p2-s1", "BHWC"]
)
@pytest.mark.usefixtures("conv_act_off")
def test_no_grad_inplace_path_matches(fused, act, tokens):
    """Without autograd the activations run in place; same result, bit for bit, and the input is left alone.
    (The activation inside the conv, a oneDNN post-op, rounds differently in the last bit: it is off here and
    compared with a tolerance in test_conv_act.py.)"""
    layout, p, s = tokens
    m = randomise(make_ffn(act, "se", 3, layout, p, s)).eval()
    if fused:
        m = fuse_ffn(m)
    x = make_input(m)
    x0 = x.clone()
    ref = m(x).detach()
    with torch.no_grad():
        y = m(x)
    with torch.inference_mode():
        z = m(x)
    assert torch.equal(x, x0)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    torch.testing.assert_close(z, ref, rtol=0, atol=0)


@pytest.mark.parametrize("residual", [False, True])
def test_locality_linear_empty_batch(residual):
    m = LocalityLinear(nn.Linear(IN, HID), static_grid(), prefix=1, suffix=2, residual=residual)
    assert m(torch.randn(0, H * W + 3, IN)).shape == (0, H * W + 3, HID)
