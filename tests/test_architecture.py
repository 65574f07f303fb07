"""The extension points and API contracts of the restructured library: a variant added from outside, fusing
through timm, options and plans that are not silently ignored or mutated, LoRA with PEFT."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

import localify
from localify import _variants
from localify.errors import ConfigError
from localify.layers import LocalityMLP, PointwiseLinear

TINY = dict(depth=2, embed_dim=32, num_heads=2, num_classes=10, img_size=32, patch_size=8)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _deit() -> nn.Module:
    torch.manual_seed(0)
    return localify.create_model("deit_tiny_patch16_224", **TINY).eval()


def _out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------------------------------- toy variant
class ChannelScale(localify.LocalifyModule):
    """fc1 followed by a learned per-channel scale (1 at conversion): a toy 'locality' block."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.scale = nn.Parameter(torch.ones(linear.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale

    def get_base_layer(self) -> nn.Linear:
        return self.linear

    def locality_state_keys(self) -> list[str]:
        return ["scale"]

    @property
    def needs_fuse(self) -> bool:
        return not self.fused

    def fuse(self) -> nn.Linear:
        out = copy.deepcopy(self.linear)
        with torch.no_grad():
            out.weight.mul_(self.scale[:, None])
            out.bias.mul_(self.scale)
        return out


class ToyScale(localify.Variant):
    name = "test_toy_scale"
    preserves_function = True

    def build(self, model, record, config, grid):
        return [(p, ChannelScale(model.get_submodule(p))) for p in record.fc1]


@pytest.fixture
def toy_variant():
    v = localify.register_variant(ToyScale())
    yield v
    _variants._REGISTRY.pop(v.name)


def test_a_variant_added_from_a_test_file(toy_variant, tmp_path) -> None:
    assert "test_toy_scale" in localify.variant_names()
    base = _deit()
    model = localify.localify(copy.deepcopy(base), variant="test_toy_scale", layers="1")
    assert isinstance(model.blocks[0].mlp.fc1, ChannelScale) and isinstance(model.blocks[1].mlp.fc1, nn.Linear)
    assert torch.equal(_out(model), _out(base))
    assert localify.conversion_plan(model).sites[0].status == localify.SiteStatus.LOCALIFIED
    with torch.no_grad():
        model.blocks[0].mlp.fc1.scale.uniform_(0.5, 1.5)
    report = localify.mark_trainable(model)
    assert report.trainable_names == ("blocks.0.mlp.fc1.scale",)
    localify.save(model, tmp_path / "toy.safetensors")
    back = localify.load(tmp_path / "toy.safetensors")
    assert isinstance(back.blocks[0].mlp.fc1, ChannelScale) and torch.equal(_out(back), _out(model))
    fused = localify.fuse(copy.deepcopy(model))
    assert type(fused.blocks[0].mlp.fc1) is nn.Linear
    torch.testing.assert_close(_out(fused), _out(model), rtol=1e-5, atol=1e-5)


def test_an_unknown_variant_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="dwconv, residual, localvit"):
        localify.LocalifyConfig(variant="nope")


# --------------------------------------------------------------------------------------------------- contracts
@pytest.mark.parametrize("variant", ["residual", "localvit"])
def test_timm_reparameterize_model_fuses_a_converted_model(variant: str) -> None:
    model = localify.localify(_deit(), variant=variant)
    if variant == "localvit":  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    want = _out(model)
    fused = timm.utils.reparameterize_model(model)  # calls every child's fuse()
    assert all(not m.needs_fuse for m in fused.modules() if isinstance(m, localify.LocalifyModule))
    torch.testing.assert_close(_out(fused), want, rtol=1e-5, atol=1e-5)


def test_config_and_options_together_are_refused() -> None:
    cfg = localify.LocalifyConfig(layers="1")
    with pytest.raises(ConfigError, match="not both"):
        localify.localify(_deit(), layers="2", config=cfg)
    with pytest.raises(ConfigError, match="not both"):
        localify.localify(_deit(), variant="residual", config=cfg)


def test_a_plan_given_by_the_caller_is_not_mutated() -> None:
    base = _deit()
    plan = localify.find_mlps(base, layers="1")
    before = [(s.status, s.selected, s.reason) for s in plan.sites]
    localify.localify(base, layers="all", plan=plan)
    assert [(s.status, s.selected, s.reason) for s in plan.sites] == before
    done = localify.conversion_plan(base)
    assert done is not plan and [s.status for s in done.sites] == [localify.SiteStatus.LOCALIFIED] * 2


@pytest.mark.parametrize("bad", [{"se_hidden": True, "attention": "se"}, {"eca_kernel": True, "attention": "eca"},
                                 {"se_hidden": 2.5, "attention": "se"}, {"kernel_size": True},
                                 {"kernel_size": 3.0}, {"kernel_size": 33}])
def test_booleans_and_floats_are_not_ints(bad: dict) -> None:
    with pytest.raises(ConfigError):
        localify.LocalifyConfig(variant="localvit", **bad)


def test_a_kernel_larger_than_the_grid_is_refused_with_the_sizes() -> None:
    with pytest.raises(localify.NotLocalifiableError, match=r"kernel_size 9 is larger than .* 4x4 grid .* at most 7"):
        localify.localify(_deit(), layers="1", kernel_size=9)
    localify.localify(_deit(), layers="1", kernel_size=7)


# --------------------------------------------------------------------------------------------------- PEFT
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("variant", ["dwconv", "residual"])
def test_lora_on_a_converted_model_trains_merges_and_saves(variant: str, tmp_path) -> None:
    model = localify.localify(_deit(), variant=variant)
    assert all(type(b.mlp) is LocalityMLP for b in model.blocks)  # fc2 sits in the LocalityMLP too
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, localify.LocalityLinear):
                m.dwconv.weight.normal_(0, 0.2)
    targets = localify.lora_targets(model, ["qkv", "fc1", "fc2"])
    assert targets == ["qkv", "fc1.linear", "fc2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    pm.train()
    pm(X).sum().backward()
    grads = [n for n, p in pm.named_parameters() if p.grad is not None]
    assert any("lora_A" in n for n in grads) and any("dwconv" in n for n in grads) is False  # frozen by PEFT
    pm.eval()
    want = _out(pm)
    merged = pm.merge_and_unload()
    assert isinstance(merged.blocks[0].mlp.fc1, localify.LocalityLinear)
    assert type(merged.blocks[0].mlp) is LocalityMLP and type(merged.blocks[0].mlp.fc2) is PointwiseLinear
    torch.testing.assert_close(_out(merged), want, rtol=1e-4, atol=1e-5)
    localify.save(merged, tmp_path / "lora.safetensors")
    torch.testing.assert_close(_out(localify.load(tmp_path / "lora.safetensors")), want, rtol=1e-4, atol=1e-5)


def test_lora_targets_refuses_a_block_without_base_layer() -> None:
    model = localify.localify(_deit(), variant="localvit")
    with pytest.raises(ConfigError, match="replaced the original layer"):
        localify.lora_targets(model, ["mlp"])
    assert localify.lora_targets(model, ["qkv"]) == ["qkv"]
