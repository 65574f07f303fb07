"""The registry sweep's fixed CI subset: distinct token layouts across timm and Hugging Face.

Each case runs ``run_one`` from ``scripts/sweep.py`` (the function the full sweep runs per model: build a tiny
random-init model, ``find_mlps``, ``localify`` on a copy, compare outputs) in this process. Every case must
finish without a crash and without an output mismatch; the layouts that are right today are pinned; the
layouts issue 12 says are wrong today (Hiera's mask-unit order, NesT's blocks, ConvNeXt-V2's GRN) assert the
correct result (they failed before the grid proof and the matcher changes).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep.py"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("localify_sweep", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("localify_sweep", mod)
    spec.loader.exec_module(mod)
    return mod


sweep = _load_sweep()

# (library, name) -> expected (status, [(site status, tokens), ...] in execution order) as of today
EXPECTED: dict[tuple[str, str], tuple[str, list[tuple[str, str | None]]]] = {
    # class + distillation token in front of a 14x14 grid
    ("timm", "deit_tiny_distilled_patch16_224"): ("converted", [("convertible", "2+14x14")] * 2),
    # class + 4 register tokens, 14 px patches at DINOv2's 518 px
    ("timm", "vit_small_patch14_reg4_dinov2"): ("converted", [("convertible", "5+37x37")] * 2),
    # windowed attention: the MLP sees the whole (un-windowed) map of each stage
    ("timm", "swin_tiny_patch4_window7_224"): ("converted", [("convertible", g)
                                                            for g in ("56x56", "28x28", "14x14", "7x7")]),
    # rotary embeddings + SwiGLU
    ("timm", "eva02_tiny_patch14_224"): ("converted", [("convertible", "1+16x16")] * 2),
    # class token added late: the class-attention MLP sees one token
    ("timm", "cait_xxs24_224"): ("converted", [("convertible", "14x14")] * 2 + [("no_grid", None)]),
    # PVT-v2's MLPs already hold a depth-wise conv
    ("timm", "pvt_v2_b0"): ("refused", [("already_local", "56x56"), ("already_local", "28x28"),
                                        ("already_local", "14x14"), ("already_local", "7x7")]),
    # MaxViT: block and grid attention MLPs on (B, H, W, C) maps
    ("timm", "test_maxvit"): ("converted", [("convertible", g) for g in ("40x40", "40x40", "20x20", "20x20",
                                                                         "10x10", "10x10", "5x5", "5x5")]),
    # ConvNeXt with Linear MLPs on channels-last maps
    ("timm", "test_convnext"): ("converted", [("convertible", g)
                                              for g in ("40x40", "20x20", "10x10", "5x5")]),
    ("hf", "vit"): ("converted", [("convertible", "1+14x14")] * 2),
    ("hf", "swin"): ("converted", [("convertible", g) for g in ("56x56", "28x28", "14x14", "7x7")]),
    ("hf", "dinov2"): ("converted", [("convertible", "1+16x16")] * 2),
    # CLIP vision: QuickGELU MLPs, a pre-layernorm, 32 px patches
    ("hf", "clip_vision_model"): ("converted", [("convertible", "1+7x7")] * 2),
}

# cases issue 12 says are wrong today
WRONG_TODAY = [("timm", "hiera_tiny_224"), ("hf", "hiera"), ("timm", "nest_tiny"), ("hf", "convnextv2")]

_cache: dict[tuple[str, str], dict] = {}


def _result(library: str, name: str) -> dict:
    if (library, name) not in _cache:
        spec = sweep.timm_spec(name) if library == "timm" else sweep.hf_spec(name)
        assert spec is not None and not spec.get("skip"), (library, name)
        _cache[(library, name)] = sweep.run_one(spec, timeout=None)
    return _cache[(library, name)]


def _describe(res: dict) -> str:
    err = res.get("error") or {}
    return f"{res['status']}: {err.get('type')}: {err.get('message')} at {err.get('where')}"


ALL = list(EXPECTED) + WRONG_TODAY


@pytest.mark.parametrize("case", ALL, ids=[f"{lib}-{name}" for lib, name in ALL])
def test_no_crash_no_mismatch(case: tuple[str, str]) -> None:
    res = _result(*case)
    assert res["status"] not in ("crashed", "mismatch", "build_failed", "timeout"), _describe(res)
    if res["status"] == "converted":
        assert res["max_rel_err"] <= sweep.TOLERANCE
        # what find_mlps called convertible is what localify converted (one LocalityLinear per fc1)
        n_fc1 = sum(len(s["fc1"]) for s in res["sites"] if s["status"] == "convertible")
        assert res["n_locality_linear"] == n_fc1


@pytest.mark.parametrize("case", list(EXPECTED), ids=[f"{lib}-{name}" for lib, name in EXPECTED])
def test_expected_layout(case: tuple[str, str]) -> None:
    res = _result(*case)
    status, sites = EXPECTED[case]
    assert res["status"] == status, _describe(res)
    assert [(s["status"], s["tokens"]) for s in res["sites"]] == sites
    assert not [s for s in res["sites"] if s["suspicious"]]


def _correct_grids(res: dict) -> list[str]:
    """What is wrong with ``res`` by issue 12's standard: every converted site is a proven raster grid."""
    wrong = [f"{s['path']}: {s['tokens']} ({s['suspicious']})" for s in res["sites"]
             if s["status"] == "convertible" and s["suspicious"]]
    wrong += [f"{s['path']}: {s['tokens']} converted without a proof" for s in res["sites"]
              if s["status"] == "convertible" and not s["proof_ok"]]
    return wrong


@pytest.mark.parametrize("library", ["timm", "hf"])
def test_hiera_mask_units_are_not_a_grid(library: str) -> None:
    res = _result(library, "hiera_tiny_224" if library == "timm" else "hiera")
    assert not _correct_grids(res)
    # the last stage's tokens are a raster 7x7 map: convertible
    last = res["sites"][-1]
    assert (last["status"], last["tokens"]) == ("convertible", "7x7"), last


def test_nest_blocks_are_not_a_grid() -> None:
    res = _result("timm", "nest_tiny")
    assert not _correct_grids(res)
    # the top level holds one block of 14x14 tokens as a (B, 1, 196, C) tensor: refused, not guessed at
    last = res["sites"][-1]
    assert last["status"] == "no_grid" and "one row of tokens" in last["reason"], last


def test_convnextv2_grn_mlp_found() -> None:
    res = _result("hf", "convnextv2")
    assert res["status"] == "converted", _describe(res)
    assert [(s["status"], s["tokens"]) for s in res["sites"]] == [
        ("convertible", g) for g in ("56x56", "28x28", "14x14", "7x7")]
    assert not _correct_grids(res)


@pytest.mark.parametrize("case", list(EXPECTED), ids=[f"{lib}-{name}" for lib, name in EXPECTED])
def test_converted_sites_are_proven(case: tuple[str, str]) -> None:
    res = _result(*case)
    if res["status"] != "converted":
        pytest.skip("nothing converted")
    assert not _correct_grids(res)


def test_suspicious_layout() -> None:
    assert sweep.suspicious_layout((14, 14), (224, 224)) == ""
    assert sweep.suspicious_layout((16, 12), (256, 192)) == ""
    assert "aspect" in sweep.suspicious_layout((64, 49), (224, 224))
    assert "aspect" in sweep.suspicious_layout((196, 2), (224, 224))
    assert "whole-patch" in sweep.suspicious_layout((15, 15), (224, 224))


def test_output_error() -> None:
    import torch

    a = {"logits": torch.tensor([[1.0, -4.0]]), "hidden": (torch.zeros(2, 3),)}
    b = {"logits": torch.tensor([[1.0, -4.0 + 4e-4]]), "hidden": (torch.zeros(2, 3),)}
    assert sweep.output_error(a, a) == 0.0
    assert sweep.output_error(a, b) == pytest.approx(1e-4, rel=1e-3)  # 4e-4 / max(1, 4)
    assert sweep.output_error(a, {"logits": a["logits"]}) == float("inf")  # a tensor went missing
