"""Core conversion, table-driven over the zoo of tiny random-init ViTs (timm, Hugging Face, user-written).

For every case: the MLP sites, layouts, grids and prefix/suffix counts found; exact preservation of the
output at the traced size and at a second size where the original accepts one, in eval mode and in train
mode with dropout off; and gradient flow into the new depth-wise weights.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import localify
from localify import LocalityLinear

try:
    from tests.zoo import CASES, Case, make_input, output_tensor
except ImportError:  # pytest rootdir mode
    from zoo import CASES, Case, make_input, output_tensor

IDS = [c.id for c in CASES]


def _call(model: nn.Module, case: Case, size=None, **kw) -> torch.Tensor:
    x = make_input(case, size)
    out = model(**{case.input_name: x}, **kw) if case.input_name else model(x, **kw)
    return output_tensor(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def _example(case: Case):
    """timm and HF models get their example input from their own config; user models are given one."""
    if case.family != "user":
        return None
    return make_input(case)


def _convert(model: nn.Module, case: Case | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return localify.localify(model, example_inputs=_example(case) if case else None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_find_mlps_layouts(case: Case) -> None:
    """Sites, statuses, grids, prefix and suffix counts match the architecture, in execution order."""
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = localify.find_mlps(model, _example(case))  # timm / HF: example input from the model's config
    assert plan.input_size == case.input_size
    got = [
        (s.status, s.tokens.grid if s.tokens else None, s.tokens.prefix if s.tokens else 0,
         s.tokens.suffix if s.tokens else 0, s.tokens.layout if s.tokens else "BNC")
        for s in plan.sites
    ]
    exp = [(e.status, e.grid if e.status in ("convertible", "already_local") else None, e.prefix, e.suffix,
            e.layout) for e in case.expected]
    assert got == exp, str(plan)
    for s in plan.sites:
        if s.convertible:
            assert s.tokens.source is not None
            assert s.reason == ""
        else:
            assert s.reason, f"site {s.path} is {s.status} without a reason"
    # blocks are numbered 1..n in execution order
    assert [s.block for s in plan.sites] == sorted(s.block for s in plan.sites)
    assert plan.num_blocks == len({s.block_path for s in plan.sites})
    # a dry run changes nothing
    assert not any(isinstance(m, LocalityLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", [c for c in CASES if any(e.status == "convertible" for e in c.expected)], ids=lambda c: c.id)
def test_conversion_preserves_function(case: Case) -> None:
    model = case.build()
    ref = copy.deepcopy(model)
    out = _convert(model, case)
    assert out is model and type(out) is type(ref)
    n_conv = sum(e.status == "convertible" for e in case.expected)
    wrapped = [m for m in model.modules() if isinstance(m, LocalityLinear)]
    assert len(wrapped) >= n_conv
    with torch.no_grad():
        assert _rel(_call(ref, case), _call(model, case)) <= 1e-5
        if case.second_size is not None:
            a = _call(ref, case, case.second_size, **case.call_kwargs)
            b = _call(model, case, case.second_size, **case.call_kwargs)
            assert a.shape == b.shape
            assert _rel(a, b) <= 1e-5
    # train mode with dropout off
    for m in (ref, model):
        m.train()
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
    torch.manual_seed(0)
    a = _call(ref, case)
    torch.manual_seed(0)
    b = _call(model, case)
    assert _rel(a.detach(), b.detach()) <= 1e-5
    # gradients reach the new depth-wise weights
    loss = sum(p.float().pow(2).mean() for p in _all_tokens(model, case))
    loss.backward()
    grads = [m.dwconv.weight.grad for m in wrapped]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() > 0 for g in grads) >= max(1, len(grads) - 2)


def _all_tokens(model: nn.Module, case: Case) -> list[torch.Tensor]:
    """Outputs that depend on every token (so even the last block's grid tokens get a gradient)."""
    x = make_input(case)
    if case.input_name:
        out = model(**{case.input_name: x}, output_hidden_states=True)
        hs = getattr(out, "hidden_states", None) or ()
        return [output_tensor(out), *[h for h in hs if isinstance(h, torch.Tensor)]]
    if hasattr(model, "forward_features"):
        feats = model.forward_features(x)
        return [feats] if isinstance(feats, torch.Tensor) else list(feats)
    return [output_tensor(model(x))]


def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


@pytest.mark.parametrize(
    "spec,expected_blocks",
    [("all", [1, 2]), ("1", [1]), ("2", [2]), ("1-2", [1, 2]), ("early", [1]), ("late", [2]), ([2], [2])],
)
def test_layer_selection(spec, expected_blocks) -> None:
    case = _case("deit_tiny_patch16_224")
    model = case.build()
    _ = localify.localify(model, layers=spec)
    converted = sorted(int(n.split(".")[1]) + 1 for n, m in model.named_modules() if isinstance(m, LocalityLinear))
    assert converted == expected_blocks


def test_timm_api_kept() -> None:
    case = _case("vit_dynamic_img_size")
    model = _convert(case.build())
    x = make_input(case, (160, 256))
    feats = model.forward_features(x)
    assert feats.shape[0] == 2
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    assert model.blocks[0].mlp.fc1.weight.shape == (model.blocks[0].mlp.fc1.out_features, 32)


def test_hf_api_kept(tmp_path) -> None:
    case = _case("hf_vit")
    model = _convert(case.build())
    assert model.config.hidden_size == 32
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


def test_converting_twice_is_refused_and_changes_nothing() -> None:
    case = _case("deit_tiny_patch16_224")
    model = _convert(case.build())
    keys = list(model.state_dict())
    plan = localify.find_mlps(model)
    assert all(s.status == "localified" for s in plan.sites)
    with pytest.raises(localify.AlreadyLocalifiedError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(model)
    assert list(model.state_dict()) == keys


def test_convert_remaining_layers_later() -> None:
    case = _case("deit_tiny_patch16_224")
    model = case.build()
    ref = copy.deepcopy(model)
    localify.localify(model, layers="1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(model, layers="all")  # block 1 is skipped (already converted), block 2 converted
    assert sum(isinstance(m, LocalityLinear) for m in model.modules()) == 2
    assert not any(isinstance(m.linear, LocalityLinear) for m in model.modules() if isinstance(m, LocalityLinear))
    with torch.no_grad():
        assert _rel(_call(ref, case), _call(model, case)) <= 1e-5


def test_no_grid_blocks_are_skipped_with_warning() -> None:
    case = _case("cait_xxs24_224")
    model = case.build()
    with pytest.warns(UserWarning, match="no_grid"):
        localify.localify(model)
    with pytest.raises(localify.NotLocalifiableError, match="single token"):
        localify.localify(case.build(), layers="3-4")


def test_already_local_blocks_are_not_converted() -> None:
    case = _case("pvt_v2_b0")
    with pytest.raises(localify.NotLocalifiableError, match="depth-wise"):
        localify.localify(case.build())


def test_kernel_size_and_residual_variant() -> None:
    case = _case("hf_swin")
    model = case.build()
    ref = copy.deepcopy(model)
    localify.localify(model, kernel_size=5, variant="residual")
    lin = next(m for m in model.modules() if isinstance(m, LocalityLinear))
    assert lin.dwconv.kernel_size == (5, 5) and lin.residual
    with torch.no_grad():
        assert _rel(_call(ref, case), _call(model, case)) <= 1e-5
        assert _rel(_call(ref, case, case.second_size), _call(model, case, case.second_size)) <= 1e-5


def test_grid_follows_input_and_is_not_square() -> None:
    """The depth-wise conv really runs on a (rows, cols) grid that follows the input."""
    case = _case("vit_dynamic_img_size")
    model = _convert(case.build())
    lin = model.blocks[0].mlp.fc1
    seen = []
    h = lin.dwconv.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    with torch.no_grad():
        _call(model, case, (160, 256))
        _call(model, case, (224, 224))
    h.remove()
    assert seen == [(10, 16), (14, 14)]


def test_example_inputs_override() -> None:
    case = _case("vit_dynamic_img_size")
    plan = localify.find_mlps(case.build(), torch.randn(2, 3, 160, 256))
    assert plan.input_size == (160, 256)
    assert all(s.tokens.grid == (10, 16) for s in plan.sites)
