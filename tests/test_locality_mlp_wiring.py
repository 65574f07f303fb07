"""``localify()`` runs every per-token MLP module of a ``dwconv`` / ``residual`` conversion as a LocalityMLP.

The MLP module (timm ``Mlp`` / ``GluMlp`` / ``SwiGLU``, ...) keeps its children: fc1 becomes a LocalityLinear as
before, fc2 a PointwiseLinear with the same parameters, and the module itself runs as a LocalityMLP (grid and
extra tokens through the whole MLP apart). The reference for every check is the fc1-only conversion of the same
model with the same weights: what a save without ``per_token`` replays, built here through the same splice.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import timm
import torch
from fc1_only import splice_fc1_only
from safetensors.torch import load_file, save_file
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models.vision_transformer import Block
from torch import nn

import localify
from localify._grid import GridSource, GridSpec
from localify._plan import Layout
from localify._splice import get_state, splice
from localify._variants import get_variant, per_token_site
from localify.errors import LocalifyError
from localify.layers import LocalityLinear, LocalityMLP, PointwiseLinear, pointwise_replacement

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5, img_size=32, patch_size=8)  # 4x4 patches


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def img(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed + 100 * b + h + w))


class DetViT(nn.Module):
    """[cls] + grid + 2 detection tokens (suffix) through timm Blocks; every token reaches the output."""

    def __init__(self, mlp_layer: type[nn.Module] = Mlp) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 32) * 0.5)
        self.det = nn.Parameter(torch.randn(1, 2, 32) * 0.5)
        self.blocks = nn.Sequential(*[Block(32, 2, mlp_layer=mlp_layer) for _ in range(2)])
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        b = t.shape[0]
        t = torch.cat([self.cls.expand(b, -1, -1), t, self.det.expand(b, -1, -1)], dim=1)
        return self.norm(self.blocks(t))


class ThreeDimMlp(Mlp):
    """A timm Mlp that takes (B, N, C) tokens only: not a per-token module in LocalityMLP's sense."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return super().forward(x)


def _timm(name: str, **kw):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **{**TINY, **kw}).eval()
    return build


def _det(mlp_layer=Mlp):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return DetViT(mlp_layer).eval()
    return build


# id -> (builder, prefix, suffix, first-layer projections of one MLP)
MODELS = {
    "deit": (_timm("deit_tiny_patch16_224"), 1, 0, ["fc1"]),
    "deit_distilled": (_timm("deit_tiny_distilled_patch16_224"), 2, 0, ["fc1"]),
    "vit_reg4": (_timm("vit_small_patch16_224", reg_tokens=4), 5, 0, ["fc1"]),
    "vit_no_cls": (_timm("vit_small_patch16_224", class_token=False, global_pool="avg"), 0, 0, ["fc1"]),
    "vit_glumlp": (_timm("vit_small_patch16_224", mlp_layer=GluMlp), 1, 0, ["fc1"]),
    "vit_swiglu": (_timm("vit_small_patch16_224", mlp_layer=SwiGLU), 1, 0, ["fc1_g", "fc1_x"]),
    "eva02": (_timm("eva02_tiny_patch14_224"), 1, 0, ["fc1"]),
    "det_suffix": (_det(), 1, 2, ["fc1"]),
}


def convert(model: nn.Module, variant: str = "dwconv", **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return localify.localify(model, variant=variant, example_inputs=img(2), **kw)


def convert_fc1_only(model: nn.Module, variant: str = "dwconv") -> nn.Module:
    """The fc1-only conversion (the MLP modules kept): the records of a conversion, ``per_token`` false."""
    return splice_fc1_only(model, get_state(convert(copy.deepcopy(model), variant)))


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LocalityLinear):
            m.dwconv.weight.add_(torch.randn(m.dwconv.weight.shape, generator=g) * 0.3)
    return model


def mlps(model: nn.Module) -> list[nn.Module]:
    return [b.mlp for b in model.blocks]


def grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameter gradients of a fixed random projection of the output (not a sum of squares: after a final
    LayerNorm that is nearly constant, and its gradients would be rounding noise)."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ the wiring
@pytest.mark.parametrize("variant", ["dwconv", "residual"])
@pytest.mark.parametrize("name", list(MODELS))
def test_per_token_mlps_run_as_locality_mlp_and_match_the_fc1_only_conversion(name, variant):
    build, prefix, suffix, fc1 = MODELS[name]
    base = build()
    model = convert(copy.deepcopy(base), variant)
    ref = convert_fc1_only(copy.deepcopy(base), variant)
    for m, r in zip(mlps(model), mlps(ref)):
        assert type(m) is LocalityMLP and type(r) is type(m.get_base_layer()) is type(base.blocks[0].mlp)
        assert (m.prefix, m.suffix, m.layout) == (prefix, suffix, "BNC")
        assert all(type(getattr(m, f)) is LocalityLinear and getattr(m, f).residual == (variant == "residual")
                   for f in fc1)
        assert type(m.fc2) is PointwiseLinear and type(r.fc2) is nn.Linear
    assert all(r.per_token for r in get_state(model).sites)
    assert list(model.state_dict()) == list(ref.state_dict())

    for b in (1, 3):  # exact at conversion
        with torch.no_grad():
            assert rel_err(model(img(b)), base(img(b))) <= 1e-5, b

    perturb(model)
    ref.load_state_dict(model.state_dict())
    for b in (1, 3):
        x = img(b, seed=5)
        with torch.no_grad():
            want = ref(x)
            assert rel_err(model(x), want) <= 1e-5, b
        assert rel_err(model(x), want) <= 1e-5, b  # with autograd
    assert rel_err(model(img(1)), base(img(1))) > 1e-3  # the perturbed kernels do act

    model.train()
    ref.train()
    x = img(3, seed=9)
    got, want = grads(model, x), grads(ref, x)
    assert got.keys() == want.keys()
    for k in want:
        assert rel_err(got[k], want[k]) <= 1e-4, k


def test_an_mlp_that_is_not_per_token_keeps_the_fc1_only_conversion():
    base = _det(ThreeDimMlp)()
    model = convert(copy.deepcopy(base))
    assert [type(m) for m in mlps(model)] == [ThreeDimMlp, ThreeDimMlp]
    assert all(type(m.fc1) is LocalityLinear and type(m.fc2) is nn.Linear for m in mlps(model))
    sites = get_state(model).sites
    assert not any(r.per_token for r in sites) and all("per_token" not in r.to_dict() for r in sites)
    perturb(model)
    with torch.no_grad():
        y = model(img(3))
    ref = copy.deepcopy(base)
    ref.blocks = nn.Sequential(*[_PlainBlock(b) for b in model.blocks])
    with torch.no_grad():
        assert rel_err(y, ref(img(3))) <= 1e-5


class _PlainBlock(nn.Module):
    """A converted timm Block computed in plain code: fc1, the depth-wise conv over the grid tokens (NCHW), act,
    fc2; the class and detection tokens skip the conv (an independent reference for DetViT)."""

    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.blk = blk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blk = self.blk
        x = x + blk.ls1(blk.attn(blk.norm1(x)))
        t = blk.norm2(x)
        fc1 = blk.mlp.fc1
        h = nn.functional.linear(t, fc1.linear.weight, fc1.linear.bias)
        g = h[:, 1:-2].transpose(1, 2).reshape(h.shape[0], -1, 4, 4)
        g = nn.functional.conv2d(g, fc1.dwconv.weight, None, padding=1, groups=g.shape[1])
        h = torch.cat([h[:, :1], g.flatten(2).transpose(1, 2), h[:, -2:]], dim=1)
        h = nn.functional.linear(blk.mlp.act(h), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        return x + blk.ls2(h)


def test_per_token_site_needs_bnc_tokens_one_module_and_a_per_token_forward():
    model = MODELS["deit"][0]()
    site = localify.find_mlps(model).sites[0]
    assert per_token_site(model, site)
    tokens = dataclasses.replace(site.tokens, layout=Layout.BHWC)
    for other in (dataclasses.replace(site, tokens=tokens), dataclasses.replace(site, self_contained=False),
                  dataclasses.replace(site, path=""), dataclasses.replace(site, fc2="head"),
                  dataclasses.replace(site, fc1=("blocks.0.attn.qkv",)), dataclasses.replace(site, path="blocks.9")):
        assert not per_token_site(model, other), other
    model.blocks[0].mlp = ThreeDimMlp(32, 128)
    assert not per_token_site(model, site)


def test_repr_names_the_block_and_its_mlp():
    model = convert(MODELS["deit_distilled"][0]())
    text = repr(model.blocks[0].mlp)
    assert text.startswith("LocalityMLP(\n  Mlp, prefix=2, suffix=0, layout=BNC\n  (fc1): LocalityLinear(")
    assert "(fc2): PointwiseLinear(in_features=128, out_features=32, bias=True)" in text


# ------------------------------------------------------------------------------------------------ splice contract
def _snapshot(model: nn.Module) -> list:
    return [(n, m, type(m), m.training) for n, m in model.named_modules()] + \
        [(k, v.data_ptr()) for k, v in model.state_dict().items()]


def test_build_changes_nothing_and_a_failed_splice_leaves_the_model_as_it_was():
    model = MODELS["vit_swiglu"][0]()
    plan = localify.find_mlps(model)
    variant, config = get_variant("dwconv"), localify.LocalifyConfig()
    records = [variant.record(model, s) for s in plan.convertible()]
    assert all(r.per_token for r in records)
    before = _snapshot(model)
    built = [variant.build(model, r, config, GridSource(GridSpec.from_dict(r.grid))) for r in records]
    assert [p for p, _ in built[0]] == ["blocks.0.mlp.fc1_g", "blocks.0.mlp.fc1_x", "blocks.0.mlp.fc2",
                                        "blocks.0.mlp"]
    assert _snapshot(model) == before and type(model.blocks[0].mlp.fc2) is nn.Linear

    def fail() -> None:
        raise LocalifyError("stop before the swap")

    with pytest.raises(LocalifyError, match="stop before the swap"):
        splice(model, config, records, prepare=fail)
    assert _snapshot(model) == before and get_state(model) is None


def test_pointwise_replacement_shares_parameters_and_leaves_the_linear_alone():
    lin = nn.Linear(8, 4).eval()
    lin.note = "kept"
    new = pointwise_replacement(lin)
    assert type(new) is PointwiseLinear and type(lin) is nn.Linear and not new.training and new.note == "kept"
    assert new.weight is lin.weight and new.bias is lin.bias and new._parameters is not lin._parameters
    new.weight = nn.Parameter(torch.zeros(4, 8))
    assert lin.weight is not new.weight  # its own containers
    x = torch.randn(2, 3, 5, 8)
    assert rel_err(pointwise_replacement(lin)(x), lin(x)) <= 1e-6
    hooked = nn.Linear(8, 4)
    hooked.register_forward_hook(lambda *a: None)

    class Sub(nn.Linear):
        pass

    assert pointwise_replacement(hooked) is None and pointwise_replacement(Sub(8, 4)) is None
    assert pointwise_replacement(nn.Conv2d(8, 4, 1)) is None


def test_modes_are_kept_through_the_conversion():
    model = MODELS["deit"][0]().train()
    model.blocks[0].mlp.drop1.eval()  # a child in another mode than its MLP
    convert(model)
    mlp = model.blocks[0].mlp
    assert type(mlp) is LocalityMLP and mlp.training and mlp.get_base_layer().training
    assert not mlp.drop1.training and mlp.fc1.training and mlp.fc1.dwconv.training and mlp.fc2.training
    model.eval()
    assert not any(m.training for m in model.modules()) and not mlp.get_base_layer().training
    model.train()
    assert all(m.training for m in model.modules()) and mlp.get_base_layer().training


# ------------------------------------------------------------------------------------------------ around it
def test_forward_hooks_on_the_mlp_fire_once_per_call():
    model = MODELS["deit"][0]()
    early = []
    handle = model.blocks[1].mlp.register_forward_hook(lambda m, a, o: early.append(a[0].shape))
    convert(model)
    perturb(model)
    mlp = model.blocks[0].mlp
    assert type(mlp) is LocalityMLP and type(model.blocks[1].mlp) is LocalityMLP
    seen, pre = [], []
    with torch.no_grad():
        want = {b: model(img(b)) for b in (1, 3)}
    early.clear()
    mlp.register_forward_hook(lambda m, a, o: seen.append((a[0].shape, o.shape)))
    mlp.register_forward_pre_hook(lambda m, a: pre.append(a[0].shape))
    for b in (1, 3):
        with torch.no_grad():
            assert rel_err(model(img(b)), want[b]) <= 1e-6
    assert seen == [((b, 17, 32), (b, 17, 32)) for b in (1, 3)] and pre == [(b, 17, 32) for b in (1, 3)]
    assert early == [(1, 17, 32), (3, 17, 32)]  # a hook registered before the conversion still fires once
    handle.remove()
    with torch.no_grad():
        model(img(3))
    assert len(early) == 2


@pytest.mark.parametrize("form", ["m.safetensors", "mdir"])
def test_save_load_round_trip_is_bitwise(tmp_path, form):
    torch.manual_seed(0)
    model = perturb(convert(localify.create_model("vit_small_patch16_224", reg_tokens=2, **TINY).eval()))
    localify.save(model, tmp_path / form)
    back = localify.load(tmp_path / form)
    assert [type(m) for m in mlps(back)] == [LocalityMLP, LocalityMLP]
    assert all(s["per_token"] for s in localify.read_recipe(tmp_path / form)["sites"])
    assert list(back.state_dict()) == list(model.state_dict())
    for b in (1, 3):
        with torch.no_grad():
            assert torch.equal(back(img(b)), model(img(b)))


def test_a_save_without_per_token_loads_the_fc1_only_conversion(tmp_path):
    """Saves from before the field convert fc1 only, exactly as they did."""
    torch.manual_seed(0)
    base = localify.create_model("deit_tiny_patch16_224", **TINY).eval()
    model = perturb(convert(copy.deepcopy(base)))
    localify.save(model, tmp_path / "m.safetensors")
    recipe = localify.read_recipe(tmp_path / "m.safetensors")
    for s in recipe["sites"]:
        del s["per_token"]
    for k in ("fused", "weights"):
        recipe.pop(k)
    save_file(load_file(str(tmp_path / "m.safetensors")), str(tmp_path / "old.safetensors"),
              metadata={"localify_recipe": json.dumps(recipe)})
    old = localify.load(tmp_path / "old.safetensors")
    ref = convert_fc1_only(copy.deepcopy(base))
    ref.load_state_dict(model.state_dict())
    assert [type(m) for m in mlps(old)] == [Mlp, Mlp] and type(old.blocks[0].mlp.fc2) is nn.Linear
    for b in (1, 3):
        with torch.no_grad():
            assert torch.equal(old(img(b)), ref.eval()(img(b)))
            assert rel_err(old(img(b)), model(img(b))) <= 1e-5


def test_fuse_a_residual_conversion_and_save_it(tmp_path):
    torch.manual_seed(0)
    model = perturb(convert(localify.create_model("deit_tiny_distilled_patch16_224", **TINY).eval(), "residual"))
    with torch.no_grad():
        want = model(img(3))
    localify.fuse(model)
    for m in mlps(model):
        assert type(m) is LocalityMLP and not m.fc1.residual and m.fc1.fused and m.get_base_layer().fc1 is m.fc1
    with torch.no_grad():
        assert rel_err(model(img(3)), want) <= 1e-5
    localify.save(model, tmp_path / "f.safetensors")
    back = localify.load(tmp_path / "f.safetensors")
    assert type(back.blocks[0].mlp) is LocalityMLP and not back.blocks[0].mlp.fc1.residual
    with torch.no_grad():
        assert torch.equal(back(img(3)), model(img(3)))


def test_converting_in_two_steps(tmp_path):
    torch.manual_seed(0)
    base = localify.create_model("deit_tiny_patch16_224", **{**TINY, "depth": 4}).eval()
    model = convert(copy.deepcopy(base), layers="1-2")
    assert [type(m) for m in mlps(model)] == [LocalityMLP, LocalityMLP, Mlp, Mlp]
    convert(model, layers="3-4")
    assert [type(m) for m in mlps(model)] == [LocalityMLP] * 4
    assert [(r.block, r.per_token) for r in get_state(model).sites] == [(b, True) for b in (1, 2, 3, 4)]
    assert [s.status for s in localify.find_mlps(model).sites] == [localify.SiteStatus.LOCALIFIED] * 4
    with torch.no_grad():
        assert rel_err(model(img(3)), base(img(3))) <= 1e-5
    perturb(model)
    localify.save(model, tmp_path / "m.safetensors")
    back = localify.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(back(img(3)), model(img(3)))


def test_mark_trainable_trains_the_kernels_only():
    model = convert(_timm("vit_small_patch16_224", mlp_layer=SwiGLU, global_pool="avg")())  # every block counts
    report = localify.mark_trainable(model)
    assert set(report.trainable_names) == {f"blocks.{i}.mlp.{f}.dwconv.weight" for i in (0, 1)
                                           for f in ("fc1_g", "fc1_x")}
    model.train()
    g = grads(model, img(3))
    assert set(g) == set(report.trainable_names) and all(v.abs().sum() > 0 for v in g.values())


def test_torch_export_dynamic_batch_and_grid_with_prefix_tokens():
    from torch.export import Dim

    model = perturb(convert(_timm("vit_small_patch16_224", reg_tokens=4, dynamic_img_size=True)()))
    assert type(model.blocks[0].mlp) is LocalityMLP
    b, gh, gw = Dim("batch", min=1), Dim("gh", min=2, max=16), Dim("gw", min=2, max=16)
    ep = torch.export.export(model, (img(2, 32, 40),), dynamic_shapes=({0: b, 2: 8 * gh, 3: 8 * gw},),
                             strict=False)
    run = ep.module()
    for bs, h, w in [(1, 32, 48), (3, 48, 24), (2, 40, 40)]:
        x = img(bs, h, w)
        with torch.no_grad():
            assert rel_err(run(x), model(x)) <= 1e-5, (bs, h, w)
