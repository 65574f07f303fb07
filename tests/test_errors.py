"""Typed errors: what was looked for, what was found, what to do; a failure leaves the model untouched."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import localify
from localify import parse_layers
from localify.errors import LocalifyError


def _deit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", embed_dim=32, depth=3, num_heads=2, num_classes=10)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and \
        [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        ("all", 12, list(range(1, 13))),
        (None, 3, [1, 2, 3]),
        ("1-4", 12, [1, 2, 3, 4]),
        ("1,3,5-6", 12, [1, 3, 5, 6]),
        (" 2 - 3 , 7 ", 12, [2, 3, 7]),
        ("early", 12, [1, 2, 3, 4]),
        ("late", 12, [9, 10, 11, 12]),
        ("early", 26, list(range(1, 10))),
        ("early", 2, [1]),
        (3, 12, [3]),
        ([4, 2, 2], 12, [2, 4]),
    ],
)
def test_parse_layers(spec, n, expected) -> None:
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec", ["0", "13", "1-20", "4-2", "a", "1,,2", "1-", "first", [0], True, 2.5])
def test_parse_layers_rejects(spec) -> None:
    with pytest.raises(localify.LayerSpecError, match="1-12"):
        parse_layers(spec, 12)


def test_bad_layers_leave_model_untouched() -> None:
    model = _deit()
    ref = copy.deepcopy(model)
    with pytest.raises(localify.LayerSpecError, match="valid block numbers are 1-3"):
        localify.localify(model, layers="2-9")
    assert _same(model, ref)


@pytest.mark.parametrize("kwargs", [{"variant": "nope"}, {"kernel_size": 4}, {"kernel_size": 0}])
def test_bad_options(kwargs) -> None:
    model = _deit()
    ref = copy.deepcopy(model)
    with pytest.raises(localify.ConfigError):
        localify.localify(model, **kwargs)
    assert _same(model, ref)


def test_resnet_has_no_mlp() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    ref = copy.deepcopy(model)
    with pytest.raises(localify.NoMLPFoundError) as err:
        localify.localify(model, example_inputs=torch.randn(2, 3, 64, 64))
    msg = str(err.value)
    assert "ResNet" in msg and "searched" in msg and "linear" in msg and "found none" in msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, LocalifyError)
    assert _same(model, ref)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.img_size = 32

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)[..., :8]
        if t.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            t = t * 2
        return self.fc2(torch.relu(self.fc1(t)))


def test_untraceable_model_gets_tracer_reason() -> None:
    model = _Untraceable()
    with pytest.raises(localify.TraceError, match="example_inputs"):
        localify.find_mlps(model)


def test_model_without_known_input_size() -> None:
    class NoSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(localify.ExampleInputError, match="example_inputs"):
        localify.find_mlps(NoSize())


class _TokensIn(nn.Module):
    """An MLP fed with tokens straight from the input: there is no grid to find."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, tokens):
        return self.fc2(torch.nn.functional.gelu(self.fc1(tokens)))


def test_tokens_without_grid_are_reported_not_converted() -> None:
    model = _TokensIn()
    plan = localify.find_mlps(model, torch.randn(2, 10, 8))
    assert [s.status for s in plan.sites] == ["no_grid"]
    assert "model input" in plan.sites[0].reason
    ref = copy.deepcopy(model)
    with pytest.raises(localify.NotLocalifiableError, match="model input"):
        localify.localify(model, example_inputs=torch.randn(2, 10, 8))
    assert _same(model, ref)
