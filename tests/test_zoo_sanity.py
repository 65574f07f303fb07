"""Sanity checks for the test zoo itself (no localify involved).

Every case must build, run at its input_size (and second_size, with call_kwargs) with batch 2 and
give a finite output; the MLP modules seen by forward pre-hooks must match ``case.expected`` in
number, and their token counts must match the expected layout (prefix + rows*cols + suffix).
"""

from __future__ import annotations

import pytest
import torch

try:
    from tests.zoo import CASES, Case, ExpSite, make_input, output_tensor
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from zoo import CASES, Case, ExpSite, make_input, output_tensor

BATCH = 2
STATUSES = {"convertible", "no_grid", "already_local", "folded"}


def _is_mlp_module(mod: torch.nn.Module) -> bool:
    """Innermost module whose class looks like a transformer MLP (Mlp, GluMlp, SwiGLU, ViTMLP,
    SwinMLP, MlpWithDepthwiseConv, ...; HF Yolos splits it, so its *Intermediate counts)."""
    name = type(mod).__name__.lower()
    looks = "mlp" in name or "swiglu" in name or name.endswith("intermediate")
    return looks and not any("mlp" in type(c).__name__.lower() for c in mod.children())


def _forward(case: Case, model: torch.nn.Module, x: torch.Tensor, **kwargs):
    with torch.no_grad():
        if case.input_name is None:
            return model(x, **kwargs)
        return model(**{case.input_name: x}, **kwargs)


def _mlp_inputs(model: torch.nn.Module, run) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def hook(mod, args, kwargs):
        t = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        shapes.append(tuple(t.shape))

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if _is_mlp_module(m)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return shapes


def _check_site(case_id: str, i: int, site: ExpSite, shape: tuple[int, ...]) -> None:
    where = f"{case_id} MLP #{i} {site} input {shape}"
    if site.status in ("convertible", "already_local"):
        gh, gw = site.grid
        if site.layout == "BHWC":
            assert len(shape) == 4 and shape[:3] == (BATCH, gh, gw), where
        else:
            assert len(shape) == 3 and shape[0] == BATCH, where
            assert shape[1] == site.prefix + gh * gw + site.suffix, where
    elif site.status == "no_grid":
        assert shape[0] == BATCH, where
    elif site.status == "folded":
        assert shape[0] > BATCH and shape[0] % BATCH == 0, where


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_case_runs(case: Case) -> None:
    # well-formed expectations
    assert case.family in ("timm", "hf", "user")
    assert case.expected, case.id
    for site in case.expected:
        assert site.status in STATUSES, site
        assert site.layout in ("BNC", "BHWC"), site
        assert (site.grid is not None) == (site.status in ("convertible", "already_local")), site
        assert site.prefix >= 0 and site.suffix >= 0, site
    assert (case.input_name is None) == (case.family != "hf")

    model = case.build()
    params = sum(p.numel() for p in model.parameters())
    assert params < 1_000_000, f"{case.id} is not tiny: {params} params"

    # input size: forward works, output finite, MLP count and token layouts match
    x = make_input(case, batch=BATCH)
    outs = []
    shapes = _mlp_inputs(model, lambda: outs.append(_forward(case, model, x)))
    out = output_tensor(outs[0])
    assert out.shape[0] == BATCH
    assert torch.isfinite(out).all(), case.id
    assert len(shapes) == len(case.expected), f"{case.id}: hooks saw {len(shapes)} MLPs: {shapes}"
    for i, (site, shape) in enumerate(zip(case.expected, shapes, strict=True)):
        _check_site(case.id, i, site, shape)

    # determinism of build: same seed -> same output
    out2 = output_tensor(_forward(case, case.build(), x))
    torch.testing.assert_close(out, out2)

    # second size (original model must accept it)
    if case.second_size is not None:
        assert case.second_size != case.input_size
        x2 = make_input(case, case.second_size, batch=BATCH)
        out_b = output_tensor(_forward(case, model, x2, **case.call_kwargs))
        assert out_b.shape[0] == BATCH
        assert torch.isfinite(out_b).all(), case.id
    else:
        assert not case.call_kwargs, f"{case.id}: call_kwargs only make sense with a second_size"
