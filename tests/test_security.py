"""Saved files are safe to load and exactly what was saved.

Loading never imports or calls code a file names (unless ``trust_code=True``); timm names and Hugging Face
classes resolve only to what those libraries register; a save directory holds exactly the files its recipe
lists; every recipe field is validated; a source localify guessed is proven to rebuild the same function
before anything is written; FIFOs are refused instead of blocking; and one rule decides output paths.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import localify
from localify._paths import check_output_path
from localify.errors import CheckpointError, SavedModelError, UntrustedCodeError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(depth=1, embed_dim=32, num_heads=2, num_classes=10)
X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _convert(model: torch.nn.Module, **opts) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return localify.localify(model.eval(), **opts)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A converted tiny DeiT saved as one file (read-only for the tests: they write edited copies)."""
    torch.manual_seed(0)
    model = _convert(localify.create_model("deit_tiny", **TINY))
    path = tmp_path_factory.mktemp("saved") / "m.safetensors"
    localify.save(model, path)
    return path


def _recipe(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["localify_recipe"])


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of a one-file save whose recipe went through ``edit`` (which changes it or returns a new one)."""
    recipe = _recipe(src)
    new = edit(recipe)
    save_file(load_file(str(src)), str(dst), metadata={"localify_recipe": json.dumps(recipe if new is None else new)})
    return dst


# ------------------------------------------------------------------------------------ code named by files
def _malicious(recipe: dict, marker: Path) -> None:
    recipe["base"] = {"kind": "factory", "name": "subprocess:call", "kwargs": {"args": ["touch", str(marker)]},
                      "hf_class": None, "hf_config": None}


def test_factory_in_a_file_is_not_called(tmp_path, saved) -> None:
    marker = tmp_path / "PWNED"
    path = _edited(saved, tmp_path / "evil.safetensors", lambda r: _malicious(r, marker))
    assert localify.read_recipe(path)["base"]["name"] == "subprocess:call"  # reading the recipe runs nothing
    with pytest.raises(UntrustedCodeError, match=r"module 'subprocess' and calling its function 'call'.*"
                                                 r"trust_code=True \(--trust-code\)"):
        localify.load(path)
    assert not marker.exists()


def test_factory_in_a_directory_is_not_called(tmp_path, saved) -> None:
    marker = tmp_path / "PWNED"
    model = localify.load(saved)
    localify.save(model, tmp_path / "d")
    recipe_file = tmp_path / "d" / "localify_recipe.json"
    recipe = json.loads(recipe_file.read_text())
    _malicious(recipe, marker)
    recipe_file.write_text(json.dumps(recipe))  # the recipe is not in the manifest: the file list still holds
    with pytest.raises(UntrustedCodeError, match="'subprocess'.*'call'.*trust_code"):
        localify.load(tmp_path / "d")
    assert not marker.exists()
    assert isinstance(UntrustedCodeError("x"), SavedModelError)  # callers catching SavedModelError still do


def test_trusted_factory_save_loads(tmp_path) -> None:
    """A model built by a user factory (tests/user_models.py) needs trust_code=True, then loads exactly."""
    torch.manual_seed(0)
    model = _convert(localify.create_model("user_models:T2TViT", img_size=64, depth=1))
    localify.save(model, tmp_path / "t2t.safetensors")
    with pytest.raises(UntrustedCodeError, match="'user_models'.*'T2TViT'.*img_size=64"):
        localify.load(tmp_path / "t2t.safetensors")
    back = localify.load(tmp_path / "t2t.safetensors", trust_code=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.fixture(scope="module")
def saved_hf(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = _convert(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8)))
    path = tmp_path_factory.mktemp("hf") / "vit.safetensors"
    localify.save(model, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["base"]["hf_config"].update(auto_map={"AutoModel": "evil_repo--modeling.Evil"}),
     r"remote code \(hf_config\.auto_map\)"),
    (lambda r: r["base"]["hf_config"].update(trust_remote_code=True), r"remote code \(hf_config\.trust_remote_code\)"),
    (lambda r: r["base"].update(hf_class="PretrainedConfig"), "'PretrainedConfig', which is not a model class"),
    (lambda r: r["base"].update(hf_class="EvilModel"), "'EvilModel', which is not a model class of transformers"),
    (lambda r: r["base"].update(hf_class="ViTForImageClassification") or r["base"]["hf_config"].update(
        model_type="bert"), "model_type 'bert'"),
], ids=["auto_map", "trust_remote_code", "config-class", "unknown-class", "model_type"])
def test_hugging_face_sources_resolve_to_transformers_classes_only(tmp_path, saved_hf, edit, message) -> None:
    assert localify.load(saved_hf) is not None
    path = _edited(saved_hf, tmp_path / "edited.safetensors", edit)
    with pytest.raises(SavedModelError, match=message):
        localify.load(path, trust_code=True)  # trust_code is about factories: remote code stays refused


def test_unknown_timm_name_is_refused(tmp_path, saved) -> None:
    path = _edited(saved, tmp_path / "x.safetensors", lambda r: r["base"].update(name="evil_vit_patch16"))
    with pytest.raises(SavedModelError, match="'evil_vit_patch16', which is not a timm model"):
        localify.load(path)


def test_source_kwargs_must_be_json_values(tmp_path) -> None:
    model = _convert(localify.create_model("deit_tiny", **TINY))
    src = localify.ModelSource("timm", "deit_tiny_patch16_224", {**TINY, "act_layer": torch.nn.GELU})
    with pytest.raises(SavedModelError, match=r"recipe field 'base\.kwargs\.act_layer': expected a JSON value"):
        localify.save(model, tmp_path / "m.safetensors", source=src)
    src = localify.ModelSource("timm", "deit_tiny_patch16_224", {**TINY, "checkpoint_path": "/etc/passwd"})
    with pytest.raises(SavedModelError, match=r"'base\.kwargs\.checkpoint_path': not allowed"):
        localify.save(model, tmp_path / "m.safetensors", source=src)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ exactly what was saved
@pytest.fixture
def saved_dir(tmp_path, saved) -> Path:
    localify.save(localify.load(saved), tmp_path / "d")
    return tmp_path / "d"


def test_directory_lists_its_files(saved_dir) -> None:
    recipe = json.loads((saved_dir / "localify_recipe.json").read_text())
    assert set(recipe["files"]) == {p.name for p in saved_dir.iterdir()} - {"localify_recipe.json"}
    for name, entry in recipe["files"].items():
        import hashlib

        data = (saved_dir / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_stray_weights_in_a_directory(saved_dir) -> None:
    """The issue's case: a backup file sorting after model.safetensors used to replace the head silently."""
    model = localify.load(saved_dir)
    save_file({"head.weight": torch.zeros_like(model.head.weight), "head.bias": torch.zeros_like(model.head.bias)},
              str(saved_dir / "z_head_backup.safetensors"))
    with pytest.raises(SavedModelError, match="holds z_head_backup.safetensors, which the save did not write"):
        localify.load(saved_dir)
    (saved_dir / "z_head_backup.safetensors").unlink()
    (saved_dir / "notes.txt").write_text("hi")
    with pytest.raises(SavedModelError, match="notes.txt"):
        localify.read_recipe(saved_dir)


def test_missing_file_in_a_directory(saved_dir) -> None:
    (saved_dir / "model.safetensors").unlink()
    with pytest.raises(SavedModelError, match="lacks model.safetensors, which the save wrote"):
        localify.load(saved_dir)


@pytest.mark.parametrize("how", ["same-size", "truncated"])
def test_altered_file_in_a_directory(saved_dir, how) -> None:
    f = saved_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    if how == "same-size":
        data[-3] ^= 0x40  # one bit of one weight: still a valid safetensors file
        f.write_bytes(bytes(data))
        with pytest.raises(SavedModelError, match=r"model\.safetensors is not the file the save wrote"):
            localify.load(saved_dir)
    else:
        f.write_bytes(bytes(data[:-4]))
        with pytest.raises(SavedModelError, match=r"model\.safetensors has \d+ bytes but the save wrote \d+"):
            localify.load(saved_dir)


def test_altered_weights_in_a_file(tmp_path, saved) -> None:
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    with pytest.raises(SavedModelError, match="the weights are not those the save wrote"):
        localify.load(tmp_path / "m.safetensors")


def test_format_1_saves_still_load(tmp_path, saved, saved_dir) -> None:
    """Files written before the manifest (format 1) load; a format-2 directory without one does not."""
    def v1(r):
        r["format_version"] = 1
        del r["weights_sha256"]

    ref = localify.load(saved)
    with torch.no_grad():
        want = ref(X)
        assert torch.equal(localify.load(_edited(saved, tmp_path / "v1.safetensors", v1))(X), want)
    recipe_file = saved_dir / "localify_recipe.json"
    recipe = json.loads(recipe_file.read_text())
    del recipe["files"]
    recipe_file.write_text(json.dumps(recipe))
    with pytest.raises(SavedModelError, match="recipe field 'files': missing"):
        localify.load(saved_dir)
    v1(recipe)
    recipe_file.write_text(json.dumps(recipe))
    with torch.no_grad():
        assert torch.equal(localify.load(saved_dir)(X), want)
    save_file({"head.weight": torch.zeros(10, 32)}, str(saved_dir / "z.safetensors"))
    with pytest.raises(SavedModelError, match="holds z.safetensors"):  # format 1: only the files it could write
        localify.load(saved_dir)


# ------------------------------------------------------------------------------------ recipe validation
def _site_copy(r):
    r["sites"].append(dict(r["sites"][0]))


def _fc1_site_copy(r):
    r["sites"][0].pop("per_token")  # as saved before the field: fc1 only
    _site_copy(r)


MALFORMED = [  # (id, edit, the field the error names and what it says)
    ("list", lambda r: [r], r"not a localify recipe \(a JSON list\)"),
    ("no-config", lambda r: r.pop("config") and None, r"recipe field 'config': missing"),
    ("versions-str", lambda r: r.update(versions="0.1"), r"'versions': expected an object of library versions"),
    ("unknown-config-key", lambda r: r["config"].update(dilation=2), r"'config\.dilation': unknown field"),
    ("unknown-top-key", lambda r: r.update(extra=1), r"'extra': unknown field"),
    ("version-str", lambda r: r.update(format_version="1"), r"'format_version': expected an int from 1 to 2, got \"1\""),
    ("version-0", lambda r: r.update(format_version=0), r"'format_version': expected an int from 1 to 2, got 0"),
    ("kernel-str", lambda r: r["config"].update(kernel_size="3"),
     r"recipe field 'config\.kernel_size': expected an odd int >= 1, got \"3\""),
    ("kernel-even", lambda r: r["config"].update(kernel_size=4), r"'config\.kernel_size': expected an odd int"),
    ("variant", lambda r: r["config"].update(variant="conv"), r"'config\.variant': expected a registered variant name"),
    ("variant-vs-sites", lambda r: r["config"].update(variant="localvit"),
     r"'sites\[0\]\.kind': expected \"mlp\" for config\.variant \"localvit\", got \"fc1\""),
    ("act-for-dwconv", lambda r: r["config"].update(act="relu"), r"'config': options \['act'\] apply to"),
    ("no-sites", lambda r: r.update(sites=[]), r"'sites': expected a non-empty list"),
    ("block-0", lambda r: r["sites"][0].update(block=0), r"'sites\[0\]\.block': expected an int >= 1, got 0"),
    ("prefix-neg", lambda r: r["sites"][0].update(prefix=-1), r"'sites\[0\]\.prefix': expected an int >= 0"),
    ("fc1-empty", lambda r: r["sites"][0].update(fc1=[]), r"'sites\[0\]\.fc1': expected a non-empty list"),
    ("twice", _site_copy, r"'sites\[1\]\.path': \"blocks\.0\.mlp\" is converted twice"),
    ("twice-fc1", _fc1_site_copy, r"'sites\[1\]\.fc1\[0\]': \"blocks\.0\.mlp\.fc1\" is converted twice"),
    ("per-token-str", lambda r: r["sites"][0].update(per_token="yes"),
     r"'sites\[0\]\.per_token': expected true or false, got \"yes\""),
    ("per-token-root", lambda r: r["sites"][0].update(path=""),
     r"'sites\[0\]\.per_token': true only for a non-empty MLP path holding fc1 and fc2, got path \"\""),
    ("per-token-outside", lambda r: r["sites"][0].update(fc2="blocks.0.attn.proj"),
     r"'sites\[0\]\.per_token': true only for a non-empty MLP path .* fc2 \"blocks\.0\.attn\.proj\""),
    ("per-token-mlp-kind", lambda r: (r["config"].update(variant="localvit"), r["sites"][0].update(kind="mlp"))
     and None, r"'sites\[0\]\.per_token': true only for a site of kind \"fc1\", got kind \"mlp\""),
    ("per-token-bhwc", lambda r: r["sites"][0].update(layout="BHWC", prefix=0, grid={**r["sites"][0]["grid"],
                                                                                     "kind": "bhwc"}),
     r"'sites\[0\]\.per_token': true only for layout \"BNC\", got \"BHWC\""),
    ("grid-phase", lambda r: r["sites"][0]["grid"].update(phase="middle"), r"'sites\[0\]\.grid\.phase'"),
    ("grid-static", lambda r: r["sites"][0]["grid"].update(kind="static"), r"'sites\[0\]\.grid\.static': missing"),
    ("grid-key", lambda r: r["sites"][0]["grid"].update(key=[["attr", "__class__"]]),
     r"'sites\[0\]\.grid\.key\[0\]': expected \[\"seq\", INT\]"),
    ("grid-dims", lambda r: r["sites"][0]["grid"].update(dims=[2]), r"'sites\[0\]\.grid\.dims'"),
    ("layout", lambda r: r["sites"][0].update(layout="BCHW"), r"'sites\[0\]\.layout': expected one of"),
    ("source-kind", lambda r: r["base"].update(kind="pickle"), r"'base\.kind': expected one of \"timm\""),
    ("source-kwargs", lambda r: r["base"].update(kwargs="depth=1"), r"'base\.kwargs': expected an object"),
    ("factory-name", lambda r: r["base"].update(kind="factory", name="os.system"),
     r"'base\.name': expected 'module\.path:function'"),
    ("weights", lambda r: r.update(weights="some"), r"'weights': expected one of \"all\""),
    ("fused", lambda r: r.update(fused="yes"), r"'fused': expected true or false, got \"yes\""),
    ("no-digest", lambda r: r.pop("weights_sha256") and None, r"'weights_sha256': missing"),
]


@pytest.mark.parametrize("edit, message", [pytest.param(e, m, id=i) for i, e, m in MALFORMED])
def test_malformed_recipes(tmp_path, saved, edit, message) -> None:
    path = _edited(saved, tmp_path / "bad.safetensors", edit)
    with pytest.raises(SavedModelError, match=message):
        localify.read_recipe(path)
    with pytest.raises(SavedModelError, match=message):
        localify.load(path)


def test_newer_format_says_upgrade(tmp_path, saved) -> None:
    path = _edited(saved, tmp_path / "new.safetensors", lambda r: r.update(format_version=3))
    with pytest.raises(SavedModelError, match=r"recipe format 3, newer than this localify reads \(2\); upgrade"):
        localify.load(path)


# ------------------------------------------------------------------------- a guessed source is proven
def test_inferred_source_that_rebuilds_another_function(tmp_path) -> None:
    """The issue's case (on timm's tiny test_vit): options that change no parameter shape. The inferred
    plain name would rebuild a GELU / class-token model; save refuses it and writes nothing; with source= it
    saves and loads the same function."""
    import timm

    opts = dict(act_layer="relu", global_pool="avg", fc_norm=False)
    torch.manual_seed(0)
    model = _convert(timm.create_model("test_vit", **opts))
    rng = torch.get_rng_state()
    with pytest.raises(SavedModelError, match=r"source test_vit was inferred from its parameter shapes.*"
                                              r"computes another function.*pass source="):
        localify.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    assert torch.equal(torch.get_rng_state(), rng)  # the probe input did not move the caller's random state
    localify.save(model, tmp_path / "m.safetensors", source=localify.ModelSource("timm", "test_vit", opts))
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(localify.load(tmp_path / "m.safetensors")(x), model(x))

    plain = _convert(timm.create_model("test_vit"))  # default options: the inferred source is right
    src = localify._sources.get_source(plain)
    assert src.inferred and "inferred" not in src.to_dict()
    localify.save(plain, tmp_path / "plain.safetensors")
    with torch.no_grad():
        assert torch.equal(localify.load(tmp_path / "plain.safetensors")(x), plain(x))


# ------------------------------------------------------------------------------------------ FIFOs
def _within(seconds: float, fn, *args, unblock: Path | None = None, **kwargs):
    """Run ``fn`` in a thread; fail (instead of hanging) if it has not returned after ``seconds``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if unblock is not None:  # open the FIFO's other end so the stuck reader returns
            fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"{fn.__name__} blocked for {seconds} s (it opened a FIFO)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_are_refused(tmp_path, saved) -> None:
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(SavedModelError, match="is a FIFO, not a regular file"):
        _within(20, localify.load, fifo, unblock=fifo)
    model = localify.create_model("deit_tiny", **TINY)
    for name in ("fifo.safetensors", "fifo.pth"):
        if not (tmp_path / name).exists():
            os.mkfifo(tmp_path / name)
        with pytest.raises(CheckpointError, match="checkpoint .* is a FIFO, not a regular file"):
            _within(20, localify.load_checkpoint, model, tmp_path / name, unblock=tmp_path / name)

    d = tmp_path / "d"
    localify.save(localify.load(saved), d)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(SavedModelError, match=r"model\.safetensors is a FIFO"):
        _within(20, localify.load, d, unblock=d / "model.safetensors")


# ---------------------------------------------------------------------------------------- output paths
def _setup_paths(tmp: Path) -> None:
    (tmp / "file").write_text("x")
    (tmp / "old.safetensors").write_text("x")
    (tmp / "dirlike.safetensors").mkdir()
    (tmp / "plainfile").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "other").mkdir()
    (tmp / "other" / "photo.jpg").write_text("x")
    (tmp / "saved").mkdir()
    (tmp / "saved" / "localify_recipe.json").write_text("{}")
    (tmp / "run.v2").mkdir()


PATHS = [  # (path, force, None if accepted else what the error says)
    ("", False, "the output path is empty"),
    (".", False, "names a directory, not an output"),
    ("file/x.safetensors", False, "file is a file, not a directory"),
    ("file/sub/x.safetensors", False, "file is a file, not a directory"),
    ("nodir/x.safetensors", False, "directory .*nodir does not exist"),
    ("a.txt", False, "unknown output kind '.txt'"),
    ("a.pth", True, "unknown output kind '.pth'"),
    ("old.safetensors", False, "already exists; pass force=True"),
    ("old.safetensors", True, None),
    ("dirlike.safetensors", True, "is a directory, not a regular file"),
    ("plainfile", True, "is a regular file, not a directory"),
    ("other", True, "does not hold a model saved by localify .* even with force"),
    ("saved", False, "already exists"),
    ("saved", True, None),
    ("empty", True, None),
    ("run.v2", True, None),  # an existing directory keeps its dotted name
    ("new.safetensors", False, None),
    ("new.pt", False, None),
    ("newdir", False, None),
]


@pytest.mark.parametrize("name, force, error", PATHS)
def test_output_path_rule(tmp_path, name, force, error) -> None:
    _setup_paths(tmp_path)
    path = "" if name == "" else ("." if name == "." else tmp_path / name)
    kw = dict(suffixes=(".safetensors", ".pt"), directory="localify_recipe.json", force=force)
    if error is None:
        assert check_output_path(path, **kw) == Path(path)
    else:
        with pytest.raises(SavedModelError, match=error):
            check_output_path(path, **kw)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_directory(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(SavedModelError, match="is not writable"):
            check_output_path(ro / "m.safetensors", suffixes=(".safetensors",))
    finally:
        ro.chmod(0o755)


def test_save_uses_the_path_rule(tmp_path, saved) -> None:
    model = localify.load(saved)
    with pytest.raises(SavedModelError, match="unknown output kind '.txt'"):
        localify.save(model, tmp_path / "a.txt")
    with pytest.raises(SavedModelError, match="the output path is empty"):
        localify.save(model, "")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SavedModelError, match="f is a file, not a directory"):
        localify.save(model, tmp_path / "f" / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_rebuild_check_runs_once_per_conversion(tmp_path, monkeypatch) -> None:
    """Checkpoints of one model (a training loop) prove the inferred source once; a new conversion (fused)
    is proven again."""
    import timm

    import localify._io as io

    calls = []
    real = io._check_rebuilds
    monkeypatch.setattr(io, "_check_rebuilds", lambda *a: calls.append(a[3].name) or real(*a))
    torch.manual_seed(0)
    model = _convert(timm.create_model("test_vit"))
    localify.save(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        model.head.weight.add_(1.0)  # training changes weights, not the function the source rebuilds
    localify.save(model, tmp_path / "b.safetensors")
    localify.fuse(model)
    localify.save(model, tmp_path / "c.safetensors")
    assert calls == ["a.safetensors", "c.safetensors"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_in_a_hugging_face_directory(tmp_path) -> None:
    os.mkfifo(tmp_path / "config.json")  # AutoConfig would wait for a writer forever
    with pytest.raises(localify.ModelSourceError, match=r"config\.json is a FIFO"):
        _within(20, localify.create_model, f"hf:{tmp_path}", unblock=tmp_path / "config.json")
