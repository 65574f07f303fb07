"""Saved models: safetensors + JSON recipe, replayed on load; atomic writes; nothing unpickled."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import localify
from localify.errors import CheckpointError, SavedModelError

TINY = dict(depth=2, embed_dim=32, num_heads=2, num_classes=10)


def _model(**opts):
    torch.manual_seed(0)
    m = localify.create_model("deit_tiny", **TINY).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        localify.localify(m, **opts)
    with torch.no_grad():  # make the new weights non-trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("opts", [{}, {"variant": "residual", "layers": "1"},
                                  {"variant": "localvit", "attention": "se", "kernel_size": 5}],
                         ids=["dwconv", "residual-l1", "localvit"])
@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "mdir"])
def test_round_trip(tmp_path, opts, name) -> None:
    model = _model(**opts)
    with torch.no_grad():
        a = model(X)
    out = localify.save(model, tmp_path / name)
    assert out.exists()
    back = localify.load(tmp_path / name)
    assert type(back) is type(model) and not back.training
    with torch.no_grad():
        assert torch.equal(a, back(X))
    recipe = localify.read_recipe(tmp_path / name)
    assert recipe["base"]["name"] == "deit_tiny_patch16_224" and recipe["base"]["kwargs"] == TINY
    assert recipe["config"]["variant"] == opts.get("variant", "dwconv")
    assert set(recipe["versions"]) >= {"localify", "torch", "timm", "transformers"}


def test_fused_round_trip(tmp_path) -> None:
    model = localify.fuse(_model(variant="localvit"))
    with torch.no_grad():
        a = model(X)
    localify.save(model, tmp_path / "f.safetensors")
    with torch.no_grad():
        assert torch.equal(a, localify.load(tmp_path / "f.safetensors")(X))


def test_hf_directory_round_trip(tmp_path) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, num_labels=3)).eval()
    localify.localify(model)
    with torch.no_grad():
        a = model(pixel_values=X).logits
    localify.save(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "localify_recipe.json").exists()
    back = localify.load(tmp_path / "hf")
    assert type(back) is ViTForImageClassification
    with torch.no_grad():
        assert torch.equal(a, back(pixel_values=X).logits)


def test_locality_only_weights_on_top_of_the_base_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    base = localify.create_model("deit_tiny", **TINY).eval()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    localify.localify(base)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, localify.LocalityLinear):
                m.dwconv.weight.normal_()
        a = base(X)
    localify.save(base, tmp_path / "loc.safetensors", weights="locality")
    stored = load_file(str(tmp_path / "loc.safetensors"))
    assert stored and all(".dwconv." in k for k in stored)
    with pytest.raises(SavedModelError, match="base_checkpoint"):
        localify.load(tmp_path / "loc.safetensors")
    back = localify.load(tmp_path / "loc.safetensors", base_checkpoint=tmp_path / "base.safetensors")
    with torch.no_grad():
        assert torch.equal(a, back(X))


def test_existing_output_needs_force(tmp_path) -> None:
    model = _model()
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(SavedModelError, match="force"):
        localify.save(model, target)
    assert target.read_bytes() == b"keep me"
    localify.save(model, target, force=True)
    assert localify.load(target) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_unwritable_or_missing_directory(tmp_path) -> None:
    with pytest.raises(SavedModelError, match="does not exist"):
        localify.save(_model(), tmp_path / "nope" / "m.safetensors")


def test_pickled_file_is_refused(tmp_path) -> None:
    model = _model()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.raises(SavedModelError, match="pickled"):
        localify.load(tmp_path / "m.pt")


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_corrupt_file(tmp_path, content) -> None:
    (tmp_path / "m.safetensors").write_bytes(content)
    with pytest.raises(SavedModelError):
        localify.load(tmp_path / "m.safetensors")


def test_plain_safetensors_without_recipe(tmp_path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(SavedModelError, match="no localify recipe"):
        localify.load(tmp_path / "w.safetensors")


def test_recipe_from_a_newer_version(tmp_path) -> None:
    model = _model()
    localify.save(model, tmp_path / "m.safetensors")
    tensors = load_file(str(tmp_path / "m.safetensors"))
    recipe = localify.read_recipe(tmp_path / "m.safetensors")
    recipe["format_version"] = 99
    recipe["versions"]["localify"] = "9.0.0"
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={"localify_recipe": json.dumps(recipe)})
    with pytest.raises(SavedModelError, match="newer"):
        localify.load(tmp_path / "new.safetensors")


def test_unknown_source_needs_an_explicit_one(tmp_path) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", **TINY)  # kwargs timm does not remember
    localify.localify(model)
    with pytest.raises(SavedModelError, match="source="):
        localify.save(model, tmp_path / "m.safetensors")
    localify.save(model, tmp_path / "m.safetensors",
                  source=localify.ModelSource("timm", "deit_tiny_patch16_224", TINY))
    with torch.no_grad():
        assert torch.equal(model.eval()(X), localify.load(tmp_path / "m.safetensors")(X))


def test_default_timm_model_source_is_inferred(tmp_path) -> None:
    import timm

    model = timm.create_model("deit_tiny_patch16_224").eval()
    localify.localify(model, layers="1")
    localify.save(model, tmp_path / "m.safetensors")
    assert localify.read_recipe(tmp_path / "m.safetensors")["base"]["name"] == "deit_tiny_patch16_224"


def test_checkpoints(tmp_path) -> None:
    torch.manual_seed(0)
    model = localify.create_model("deit_tiny", **TINY)
    state = model.state_dict()
    torch.save(state, tmp_path / "ok.pth")
    fresh = localify.create_model("deit_tiny", **TINY)
    localify.load_checkpoint(fresh, tmp_path / "ok.pth")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    localify.load_checkpoint(fresh, tmp_path / "wrapped.pth")
    other = {k: v for k, v in state.items() if not k.startswith("head")}
    other["extra.weight"] = torch.zeros(1)
    torch.save(other, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing \(head.weight.*unexpected \(extra.weight"):
        localify.load_checkpoint(fresh, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        localify.load_checkpoint(fresh, tmp_path / "nope.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        localify.load_checkpoint(fresh, tmp_path / "corrupt.pth")


# ------------------------------------------------------------- create_model(pretrained=, checkpoint_path=)
TIMM_REPO = "timm/deit_tiny_patch16_224.fb_in1k"  # where timm looks for deit_tiny's weights


def _same_weights(a: torch.nn.Module, b: torch.nn.Module | dict) -> bool:
    sb = b if isinstance(b, dict) else b.state_dict()
    sa = a.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_create_model_pretrained_timm_from_the_offline_cache(offline_hf_cache, tmp_path) -> None:
    """pretrained=True reads timm's weights from the Hugging Face cache, offline, with timm's own rules (a
    different num_classes gets a new head); the remembered source is the architecture only, so a saved model
    rebuilds and loads its own weights."""
    arch = {k: v for k, v in TINY.items() if k != "num_classes"}  # the "released" weights: 1000 classes
    torch.manual_seed(1)
    weights = localify.create_model("deit_tiny", **arch).state_dict()
    offline_hf_cache(TIMM_REPO, weights)
    torch.manual_seed(0)
    model = localify.create_model("deit_tiny", pretrained=True, **arch)
    assert _same_weights(model, weights)
    assert not _same_weights(localify.create_model("deit_tiny", **arch), weights)  # random without it
    src = localify._sources.get_source(model)
    assert (src.kind, src.name, src.kwargs) == ("timm", "deit_tiny_patch16_224", arch)
    localify.localify(model.eval(), layers="1")
    localify.save(model, tmp_path / "m.safetensors")
    assert _same_weights(localify.load(tmp_path / "m.safetensors"), model)

    ten = localify.create_model("deit_tiny", pretrained=True, **TINY)  # fine-tuning set-up: 10 classes
    body = {k: v for k, v in weights.items() if not k.startswith("head.")}
    assert _same_weights(ten, {**body, "head.weight": ten.head.weight, "head.bias": ten.head.bias})
    assert ten.head.out_features == 10


def test_create_model_pretrained_timm_not_in_the_cache(offline_hf_cache) -> None:
    with pytest.raises(CheckpointError, match=r"timm could not load pretrained weights for deit_tiny_patch16_224: .*"
                                              r"HF_HUB_OFFLINE=1, or pass a local file as checkpoint_path"):
        localify.create_model("deit_tiny", pretrained=True, **TINY)
    with pytest.raises(CheckpointError, match=r"for vit_base_patch16_18x2_224: No pretrained weights exist[^;]*$"):
        localify.create_model("vit_base_patch16_18x2_224", pretrained=True, depth=1, embed_dim=32, num_heads=2)


def test_create_model_checkpoint_path(tmp_path) -> None:
    """checkpoint_path= as in timm: a local file loaded after building (and after pretrained weights)."""
    torch.manual_seed(1)
    weights = localify.create_model("deit_tiny", **TINY).state_dict()
    save_file(weights, tmp_path / "w.safetensors")
    assert _same_weights(localify.create_model("deit_tiny", checkpoint_path=tmp_path / "w.safetensors", **TINY),
                         weights)
    with pytest.raises(CheckpointError, match="does not exist"):
        localify.create_model("deit_tiny", checkpoint_path=tmp_path / "nope.pth", **TINY)
    with pytest.raises(CheckpointError, match="does not fit"):
        localify.create_model("deit_tiny", checkpoint_path=tmp_path / "w.safetensors", depth=3)


def test_create_model_pretrained_hugging_face(tmp_path, offline_hf_cache) -> None:
    """hf: with pretrained=True loads the weights saved with the config (a directory or the offline
    cache); without it the weights are random; a config without weights is an error, not random init."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    torch.manual_seed(0)
    ref = ViTModel(cfg).eval()
    ref.save_pretrained(tmp_path / "vit")
    model = localify.create_model(f"hf:{tmp_path / 'vit'}", pretrained=True)
    assert type(model) is ViTModel and _same_weights(model, ref)
    assert not _same_weights(localify.create_model(f"hf:{tmp_path / 'vit'}"), ref)

    offline_hf_cache("someone/tiny-vit", ref.state_dict())  # the weights in the cache, then its config
    snapshot = next((tmp_path / "hf-cache").glob("models--someone--tiny-vit/snapshots/*"))
    cfg.save_pretrained(snapshot)
    assert _same_weights(localify.create_model("hf:someone/tiny-vit", pretrained=True), ref)

    cfg.save_pretrained(tmp_path / "config-only")
    with pytest.raises(CheckpointError, match="config-only holds a config but no weights"):
        localify.create_model(f"hf:{tmp_path / 'config-only'}", pretrained=True)
    (tmp_path / "vit" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"cannot load the weights in .*vit \(no download is tried\)"):
        localify.create_model(f"hf:{tmp_path / 'vit'}", pretrained=True)


def test_create_model_pretrained_hugging_face_new_head(tmp_path) -> None:
    """num_labels overridden: the classifier is re-initialised (timm's rule for num_classes), the backbone
    loaded; a backbone that does not fit (another hidden size) is an error, not a silent re-init."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=5)
    torch.manual_seed(0)
    ref = ViTForImageClassification(cfg)
    ref.save_pretrained(tmp_path / "vit")
    model = localify.create_model(f"hf:{tmp_path / 'vit'}", pretrained=True, num_labels=3)
    assert model.classifier.out_features == 3
    backbone = {k: v for k, v in ref.state_dict().items() if k.startswith("vit.")}
    assert _same_weights(model, {**backbone, "classifier.weight": model.classifier.weight,
                                 "classifier.bias": model.classifier.bias})
    with pytest.raises(CheckpointError, match=r"do not fit the model built from its config: \d+ backbone "
                                              r"tensor\(s\) have other shapes \(vit\."):
        localify.create_model(f"hf:{tmp_path / 'vit'}", pretrained=True, intermediate_size=48)


FACTORY = """
import timm


def vit(pretrained=False, **kw):
    model = timm.create_model("deit_tiny_patch16_224", **kw)
    model.got_pretrained = pretrained
    return model


def plain(depth=12, embed_dim=192, num_heads=3, num_classes=1000):
    return timm.create_model("deit_tiny_patch16_224", depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                             num_classes=num_classes)
"""


def test_create_model_pretrained_factory(tmp_path, monkeypatch) -> None:
    """A factory is called with pretrained=True (not remembered); one that takes no such argument says so."""
    (tmp_path / "my_factories.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = localify.create_model("my_factories:vit", pretrained=True, **TINY)
    assert model.got_pretrained is True
    assert localify._sources.get_source(model).kwargs == TINY
    with pytest.raises(localify.ModelSourceError, match="'my_factories:plain' takes no 'pretrained' argument"):
        localify.create_model("my_factories:plain", pretrained=True, **TINY)


def test_hugging_face_checkpoint_file(tmp_path) -> None:
    """A checkpoint written by save_pretrained (4.x-style key names in transformers 5) loads by file."""
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    src = ViTModel(cfg).eval()
    src.save_pretrained(tmp_path / "hf")
    torch.manual_seed(1)
    model = ViTModel(cfg).eval()
    localify.load_checkpoint(model, tmp_path / "hf" / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(src(pixel_values=X).last_hidden_state, model(pixel_values=X).last_hidden_state)


# --------------------------------------------------------------------------------- recipe schema, temps
def test_recipe_schema_covers_every_saved_field() -> None:
    """The schema table names exactly the fields the dataclasses save: a new field needs a rule."""
    from dataclasses import fields

    from localify import _recipe
    from localify._grid import GridSpec
    from localify._plan import SiteRecord
    from localify._variants import LocalifyConfig

    for spec, cls in ((_recipe.CONFIG, LocalifyConfig), (_recipe.SITE, SiteRecord), (_recipe.GRID, GridSpec),
                      (_recipe.SOURCE, localify.ModelSource)):
        assert set(spec.fields) == {f.name for f in fields(cls)} - {"inferred"}, cls.__name__


@pytest.mark.skipif(os.name != "posix", reason="process liveness by signal 0")
def test_stale_temps_of_dead_saves_are_removed(tmp_path) -> None:
    """Temp directories whose process is gone (or is this process, not saving) go; a live one stays."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "m.safetensors"
    names = {"dead": f".m.safetensors.localify-tmp-{dead_pid}-0badc0de",
             "mine": f".m.safetensors.localify-tmp-{os.getpid()}-00000001",
             "old": f".m.safetensors.localify-tmp-{dead_pid}-0badc0de-old",
             "live": ".m.safetensors.localify-tmp-1-12345678",  # pid 1 is always alive
             "other output": f".n.safetensors.localify-tmp-{dead_pid}-0badc0de"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / ".tmpXYZ").write_bytes(b"partial")  # what safetensors leaves when killed
    localify.save(_model(), out)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([names["live"], names["other output"], "m.safetensors"])
