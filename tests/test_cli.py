"""The command line: every command in-process (typer's CliRunner), every error's exit code and one-line message,
round trips convert -> save -> load for each model source, and one run of the installed ``localify`` script.

All models are tiny (timm: depth 2, width 32, 64x64 input; Hugging Face: width 32, 2 layers, 32x32 input).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import localify
from localify.cli import app

TIMM = "deit_tiny_patch16_224"
TIMM_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}
TK = ["--model-kwargs", json.dumps(TIMM_KWARGS)]

USER_MODULE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v)
        return x + self.mlp(self.n2(x))


class TinyViT(nn.Module):
    def __init__(self, dim=32, depth=2, img_size=32, patch=8):
        super().__init__()
        self.img_size = img_size
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for b in self.blocks:
            x = b(x)
        return self.head(x[:, 0])


def tiny_vit(**kw):
    return TinyViT(**kw)
'''


# --------------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _error(result, code: int, *needles: str, stdout: bool = False) -> str:
    """An error: the exit code, exactly one 'error:' line, the last one on stderr, holding every needle; nothing
    on stdout unless the command printed its result first (``stdout=True``)."""
    assert result.exit_code == code, result.output
    if code == 2:  # usage errors: one error line and a hint, no box
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("try '"), result.stderr
        for n in needles:
            assert n in lines[0], result.stderr
        return lines[0]
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    assert "LOCALIFY_DEBUG=1" in errors[0]
    assert bool(result.stdout) == stdout, result.stdout
    return errors[0]


def _base_timm() -> torch.nn.Module:
    torch.manual_seed(1)
    return localify.create_model(TIMM, **TIMM_KWARGS).eval()


def _converted(base: torch.nn.Module, **kw) -> torch.nn.Module:
    return localify.localify(copy.deepcopy(base).eval(), **kw)


def _outputs(model: torch.nn.Module, x: torch.Tensor, hf: bool = False) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x) if hf else model(x)
    return out.last_hidden_state if hf else out


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    base = _base_timm()
    path = tmp_path_factory.mktemp("ckpt") / "deit.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return path, base


@pytest.fixture(scope="module")
def saved_timm(tmp_path_factory, timm_ckpt) -> Path:
    """A conversion written by the command line (blocks 1-2, dwconv), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("saved") / "deit_local.safetensors"
    res = CliRunner().invoke(app, ["convert", TIMM, *TK, "-c", str(timm_ckpt[0]), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def hf_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub
    import transformers

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True, raising=False)
    torch.manual_seed(2)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8)
    path = tmp_path / "tiny-vit"
    transformers.ViTModel(cfg).save_pretrained(path)
    return path


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    name = f"cli_user_vit_{os.getpid()}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name


# --------------------------------------------------------------------------------------------------- help
def test_help_shows_every_command_and_examples(run) -> None:
    res = run("--help")
    assert res.exit_code == 0
    for cmd in ("convert", "inspect", "verify", "bench"):
        assert cmd in res.stdout
        sub = run(cmd, "--help")
        assert sub.exit_code == 0, sub.output
        assert "Examples" in sub.stdout and f"localify {cmd} " in sub.stdout
    assert run("--version").stdout.strip() == f"localify {localify.__version__}"
    assert run().exit_code in (0, 2)  # no command: the help


# --------------------------------------------------------------------------------------------------- inspect
def test_inspect_table_and_prefix_resolution(run) -> None:
    res = run("inspect", "deit_tiny", *TK, "--layers", "2")
    assert res.exit_code == 0, res.output
    assert "deit_tiny -> deit_tiny_patch16_224" in res.stderr
    assert "blocks.0.mlp" in res.stdout and "blocks.1.mlp" in res.stdout
    assert "1+4x4" in res.stdout and "32->128->32" in res.stdout


def test_inspect_json(run) -> None:
    data = _json(run("inspect", TIMM, *TK, "--layers", "2", "--json"))
    assert data["source"] == TIMM and data["num_blocks"] == 2 and data["layers"] == [2]
    s1, s2 = data["sites"]
    assert (s1["block"], s1["path"], s1["selected"], s1["will_convert"]) == (1, "blocks.0.mlp", False, False)
    assert (s2["selected"], s2["will_convert"], s2["status"]) == (True, True, "convertible")
    assert s2["tokens"]["layout"] == "BNC" and s2["tokens"]["prefix"] == 1 and s2["tokens"]["grid"] == [4, 4]
    assert (s2["in_features"], s2["hidden_features"], s2["activation"]) == (32, 128, "gelu")


def test_progress_does_not_break_json(run) -> None:
    # FORCE_COLOR makes rich treat the streams as a terminal: spinners run, on stderr only
    res = run("inspect", TIMM, *TK, "--json", env={"FORCE_COLOR": "1"})
    assert json.loads(res.stdout)["num_blocks"] == 2


# --------------------------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("name", ["m.pt", "m.safetensors", "mdir"])
def test_convert_timm_round_trip(run, tmp_path, timm_ckpt, name) -> None:
    ckpt, base = timm_ckpt
    out = tmp_path / name
    data = _json(run("convert", TIMM, *TK, "-c", ckpt, "--layers", "1", "-o", out, "--json"))
    assert data["converted"] == [1] and data["sites"][1]["result"] == "not selected"
    assert data["parameters"]["after"] - data["parameters"]["before"] == 128 * 9
    assert data["check"]["ok"] is True and data["check"]["max_abs_diff"] <= 1e-5
    assert data["weights"].startswith("checkpoint")
    assert out.is_dir() == (name == "mdir")
    if name == "mdir":
        assert sorted(p.name for p in out.iterdir()) == ["localify_recipe.json", "model.safetensors"]
    loaded = localify.load(out)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_outputs(loaded, x), _outputs(_converted(base, layers="1"), x))
    torch.testing.assert_close(_outputs(loaded, x), _outputs(base, x))
    assert localify.read_recipe(out)["base"]["kwargs"] == TIMM_KWARGS


def test_convert_table(run, tmp_path) -> None:
    res = run("convert", "deit_tiny", *TK, "--layers", "1-2", "--variant", "residual", "-o", tmp_path / "m.pt")
    assert res.exit_code == 0, res.output
    assert "deit_tiny -> deit_tiny_patch16_224" in res.stderr
    for text in ("converted", "parameters", "output check", "ok", "random init", "saved"):
        assert text in res.stdout


def test_convert_localvit_says_not_preserving(run, tmp_path) -> None:
    data = _json(run("convert", TIMM, *TK, "--variant", "localvit", "--attention", "se", "-o", tmp_path / "m.pt",
                     "--json"))
    assert data["check"]["preserving"] is False and data["check"]["ok"] is None
    assert data["config"]["attention"] == "se"


def test_convert_hf_directory_round_trip(run, tmp_path, hf_dir) -> None:
    import transformers

    out = tmp_path / "hf-local"
    data = _json(run("convert", f"hf:{hf_dir}", "-o", out, "--json"))
    assert data["weights"].startswith("Hugging Face weights") and data["converted"] == [1, 2]
    assert {"config.json", "model.safetensors", "localify_recipe.json"} <= {p.name for p in out.iterdir()}
    loaded = localify.load(out)
    pretrained = transformers.ViTModel.from_pretrained(hf_dir, local_files_only=True).eval()
    x = torch.randn(2, 3, 32, 32)
    # the directory's own weights were converted, not a random init
    assert torch.equal(_outputs(loaded, x, hf=True), _outputs(_converted(pretrained), x, hf=True))
    torch.testing.assert_close(_outputs(loaded, x, hf=True), _outputs(pretrained, x, hf=True))


def test_convert_pretrained_timm_from_the_offline_cache(run, tmp_path, offline_hf_cache, timm_ckpt) -> None:
    """--pretrained: timm's weights from the Hugging Face cache (offline); --checkpoint goes on top."""
    torch.manual_seed(5)
    released = localify.create_model(TIMM, **TIMM_KWARGS).eval()
    offline_hf_cache("timm/deit_tiny_patch16_224.fb_in1k", released.state_dict())
    data = _json(run("convert", "deit_tiny", *TK, "--pretrained", "-o", tmp_path / "a.pt", "--json"))
    assert data["weights"] == "pretrained weights" and data["check"]["ok"] is True
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_outputs(localify.load(tmp_path / "a.pt"), x), _outputs(_converted(released), x))
    ckpt, base = timm_ckpt
    data = _json(run("convert", TIMM, *TK, "--pretrained", "-c", ckpt, "-o", tmp_path / "b.pt", "--json"))
    assert data["weights"] == f"pretrained weights, then checkpoint {ckpt}"
    assert torch.equal(_outputs(localify.load(tmp_path / "b.pt"), x), _outputs(_converted(base), x))


def test_pretrained_errors(run, tmp_path, offline_hf_cache, hf_dir, saved_timm) -> None:
    """Weights asked for but not found are an error (nothing written); an hf: directory without weights is
    random init without --pretrained, an error with it."""
    _error(run("convert", TIMM, *TK, "--pretrained", "-o", tmp_path / "m.pt"), 1,
           "timm could not load pretrained weights for deit_tiny_patch16_224", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "m.pt").exists()
    (hf_dir / "model.safetensors").unlink()
    data = _json(run("convert", f"hf:{hf_dir}", "-o", tmp_path / "r.pt", "--json"))
    assert data["weights"] == f"random init ({hf_dir} holds a config but no weights)"
    _error(run("inspect", f"hf:{hf_dir}", "--pretrained"), 1, "holds a config but no weights")
    _error(run("verify", saved_timm, "--pretrained"), 2, "--pretrained", "not to a saved file")
    _error(run("export", saved_timm, "--pretrained", "-o", tmp_path / "m.onnx"), 2, "--pretrained",
           "not to a saved file")


def test_saved_file_refuses_conversion_options(run, tmp_path, saved_timm) -> None:
    """A saved file's recipe holds its conversion: export and verify refuse conversion options with it (before,
    export silently ignored them) and write nothing."""
    for cmd in ("export", "verify"):
        out = ["-o", tmp_path / "m.onnx"] if cmd == "export" else []
        _error(run(cmd, saved_timm, "--layers", "1", "--kernel-size", "5", *out), 2, "--layers, --kernel-size",
               "not to a saved file")
    assert not (tmp_path / "m.onnx").exists()


def test_convert_factory_round_trip(run, tmp_path, user_module) -> None:
    import importlib

    torch.manual_seed(3)
    base = importlib.import_module(user_module).tiny_vit(dim=16).eval()
    torch.save(base.state_dict(), tmp_path / "user.pth")  # a plain state dict, read with weights_only=True
    data = _json(run("convert", f"{user_module}:tiny_vit", "--model-kwargs", '{"dim": 16}', "-c", "user.pth",
                     "-o", "user_local.pt", "--json"))
    assert data["source"] == f"{user_module}:tiny_vit" and data["converted"] == [1, 2]
    loaded = localify.load(tmp_path / "user_local.pt", trust_code=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_outputs(loaded, x), _outputs(_converted(base), x))
    torch.testing.assert_close(_outputs(loaded, x), _outputs(base, x))


# --------------------------------------------------------------------------------------------------- verify
def test_verify_model_two_sizes_and_export(run, user_module) -> None:
    data = _json(run("verify", f"{user_module}:tiny_vit", "--json"))
    assert data["ok"] is True and data["kind"] == "model"
    checks = [(c["check"], tuple(c["input_size"])) for c in data["checks"]]
    assert checks[0] == ("outputs vs original", (32, 32)) and checks[-1] == ("export vs eager", (32, 32))
    assert len(checks) == 3  # a second, non-square size: the model accepts other sizes
    assert all(c["ok"] and c["max_abs_diff"] <= 1e-5 for c in data["checks"])


def test_verify_saved_file(run, saved_timm) -> None:
    res = run("verify", saved_timm)
    assert res.exit_code == 0, res.output
    assert "outputs vs original" in res.stdout and "export vs eager" in res.stdout
    data = _json(run("verify", saved_timm, "--json", "--no-export"))
    assert data["ok"] and data["kind"] == "saved" and data["converted_blocks"] == [1, 2]


def test_verify_reports_trained_locality_weights(run, tmp_path, saved_timm) -> None:
    model = localify.load(saved_timm)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.dwconv.weight.add_(0.5)  # as if trained
    path = localify.save(model, tmp_path / "trained.safetensors")
    _error(run("verify", path, "--no-export"), 1, "verification failed", "outputs vs original", stdout=True)


def test_verify_partial_weights_need_the_base_checkpoint(run, tmp_path, timm_ckpt) -> None:
    out = tmp_path / "loc.safetensors"
    assert run("convert", TIMM, *TK, "-c", timm_ckpt[0], "--weights", "locality", "-o", out, "-q").exit_code == 0
    _error(run("verify", out, "--no-export"), 1, "stores only the locality weights")
    assert _json(run("verify", out, "-c", timm_ckpt[0], "--no-export", "--json"))["ok"]


# --------------------------------------------------------------------------------------------------- bench
def test_bench_json_and_table(run) -> None:
    threads = torch.get_num_threads()
    data = _json(run("bench", TIMM, *TK, "--batch", "1", "--batch", "2", "--rounds", "1", "--threads", "1",
                     "--json"))
    assert [r["batch"] for r in data["results"]] == [1, 2] and data["threads"] == 1
    assert all(r["original_ms"] > 0 and r["converted_ms"] > 0 and r["ratio"] > 0 for r in data["results"])
    assert torch.get_num_threads() == threads
    res = run("bench", TIMM, *TK, "--rounds", "1", "--layers", "1", "--threads", "1")
    assert res.exit_code == 0 and "ratio" in res.stdout and "original ms" in res.stdout


# --------------------------------------------------------------------------------------------------- errors
def test_unknown_model(run) -> None:
    _error(run("inspect", "no_such_model_xyz"), 1, "unknown model 'no_such_model_xyz'", "hf:PATH", "module:factory")
    _error(run("inspect", "deit_tiny_patch16_225"), 1, "unknown model", "closest: deit_tiny_patch16_224")


def test_ambiguous_name(run) -> None:
    _error(run("convert", "vit", "-o", "x.pt"), 1, "'vit' is ambiguous", "timm models (vit_", "give the full name")


def test_non_vit_model(run) -> None:
    _error(run("inspect", "resnet10t"), 1, "no transformer MLP found in ResNet")


def test_bad_layers(run, tmp_path) -> None:
    _error(run("inspect", TIMM, *TK, "--layers", "1-"), 2, "'--layers'", "cannot parse", "1-4")
    _error(run("convert", TIMM, "--layers", "3-1", "-o", tmp_path / "m.pt"), 2, "reversed")
    _error(run("inspect", TIMM, *TK, "--layers", "1-9"), 1, "valid block numbers are 1-2")


def test_checkpoint_errors(run, tmp_path) -> None:
    _error(run("inspect", TIMM, *TK, "-c", tmp_path / "none.pth"), 1, "does not exist")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint at all")
    _error(run("inspect", TIMM, *TK, "-c", tmp_path / "bad.pth"), 1, "cannot load checkpoint", "weights_only")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _error(run("inspect", TIMM, *TK, "-c", tmp_path / "bad.safetensors"), 1, "not a readable safetensors")
    torch.save({"blocks.0.mlp.fc1.weight": torch.zeros(128, 32), "extra.weight": torch.zeros(1)},
               tmp_path / "mismatch.pth")
    _error(run("inspect", TIMM, *TK, "-c", tmp_path / "mismatch.pth"), 1, "missing (cls_token", "unexpected (extra.weight)")


def test_output_errors_and_force(run, tmp_path, timm_ckpt) -> None:
    _error(run("convert", TIMM, *TK, "-o", tmp_path / "nodir" / "m.pt"), 1, "does not exist")
    _error(run("convert", TIMM, *TK, "-o", tmp_path / "m.pth"), 1, "unknown output kind", "model.safetensors or model.pt")
    out = tmp_path / "m.pt"
    out.write_bytes(b"keep me")
    _error(run("convert", TIMM, *TK, "-o", out), 1, "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert run("convert", TIMM, *TK, "-o", out, "--force", "-q").exit_code == 0
    assert localify.read_recipe(out)["format"] == "localify"


def test_failing_convert_writes_nothing(run, tmp_path, monkeypatch) -> None:
    _error(run("convert", TIMM, *TK, "--layers", "5", "-o", tmp_path / "m.pt"), 1, "valid block numbers")
    assert list(tmp_path.iterdir()) == []

    import localify._io as io

    def broken(tensors, path, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_write_safetensors", broken)
    _error(run("convert", TIMM, *TK, "-o", tmp_path / "m.safetensors"), 1, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_usage_errors(run, tmp_path) -> None:
    _error(run("inspect", TIMM, "--model-kwargs", "{bad"), 2, "--model-kwargs", "not valid JSON")
    _error(run("inspect", TIMM, "--model-kwargs", "[1]"), 2, "must be a JSON object")
    _error(run("convert", TIMM, "--act", "relu", "-o", tmp_path / "m.pt"), 2, "--variant localvit")
    _error(run("convert", TIMM, "--variant", "nope", "-o", tmp_path / "m.pt"), 2, "nope")
    _error(run("convert", TIMM), 2, "--output")
    _error(run("verify", "m.safetensors", "--layers", "2"), 2, "apply to a MODEL source")
    assert list(tmp_path.iterdir()) == []


def test_saved_file_errors(run, tmp_path, saved_timm) -> None:
    _error(run("verify", tmp_path / "missing.pt"), 1, "does not exist")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    _error(run("verify", tmp_path / "garbage.pt"), 1, "not a safetensors file")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled.pt")
    _error(run("verify", tmp_path / "pickled.pt"), 1, "pickled", "never unpickles")

    with safe_open(str(saved_timm), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["localify_recipe"])
    recipe["format_version"] = 99
    save_file(load_file(str(saved_timm)), str(tmp_path / "newer.safetensors"),
              metadata={**meta, "localify_recipe": json.dumps(recipe)})
    _error(run("verify", tmp_path / "newer.safetensors"), 1, "recipe format 99", "upgrade localify")


def test_paths_given_as_model_names(run, hf_dir) -> None:
    _error(run("inspect", hf_dir), 1, f"hf:{hf_dir}")
    _error(run("verify", hf_dir), 1, "not a model saved by localify")


def test_debug_shows_traceback(run) -> None:
    res = run("inspect", "no_such_model_xyz", env={"LOCALIFY_DEBUG": "1"})
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.stderr and "ModelSourceError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: unknown model")


# --------------------------------------------------------------------------------------------------- install
@pytest.mark.slow
def test_installed_script(tmp_path) -> None:
    """The console script of the installed package (editable in development; CI also checks a plain install
    with scripts/check_install.sh)."""
    script = shutil.which("localify", path=str(Path(sys.executable).parent)) or shutil.which("localify")
    cmd = [script] if script else [sys.executable, "-m", "localify.cli"]
    env = {**os.environ, "COLUMNS": "100"}
    res = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert all(c in res.stdout for c in ("convert", "inspect", "verify", "bench"))
    res = subprocess.run([*cmd, "inspect", "deit_tiny", *TK, "--json"], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["source"] == TIMM


# --------------------------------------------------------------------------------------------------- export
@pytest.mark.slow
def test_export_onnx_from_source_and_saved_file(run, tmp_path, saved_timm) -> None:
    """`localify export` writes an ONNX file that onnxruntime checked; a saved file exports too."""
    pytest.importorskip("onnxruntime")
    kwargs = json.dumps({**TIMM_KWARGS, "dynamic_img_size": True})
    data = _json(run("export", TIMM, "--model-kwargs", kwargs, "--layers", "1", "-o", tmp_path / "a.onnx", "--json"))
    assert Path(data["path"]).exists() and data["dynamic_batch"] and data["dynamic_hw"]
    assert data["max_abs_err"] is not None and data["max_abs_err"] < 1e-4
    data = _json(run("export", saved_timm, "-o", tmp_path / "b.onnx", "--json", "--dynamic", "batch"))
    assert data["dynamic_batch"] and not data["dynamic_hw"]
    _error(run("export", saved_timm, "-o", tmp_path / "b.onnx"), 1, "already exists")
    _error(run("export", saved_timm, "-o", tmp_path / "b.txt"), 1, ".onnx")
