"""examples/reproduce.py: the data split, the paired models, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import reproduce as R  # noqa: E402


def test_fixed_stratified_split():
    cfg = R.StudyConfig()
    a, b = R.load_data(cfg), R.load_data(cfg)
    assert a["x_train"].shape == (1397, 1, 16, 16) and a["x_val"].shape == (400, 1, 16, 16)
    assert torch.equal(a["x_val"], b["x_val"]) and torch.equal(a["y_train"], b["y_train"])
    counts = torch.bincount(a["y_val"], minlength=10)
    assert counts.min() >= 38 and counts.max() <= 42  # stratified: about 40 per class
    part = R.load_data(R.StudyConfig(train_fraction=0.25))
    assert abs(len(part["y_train"]) - 349) <= 1 and torch.equal(part["y_val"], a["y_val"])  # same val images


def test_random_shift():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(R.random_shift(x, 0, -1.0, g), x)
    y = R.random_shift(x, 2, -1.0, g)
    assert y.shape == x.shape
    # every output pixel is the fill value or an input pixel of the same image
    for i in range(2):
        vals = set(y[i].flatten().tolist()) - {-1.0}
        assert vals <= set(x[i].flatten().tolist())


def test_settings_are_paired_and_converted():
    cfg = R.StudyConfig()
    base = R.build_model("baseline", 3, cfg)
    for setting in ("localvit-early", "localvit-all-k1"):
        m = R.build_model(setting, 3, cfg)
        assert torch.equal(m.patch_embed.proj.weight, base.patch_embed.proj.weight)  # same initial ViT
        assert torch.equal(m.blocks[5].attn.qkv.weight, base.blocks[5].attn.qkv.weight)
        assert type(m.blocks[0].mlp).__name__ == "LocalViTFFN"
        assert torch.equal(m.blocks[0].mlp.fc1.weight, base.blocks[0].mlp.fc1.weight)
    early = R.build_model("localvit-early", 3, cfg)
    assert [type(b.mlp).__name__ == "LocalViTFFN" for b in early.blocks] == [True, True] + [False] * 4
    late = R.build_model("localvit-late", 3, cfg)
    assert [type(b.mlp).__name__ == "LocalViTFFN" for b in late.blocks] == [False] * 4 + [True, True]
    assert R.build_model("localvit-all-k1", 3, cfg).blocks[0].mlp.kernel_size == 1


def test_locality_only_freezes_everything_else():
    m = R.build_model("localvit-early", 0, R.StudyConfig())
    n = R.locality_only(m)
    assert n > 0
    trainable = [name for name, p in m.named_parameters() if p.requires_grad]
    assert any("dwconv" in name for name in trainable)
    assert not any(name.startswith(("patch_embed", "head", "blocks.5")) for name in trainable)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "study"
    results = R.main(["--quick", "--epochs", "1", "--seeds", "0", "1", "--train-fraction", "0.2",
                      "--settings", "baseline", "localvit-early", "--out", str(out),
                      "--threads", str(torch.get_num_threads())])
    for name in ("results.json", "results.md", "curves.png", "placement.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["epochs"] == 1 and saved["config"]["seeds"] == [0, 1]
    assert [len(r["val_acc"]) for r in saved["runs"]["localvit-early"]] == [1, 1]
    assert results["runs"]["baseline"][0]["train_loss"] == saved["runs"]["baseline"][0]["train_loss"]

    # the table parses: one row per setting, mean ± std columns that match the json
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert "final val acc" in header and "final train loss" in header
    assert [r.split("|")[1].strip() for r in body] == ["baseline", "localvit-early"]
    cols = [c.strip() for c in header.strip("|").split("|")]
    acc_col = cols.index("final val acc (%)")
    for line, setting in zip(body, ["baseline", "localvit-early"]):
        cell = line.strip("|").split("|")[acc_col].strip()
        m = re.fullmatch(r"(-?\d+\.\d+) ± (\d+\.\d+)", cell)
        assert m, cell
        accs = [r["val_acc"][-1] for r in saved["runs"][setting]]
        assert float(m.group(1)) == pytest.approx(sum(accs) / 2, abs=0.01)
    assert "±" in body[1].split("|")[5]  # the paired difference to the baseline
