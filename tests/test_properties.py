"""Property-based tests (hypothesis): random tiny ViTs from timm, Hugging Face and user code.

For each drawn model:

(a) ``localify.localify`` preserves the function exactly at conversion (at the traced size, and at a second
    size for models that accept other sizes), against a deep copy of the model taken before converting;
(b) ``localify.save`` / ``localify.load`` round-trip to bit-identical outputs (same process, same threads);
(c) every ``LocalityLinear``, with random depth-wise kernels, computes what a plain reference written here
    computes: fc1 on all tokens, the prefix / raster grid / suffix split taken from the model's definition
    (not from localify), a zero-padded depth-wise ``F.conv2d`` on the (B, C, H, W) grid only, concatenated
    back; the module is called through the model (a forward hook captures its input and output). Where localify
    runs the MLP module as a ``LocalityMLP``, its fc1 sees the grid alone as a (B, H, W, C) map (conv) and the
    extra tokens as rows (no conv); the model then computes what its fc1-only conversion (the MLP modules kept,
    same weights) computes, and every fc1 of that one is checked on all tokens as above;
(d) ``variant="localvit"`` then ``localify.fuse`` computes what the unfused model computes in eval mode,
    with random BatchNorm statistics and affine parameters.

Examples are derandomised (the same ones on every run) and few per test: each model is traced once.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import timm
import timm.layers
import torch
import torch.nn.functional as F
from fc1_only import splice_fc1_only
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from torch import nn
from user_models import Block, PatchEmbed

import localify
from localify._splice import get_state
from localify.layers import LocalityLinear

pytestmark = pytest.mark.usefixtures("one_thread")

# no "explain" phase: it reruns a failing example dozens of times (each one traces a model)
SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = dict(rtol=1e-5, atol=1e-5)
DIM = 32


# ---------------------------------------------------------------------------------------------- models
@dataclass
class Drawn:
    """A drawn model and what its definition says about its tokens."""

    model: nn.Module
    patch: int
    size: tuple[int, int]  # traced (H, W)
    second: tuple[int, int] | None  # another size the model accepts (None: fixed size)
    prefix: int
    suffix: int = 0
    hf: bool = False
    example: bool = False  # pass example_inputs to localify (the model says nothing about its input size)
    factory: bool = False  # built by a function of this file: localify.load runs it with trust_code=True
    note: dict = field(default_factory=dict)

    def call(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hf:
            return self.model(x)
        other = tuple(x.shape[-2:]) != self.size
        extra = {"interpolate_pos_encoding": True} if other and self.note["interp"] else {}
        return self.model(pixel_values=x, **extra).last_hidden_state

    def example_inputs(self) -> dict:
        return {"example_inputs": _image(self.size, 1, 0)} if self.example else {}

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch, x.shape[-1] // self.patch


MLPS = {"mlp": timm.layers.Mlp, "swiglu": timm.layers.SwiGLU, "glu": timm.layers.GluMlp}


def timm_vit(mlp: str = "mlp", **kwargs: Any) -> nn.Module:
    """A timm VisionTransformer whose MLP class is named by a string (a factory for localify.load)."""
    return timm.models.vision_transformer.VisionTransformer(mlp_layer=MLPS[mlp], **kwargs)


class SuffixViT(nn.Module):
    """A user-written ViT: [prefix tokens] + raster grid + [suffix tokens] (detection-style queries), built
    from the blocks of tests/user_models.py. No grid position embedding: any size in whole patches works."""

    def __init__(self, patch: int = 8, prefix: int = 1, suffix: int = 2, depth: int = 1) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(3, DIM, patch)
        self.prefix = nn.Parameter(torch.randn(1, prefix, DIM) * 0.5) if prefix else None
        self.queries = nn.Parameter(torch.randn(1, suffix, DIM) * 0.5)
        self.blocks = nn.Sequential(*[Block(DIM, 2, 2.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, _, _ = self.patch_embed(x)
        b = t.shape[0]
        parts = [t, self.queries.expand(b, -1, -1)]
        if self.prefix is not None:
            parts.insert(0, self.prefix.expand(b, -1, -1))
        return self.norm(self.blocks(torch.cat(parts, 1)))


def suffix_vit(**kwargs: Any) -> nn.Module:
    return SuffixViT(**kwargs)


@st.composite
def grids(draw, lo: int = 2, hi: int = 5) -> tuple[int, int]:
    return draw(st.integers(lo, hi)), draw(st.integers(lo, hi))


def _second(grid: tuple[int, int], patch: int) -> tuple[int, int]:
    """Another size: the transposed grid when not square (same tokens, another raster), else one row more."""
    gh, gw = grid
    return (gw * patch, gh * patch) if gh != gw else ((gh + 1) * patch, gw * patch)


@st.composite
def timm_models(draw, mlps=("mlp", "swiglu", "glu")) -> Drawn:
    patch = draw(st.sampled_from([8, 16]))
    grid = draw(grids())
    class_token = draw(st.booleans())
    reg = draw(st.one_of(st.just(0), st.integers(1, 10)))
    mlp = draw(st.sampled_from(mlps))
    dynamic = draw(st.booleans())
    pool = "token" if class_token and draw(st.booleans()) else "avg"
    kw = dict(img_size=[grid[0] * patch, grid[1] * patch], patch_size=patch, embed_dim=DIM,
              depth=draw(st.integers(1, 2)), num_heads=2, num_classes=5, class_token=class_token,
              reg_tokens=reg, no_embed_class=draw(st.booleans()), global_pool=pool,
              mlp_ratio=draw(st.sampled_from([1.0, 2.0, 3.0])), dynamic_img_size=dynamic,
              act_layer=draw(st.sampled_from(["gelu", "quick_gelu"])))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if mlp == "mlp":  # a timm name (and kwargs): localify.save knows the source
        model = localify.create_model("vit_tiny_patch16_224", **kw)
    else:  # the MLP class is not a JSON value: a factory that names it, a source all the same
        model = localify.create_model(f"{__name__}:timm_vit", mlp=mlp, **kw)
    size = (grid[0] * patch, grid[1] * patch)
    return Drawn(model.eval(), patch, size, _second(grid, patch) if dynamic else None, int(class_token) + reg,
                 factory=mlp != "mlp", note=dict(mlp=mlp, **kw))


HF = ("ViTModel", "DeiTModel", "Dinov2Model", "Dinov2WithRegistersModel")


@st.composite
def hf_models(draw, kinds=HF, swiglu=True) -> Drawn:
    import transformers

    kind = draw(st.sampled_from(kinds))
    act = draw(st.sampled_from(["gelu", "quick_gelu", "relu"]))
    common = dict(hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                  hidden_act=act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    prefix = 1
    if kind in ("ViTModel", "DeiTModel"):
        cfg = getattr(transformers, kind.replace("Model", "Config"))(intermediate_size=64, **common)
        prefix += kind == "DeiTModel"  # the distillation token
    else:
        extra = {}
        if kind == "Dinov2WithRegistersModel":
            extra["num_register_tokens"] = draw(st.integers(0, 4))
            prefix += extra["num_register_tokens"]
        cfg = getattr(transformers, kind.replace("Model", "Config"))(
            mlp_ratio=2, use_swiglu_ffn=swiglu and draw(st.booleans()), **common, **extra)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = getattr(transformers, kind)(cfg)
    second = draw(st.sampled_from([(32, 48), (48, 32), (40, 24)]))
    return Drawn(model.eval(), 8, (32, 32), second, prefix, hf=True,
                 note=dict(kind=kind, act=act, interp=kind in ("ViTModel", "DeiTModel")))


@st.composite
def user_models(draw) -> Drawn:
    patch = draw(st.sampled_from([4, 8]))
    grid = draw(grids())
    kw = dict(patch=patch, prefix=draw(st.integers(0, 3)), suffix=draw(st.integers(1, 6)),
              depth=draw(st.integers(1, 2)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = localify.create_model(f"{__name__}:suffix_vit", **kw)
    return Drawn(model.eval(), patch, (grid[0] * patch, grid[1] * patch), _second(grid, patch), kw["prefix"],
                 kw["suffix"], example=True, factory=True, note=kw)


def kernels(d: Drawn) -> st.SearchStrategy[int]:
    """Odd kernel sizes whose taps reach some grid cell from another at the traced size (localify refuses
    larger ones): up to twice the larger side of the grid, less one."""
    top = 2 * max(d.size) // d.patch - 1
    return st.sampled_from([k for k in (1, 3, 5, 7) if k <= top])


def _image(size: tuple[int, int], batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ references
def locality_reference(x: torch.Tensor, m: LocalityLinear, grid: tuple[int, int], prefix: int,
                       suffix: int) -> torch.Tensor:
    """fc1 on all tokens; the depth-wise conv (zero padding) on the raster grid only; concatenated back. A
    (B, H, W, C) input is the grid alone and (R, C) rows are extra tokens (no conv), as a LocalityMLP runs fc1."""
    if x.dim() == 4:
        assert tuple(x.shape[1:3]) == tuple(grid), (x.shape, grid)
        return locality_reference(x.flatten(1, 2), m, grid, 0, 0).unflatten(1, grid)
    if x.dim() == 2:
        return F.linear(x, m.linear.weight, m.linear.bias)
    h = F.linear(x, m.linear.weight, m.linear.bias)
    b, n, c = h.shape
    gh, gw = grid
    assert n == prefix + gh * gw + suffix, (n, prefix, grid, suffix)
    img = h[:, prefix:prefix + gh * gw].reshape(b, gh, gw, c).permute(0, 3, 1, 2)
    w = m.dwconv.weight
    y = F.conv2d(img, w, None, padding=w.shape[-1] // 2, groups=c)
    if m.residual:
        y = y + img
    grid_tokens = y.permute(0, 2, 3, 1).reshape(b, gh * gw, c)
    return torch.cat([h[:, :prefix], grid_tokens, h[:, prefix + gh * gw:]], 1)


def _randomise_kernels(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LocalityLinear):
                m.dwconv.weight.copy_(torch.randn(m.dwconv.weight.shape, generator=g) * 0.5)


def _check_locality_linears(d: Drawn, x: torch.Tensor) -> int:
    """(c): every LocalityLinear called by the model on ``x`` equals the reference; returns how many ran."""
    seen: list[tuple[LocalityLinear, torch.Tensor, torch.Tensor]] = []
    mods = [m for m in d.model.modules() if isinstance(m, LocalityLinear)]
    handles = [m.register_forward_hook(lambda m, a, y: seen.append((m, a[0], y))) for m in mods]
    try:
        with torch.no_grad():
            d.call(x)
    finally:
        for h in handles:
            h.remove()
    assert {id(m) for m, _, _ in seen} == {id(m) for m in mods}
    for m, inp, out in seen:
        if inp.dim() == 2:  # a LocalityMLP's extra tokens: prefix and suffix of every sample
            assert inp.shape[0] == x.shape[0] * (d.prefix + d.suffix), (inp.shape, d.note)
        ref = locality_reference(inp, m, d.grid(x), d.prefix, d.suffix)
        assert out.shape == ref.shape, (out.shape, ref.shape, d.note)
        assert torch.allclose(out, ref, **TOL), (float((out - ref).abs().max()), d.note)
    return len(seen)


def _events(d: Drawn, variant: str, batch: int) -> None:
    """What the examples covered (``pytest --hypothesis-show-statistics``)."""
    event(f"model: {d.note.get('kind') or d.note.get('mlp') or 'user'}")
    event(f"variant: {variant}")
    event(f"prefix tokens: {min(d.prefix, 2)}{'+' if d.prefix > 1 else ''}; suffix tokens: {d.suffix > 0}")
    event(f"second size: {d.second is not None}; batch {batch}")


def _convert_and_check(d: Drawn, tmp_path_factory, variant: str, kernel: int, layers: Any, seed: int,
                       batch: int) -> None:
    """(a), (c) and (b) for one drawn model and one conversion."""
    _events(d, variant, batch)
    sizes = [d.size] + ([d.second] if d.second else [])
    xs = [_image(s, batch, seed + i) for i, s in enumerate(sizes)]
    reference = copy.copy(d)
    reference.model = copy.deepcopy(d.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(d.model, layers=layers, variant=variant, kernel_size=kernel, **d.example_inputs())
    assert any(isinstance(m, LocalityLinear) for m in d.model.modules())
    with torch.no_grad():
        for x in xs:  # (a)
            out, ref = d.call(x), reference.call(x)
            assert torch.allclose(out, ref, **TOL), (float((out - ref).abs().max()), d.note)
    _randomise_kernels(d.model, seed)
    for x in xs:  # (c)
        _check_locality_linears(d, x)
    state = get_state(d.model)
    event(f"MLP modules run as LocalityMLP: {any(r.per_token for r in state.sites)}")
    if any(r.per_token for r in state.sites):  # (c) the LocalityMLPs against the fc1-only conversion
        twin = copy.copy(d)
        twin.model = copy.deepcopy(reference.model)
        splice_fc1_only(twin.model, state)
        twin.model.load_state_dict(d.model.state_dict())
        for x in xs:
            assert _check_locality_linears(twin, x) > 0
            with torch.no_grad():
                out, ref = d.call(x), twin.call(x)
            assert torch.allclose(out, ref, **TOL), (float((out - ref).abs().max()), d.note)
    path = tmp_path_factory.mktemp("save") / ("model" if d.hf else "model.safetensors")  # (b)
    localify.save(d.model, path)  # the source: what localify.create_model / the HF config recorded
    loaded = copy.copy(d)
    loaded.model = localify.load(path, trust_code=d.factory)
    with torch.no_grad():
        for x in xs:
            assert torch.equal(loaded.call(x), d.call(x)), d.note


# ----------------------------------------------------------------------------------------- (a) (b) (c)
@settings(max_examples=30, **SETTINGS)
@given(d=timm_models(), variant=st.sampled_from(["dwconv", "residual"]), data=st.data(),
       layers=st.sampled_from(["all", "1", [1], "early"]), seed=st.integers(0, 1000), batch=st.integers(1, 2))
def test_timm_vits(d, variant, data, layers, seed, batch, tmp_path_factory):
    _convert_and_check(d, tmp_path_factory, variant, data.draw(kernels(d)), layers, seed, batch)


@settings(max_examples=20, **SETTINGS)
@given(d=hf_models(), variant=st.sampled_from(["dwconv", "residual"]), data=st.data(),
       seed=st.integers(0, 1000), batch=st.integers(1, 2))
def test_hf_vits(d, variant, data, seed, batch, tmp_path_factory):
    _convert_and_check(d, tmp_path_factory, variant, data.draw(kernels(d)), "all", seed, batch)


@settings(max_examples=20, **SETTINGS)
@given(d=user_models(), variant=st.sampled_from(["dwconv", "residual"]), data=st.data(),
       seed=st.integers(0, 1000), batch=st.integers(1, 2))
def test_user_vit_with_suffix_tokens(d, variant, data, seed, batch, tmp_path_factory):
    _convert_and_check(d, tmp_path_factory, variant, data.draw(kernels(d)), "all", seed, batch)


# ------------------------------------------------------------------------------------------------- (d)
def _randomise_localvit(model: nn.Module, seed: int) -> int:
    """Random BatchNorm statistics and affine parameters (and kernels) in every localvit block."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, localify.LocalViTFFN):
                m.dwconv.weight.copy_(torch.randn(m.dwconv.weight.shape, generator=g) * 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                n += 1
    return n


@st.composite
def localvit_models(draw) -> Drawn:
    family = draw(st.sampled_from(["timm", "hf", "user"]))
    if family == "timm":
        return draw(timm_models(mlps=("mlp",)))
    if family == "hf":
        return draw(hf_models(kinds=("Dinov2Model", "Dinov2WithRegistersModel"), swiglu=False))  # ViT/DeiT:
        # their MLP spans two modules (intermediate, output), which the localvit variant cannot replace
    return draw(user_models())


@settings(max_examples=25, **SETTINGS)
@given(d=localvit_models(), act=st.sampled_from(["hswish", "relu6", "relu", "silu", "gelu"]),
       attention=st.sampled_from([None, "se", "eca"]), data=st.data(), seed=st.integers(0, 1000),
       batch=st.integers(1, 2))
def test_localvit_fuse_matches_unfused(d, act, attention, data, seed, batch, tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(d.model, variant="localvit", kernel_size=data.draw(kernels(d)), act=act,
                          attention=attention, **d.example_inputs())
    assert _randomise_localvit(d.model, seed) >= 3
    _events(d, f"localvit, attention {attention}", batch)
    d.model.eval()
    kw = dict(act=act, attention=attention)
    sizes = [d.size] + ([d.second] if d.second else [])
    xs = [_image(s, batch, seed + i) for i, s in enumerate(sizes)]
    with torch.no_grad():
        unfused = [d.call(x) for x in xs]
        localify.fuse(d.model)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.model.modules())
        for x, y in zip(xs, unfused):
            out = d.call(x)
            assert torch.allclose(out, y, **TOL), (float((out - y).abs().max()), d.note, kw)
    path = tmp_path_factory.mktemp("fused") / ("model" if d.hf else "model.safetensors")  # a fused save, (b)
    localify.save(d.model, path)  # the source: what localify.create_model / the HF config recorded
    back = copy.copy(d)
    back.model = localify.load(path, trust_code=d.factory)
    with torch.no_grad():
        for x in xs:
            assert torch.equal(back.call(x), d.call(x)), d.note


# ---------------------------------------------------------------------------------- one LocalityLinear
@settings(max_examples=60, **SETTINGS)
@given(grid=grids(1, 6), prefix=st.integers(0, 12), suffix=st.integers(0, 12), batch=st.integers(1, 3),
       kernel=st.sampled_from([1, 3, 5, 7]), residual=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 1000))
def test_locality_linear_matches_reference(grid, prefix, suffix, batch, kernel, residual, bias, seed):
    """Any prefix / suffix count (more than a grid row too: the batch-1 path's limit), batch, kernel size."""
    from localify._grid import GridSource, GridSpec

    torch.manual_seed(seed)
    m = LocalityLinear(nn.Linear(8, 12, bias=bias), GridSource(GridSpec(kind="static", static=grid)), prefix,
                       suffix, kernel, residual=residual)
    _randomise_kernels(m, seed)
    x = torch.randn(batch, prefix + grid[0] * grid[1] + suffix, 8)
    with torch.no_grad():
        out = m(x)
        ref = locality_reference(x, m, grid, prefix, suffix)
    assert torch.allclose(out, ref, **TOL), float((out - ref).abs().max())


# ----------------------------------------------------------------------------------------- layer specs
@settings(max_examples=60, **SETTINGS)
@given(n=st.integers(1, 40), data=st.data())
def test_layer_ranges_round_trip(n, data):
    picked = data.draw(st.sets(st.integers(1, n), min_size=1))
    text = localify.format_ranges(picked)
    assert localify.parse_layers(text, n) == sorted(picked)
    assert localify.parse_layers(text.replace(",", " , ").replace("-", " - "), n) == sorted(picked)
    as_list = data.draw(st.permutations(sorted(picked)))
    kind = data.draw(st.sampled_from([int, np.int64, np.int32, np.uint8]))
    assert localify.parse_layers([kind(i) for i in as_list], n) == sorted(picked)
    intruder = data.draw(st.sampled_from([1.0, 1.5, 2.7, True, False, "1", None, np.float32(2)]))
    with pytest.raises(localify.LayerSpecError):
        localify.parse_layers([*as_list, intruder], n)


@pytest.mark.parametrize("layers", [[1.5], [True], [2.7], 1.0, [1, 2.0]])
def test_non_integer_layers_refused_before_any_change(layers):
    torch.manual_seed(0)
    model = localify.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=DIM, depth=2,
                                  num_heads=2, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(localify.LayerSpecError, match="block"):
        localify.localify(model, layers=layers)
    assert not any(isinstance(m, LocalityLinear) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
