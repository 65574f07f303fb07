"""The schema of a saved model's recipe: every field, its type and allowed values, in one table.

:func:`validate` checks a recipe read from a file (and the one :func:`localify.save` is about to write) and
raises one :class:`~localify.errors.SavedModelError` naming the first bad field, e.g. ``recipe field
'config.kernel_size': expected an odd int >= 1, got "3"``. Then the fields are checked against each other
(the config's variant against each site's kind, a grid's kind against the fields it needs, ...).

Format history: 1 (localify 0.1): no file manifest. 2: ``weights_sha256`` (a digest of every tensor: name,
dtype, shape and bytes) in every recipe, and ``files`` (name -> size and SHA-256 of every file written) in a
directory's ``localify_recipe.json``. Recipes of format 1 still load (without those checks). A site of either
format may carry ``per_token`` (true: its MLP module runs as a :class:`~localify.layers.LocalityMLP`); a site
without it converts its fc1 only, as every save did before the field, and a save writes it only when true.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._variants import LocalifyConfig, get_variant, variant_names
from .errors import ConfigError, SavedModelError
from .ffn import ACTIVATIONS

__all__ = ["FORMAT", "FORMAT_VERSION", "RECIPE_KEY", "RECIPE_FILE", "WEIGHTS_FILE", "WEIGHT_SETS", "SOURCE_KINDS",
           "validate", "json_text"]

FORMAT = "localify"
FORMAT_VERSION = 2
RECIPE_KEY = "localify_recipe"  # the metadata key of the recipe inside a .safetensors file
RECIPE_FILE = "localify_recipe.json"  # the recipe of a directory save
WEIGHTS_FILE = "model.safetensors"  # the weights of a directory save
WEIGHT_SETS = ("all", "locality", "trainable")
SOURCE_KINDS = ("timm", "hf", "factory")
# timm.create_model arguments that read weights from files or the network: a saved model stores its weights
TIMM_LOADING_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


class _Bad(Exception):
    """One bad field: where it is and what is wrong."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"recipe field '{where}': {what}" if where else f"recipe: {what}")


def _show(v: Any) -> str:
    try:
        text = json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        text = f"{type(v).__name__} {v!r}"
    return text if len(text) <= 60 else text[:57] + "..."


def _join(where: str, name: Any) -> str:
    return f"{where}.{name}" if where else str(name)


# ----------------------------------------------------------------------------------------------- specs
class Spec:
    expected: str

    def check(self, v: Any, where: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Leaf(Spec):
    ok: Callable[[Any], bool]
    expected: str

    def check(self, v: Any, where: str) -> None:
        if not self.ok(v):
            raise _Bad(where, f"expected {self.expected}, got {_show(v)}")


@dataclass(frozen=True)
class Nullable(Spec):
    spec: Spec

    @property
    def expected(self) -> str:  # type: ignore[override]
        return f"null or {self.spec.expected}"

    def check(self, v: Any, where: str) -> None:
        if v is not None:
            try:
                self.spec.check(v, where)
            except _Bad:
                if isinstance(self.spec, Leaf):
                    raise _Bad(where, f"expected {self.expected}, got {_show(v)}") from None
                raise


@dataclass(frozen=True)
class Items(Spec):
    item: Spec
    expected: str
    min_len: int = 0
    max_len: int | None = None

    def check(self, v: Any, where: str) -> None:
        if not isinstance(v, (list, tuple)) or len(v) < self.min_len or (
                self.max_len is not None and len(v) > self.max_len):
            raise _Bad(where, f"expected {self.expected}, got {_show(v)}")
        for i, x in enumerate(v):
            self.item.check(x, f"{where}[{i}]")


@dataclass(frozen=True)
class Obj(Spec):
    """An object with known fields (name -> (spec, required)), or a map of free keys (``values``)."""

    expected: str
    fields: dict[str, tuple[Spec, bool]] = field(default_factory=dict)
    values: Spec | None = None

    def check(self, v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(where, f"expected {self.expected}, got {_show(v)}")
        for name, (spec, required) in self.fields.items():
            if name in v:
                spec.check(v[name], _join(where, name))
            elif required:
                raise _Bad(_join(where, name), f"missing (expected {spec.expected})")
        for k, val in v.items():
            if k in self.fields:
                continue
            if self.values is None:
                raise _Bad(_join(where, k), f"unknown field (known: {', '.join(self.fields)})")
            if not isinstance(k, str):
                raise _Bad(where, f"expected string keys, got {_show(k)}")
            self.values.check(val, _join(where, k))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_json(v: Any) -> bool:
    if v is None or isinstance(v, (str, bool, int)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_is_json(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_json(x) for k, x in v.items())
    return False


def choice(*values: Any) -> Leaf:
    return Leaf(lambda v: (v is None or isinstance(v, str)) and v in values,
                "one of " + ", ".join(json.dumps(x) for x in values))


def int_at_least(lo: int) -> Leaf:
    return Leaf(lambda v: _is_int(v) and v >= lo, f"an int >= {lo}")


def _pair(item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(item(x) for x in v)


def _key_step(v: Any) -> bool:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return False
    kind, k = v
    if kind == "seq":
        return _is_int(k) and k >= 0
    if kind == "map":
        return isinstance(k, str) or _is_int(k)
    return kind == "attr" and isinstance(k, str) and k.isidentifier() and not k.startswith("__")


def _unfold(v: Any) -> bool:
    if not isinstance(v, (list, tuple)) or len(v) != 4 or not all(_pair(_is_int)(p) for p in v):
        return False
    (kernel, dilation, padding, stride) = v
    return min(*kernel, *dilation, *stride) >= 1 and min(padding) >= 0


_MODULE = re.compile(r"[^.\s]+(\.[^.\s]+)*")
STR = Leaf(lambda v: isinstance(v, str), "a string")
NAME = Leaf(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
BOOL = Leaf(lambda v: isinstance(v, bool), "true or false")
INT0, INT1 = int_at_least(0), int_at_least(1)
ODD = Leaf(lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd int >= 1")
SHA256 = Leaf(lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
              "a SHA-256 digest (64 lowercase hex digits)")
JSON_VALUE = Leaf(_is_json, "a JSON value (string, number, true/false, null, list or object)")
MODULE_PATH = Leaf(lambda v: isinstance(v, str) and _MODULE.fullmatch(v) is not None,
                   'a module path such as "blocks.0.mlp.fc1"')
MODULE_OR_ROOT = Leaf(lambda v: isinstance(v, str) and (v == "" or _MODULE.fullmatch(v) is not None),
                      'a module path such as "patch_embed.proj" ("" for the model itself)')
IDENT = Leaf(lambda v: isinstance(v, str) and v.isidentifier(), "a Python identifier")
KEY = Items(Leaf(_key_step, '["seq", INT], ["map", KEY] or ["attr", NAME]'), "a list of key steps")
LAYERS = Leaf(lambda v: isinstance(v, str) or (_is_int(v) and v >= 1)
              or (isinstance(v, (list, tuple)) and all(_is_int(i) and i >= 1 for i in v)),
              'a layer specification ("all", "early", "late", "1-4", a block number or a list of them)')


ACT = Leaf(lambda v: isinstance(v, str) and v.lower() in ACTIVATIONS,
           "an activation name (hswish, relu6, relu, silu, swish, gelu)")
VARIANT = Leaf(lambda v: isinstance(v, str) and v in variant_names(), "a registered variant name (dwconv, residual, "
                                                                      "localvit, or one registered before loading)")

SOURCE = Obj("an object (the base model's source)", {
    "kind": (choice(*SOURCE_KINDS), True),
    "name": (NAME, True),
    "kwargs": (Obj("an object of keyword arguments", values=JSON_VALUE), True),
    "hf_class": (Nullable(IDENT), False),
    "hf_config": (Nullable(Obj("an object (a Hugging Face config)", values=JSON_VALUE)), False),
})

CONFIG = Obj("an object (the conversion options)", {
    "layers": (LAYERS, True),
    "variant": (VARIANT, True),
    "kernel_size": (ODD, True),
    "act": (ACT, True),
    "attention": (choice(None, "se", "eca"), True),
    "se_hidden": (Nullable(INT1), True),
    "se_reduction": (Nullable(INT1), True),
    "eca_kernel": (Nullable(ODD), True),
})

GRID = Obj("an object (where the token grid is read)", {
    "module": (MODULE_OR_ROOT, True),
    "phase": (choice("input", "output"), True),
    "key": (KEY, True),
    "kind": (choice("tensor", "ints", "static", "bhwc"), True),
    "dims": (Leaf(_pair(lambda x: _is_int(x) and x >= 0), "a pair of dimension indices [int, int]"), True),
    "key2": (Nullable(KEY), True),
    "unfold": (Nullable(Leaf(_unfold, "[[kh, kw], [dh, dw], [ph, pw], [sh, sw]] (kernel, dilation, padding, "
                                      "stride: ints, padding >= 0, the others >= 1)")), True),
    "static": (Nullable(Leaf(_pair(lambda x: _is_int(x) and x >= 1), "a grid size [H, W] of ints >= 1")), True),
})

SITE = Obj("an object (one converted MLP)", {
    "block": (INT1, True),
    "kind": (choice("fc1", "mlp"), True),
    "path": (MODULE_OR_ROOT, True),
    "fc1": (Items(MODULE_PATH, "a non-empty list of module paths", min_len=1), True),
    "fc2": (MODULE_PATH, True),
    "prefix": (INT0, True),
    "suffix": (INT0, True),
    "layout": (choice("BNC", "BHWC"), True),
    "grid": (GRID, True),
    "per_token": (BOOL, False),  # absent: false (SiteRecord's default), the fc1-only conversion of earlier saves
})

FILE_ENTRY = Obj("an object {\"size\": INT, \"sha256\": HEX}", {"size": (INT0, True), "sha256": (SHA256, True)})

RECIPE = Obj("a JSON object", {
    "format": (choice(FORMAT), True),
    "format_version": (INT1, True),
    "versions": (Obj("an object of library versions", values=STR), True),
    "base": (SOURCE, True),
    "config": (CONFIG, True),
    "sites": (Items(SITE, "a non-empty list of converted sites", min_len=1), True),
    "fused": (BOOL, False),
    "weights": (choice(*WEIGHT_SETS), False),
    "weights_sha256": (SHA256, False),
    "files": (Obj("an object of file name -> {\"size\", \"sha256\"}", values=FILE_ENTRY), False),
})
DEFAULTS = {"fused": False, "weights": "all"}


# ------------------------------------------------------------------------------------------ validation
def validate(recipe: Any, *, form: str, origin: str,
             hint: str = "the recipe is corrupt or was edited by hand: save the model again with localify.save",
             ) -> dict:
    """Check a recipe field by field and the fields against each other; return it with defaults filled in.

    ``form`` is ``"file"`` (the recipe inside a ``.safetensors`` file's metadata) or ``"dir"`` (a directory's
    ``localify_recipe.json``, which must list every other file of the directory in ``files`` from format 2 on).
    ``origin`` starts every message (the path, or ``cannot save PATH``), ``hint`` ends it.
    """
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        what = f"format {recipe.get('format')!r}" if isinstance(recipe, dict) else f"a JSON {_json_type(recipe)}"
        raise SavedModelError(f"{origin}: not a localify recipe ({what}); it was not written by localify.save")
    ver = recipe.get("format_version")
    if _is_int(ver) and ver > FORMAT_VERSION:
        made = recipe.get("versions")
        made = made.get("localify", "?") if isinstance(made, dict) else "?"
        raise SavedModelError(f"{origin} was saved by localify {made} with recipe format {ver}, newer than this "
                              f"localify reads ({FORMAT_VERSION}); upgrade localify")
    try:
        if not (_is_int(ver) and 1 <= ver <= FORMAT_VERSION):
            raise _Bad("format_version", f"expected an int from 1 to {FORMAT_VERSION}, got {_show(ver)}")
        RECIPE.check(recipe, "")
        _check_together(recipe, form)
    except _Bad as e:
        raise SavedModelError(f"{origin}: {e}; {hint}") from None
    return {**DEFAULTS, **recipe}


def _json_type(v: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(v), "null")


def _check_together(r: dict, form: str) -> None:
    v2 = r["format_version"] >= 2
    if v2 and "weights_sha256" not in r:
        raise _Bad("weights_sha256", f"missing (format {r['format_version']} records a digest of the weights)")
    if form == "dir" and v2 and "files" not in r:
        raise _Bad("files", "missing (a directory save lists every file it wrote)")
    if form == "file" and "files" in r:
        raise _Bad("files", "a single-file save lists no files (only a directory's recipe does)")
    for name in r.get("files", {}):
        if name in (".", "..", RECIPE_FILE) or any(c in name for c in "/\\\0") or name != name.strip():
            raise _Bad(f"files.{name}", "expected a plain file name inside the save directory")
    if "files" in r and WEIGHTS_FILE not in r["files"]:
        raise _Bad("files", f"expected {WEIGHTS_FILE} among the files, got {_show(sorted(r['files']))}")
    _check_source(r["base"])
    _check_config(r["config"])
    _check_sites(r["sites"], r["config"]["variant"])


def _check_source(src: dict) -> None:
    kind = src["kind"]
    if kind == "hf":
        if src.get("hf_class") is None:
            raise _Bad("base.hf_class", "missing (a Hugging Face source names its transformers class)")
        if src.get("hf_config") is None:
            raise _Bad("base.hf_config", "missing (a Hugging Face source stores its config)")
        if src["kwargs"]:
            raise _Bad("base.kwargs", f"expected {{}} for a Hugging Face source (overrides are part of hf_config), "
                                      f"got {_show(src['kwargs'])}")
        return
    for key in ("hf_class", "hf_config"):
        if src.get(key) is not None:
            raise _Bad(f"base.{key}", f"expected null for a {kind} source, got {_show(src[key])}")
    if kind == "factory" and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*",
                                              src["name"]):
        raise _Bad("base.name", f"expected 'module.path:function' for a factory source, got {_show(src['name'])}")
    if kind == "timm":
        for key in TIMM_LOADING_KWARGS:
            if key in src["kwargs"]:
                raise _Bad(f"base.kwargs.{key}", "not allowed: it makes timm read weights, and a saved model "
                                                 "stores its own")


def _check_config(cfg: dict) -> None:
    try:
        LocalifyConfig(**cfg)
    except ConfigError as e:
        raise _Bad("config", str(e)) from None


def _check_sites(sites: list, variant: str) -> None:
    kind = get_variant(variant).site_kind
    seen: dict[str, str] = {}
    for i, s in enumerate(sites):
        at = f"sites[{i}]"
        if s["kind"] != kind:
            raise _Bad(f"{at}.kind", f"expected {json.dumps(kind)} for config.variant {json.dumps(variant)}, "
                                     f"got {_show(s['kind'])}")
        if kind == "mlp" and (len(s["fc1"]) != 1 or not s["path"]):
            raise _Bad(at, f"a {variant} site replaces one MLP module: expected a non-empty path and one fc1")
        grid = s["grid"]
        if (s["layout"] == "BHWC") != (grid["kind"] == "bhwc"):
            want = '"bhwc"' if s["layout"] == "BHWC" else 'not "bhwc"'
            raise _Bad(f"{at}.grid.kind", f"expected {want} for layout {json.dumps(s['layout'])}, got "
                                          f"{_show(grid['kind'])}")
        if s["layout"] == "BHWC" and (s["prefix"] or s["suffix"]):
            raise _Bad(at, "layout BHWC has no prefix or suffix tokens: expected prefix 0 and suffix 0")
        if grid["kind"] == "ints" and grid["key2"] is None:
            raise _Bad(f"{at}.grid.key2", 'missing (a grid of kind "ints" reads two values)')
        if grid["kind"] == "static" and grid["static"] is None:
            raise _Bad(f"{at}.grid.static", 'missing (a grid of kind "static" gives its size)')
        if s.get("per_token"):
            _check_per_token(s, at)
        paths = [(f"{at}.path", s["path"])] if kind == "mlp" or s.get("per_token") else []
        if kind != "mlp":
            paths += [(f"{at}.fc1[{j}]", p) for j, p in enumerate(s["fc1"])]
        for where, p in paths:
            if p in seen:
                raise _Bad(where, f"{json.dumps(p)} is converted twice (also in {seen[p]})")
            seen[p] = where


def _check_per_token(s: dict, at: str) -> None:
    """A per-token site runs its whole MLP module (``path``) on (B, N, C) tokens: it holds fc1 and fc2."""
    if s["kind"] != "fc1":
        raise _Bad(f"{at}.per_token", f'true only for a site of kind "fc1", got kind {_show(s["kind"])}')
    if s["layout"] != "BNC":
        raise _Bad(f"{at}.per_token", f'true only for layout "BNC", got {_show(s["layout"])}')
    inside = s["path"] + "."
    if not s["path"] or not all(p.startswith(inside) for p in [*s["fc1"], s["fc2"]]):
        raise _Bad(f"{at}.per_token", f"true only for a non-empty MLP path holding fc1 and fc2, got path "
                                      f"{_show(s['path'])} with fc1 {_show(s['fc1'])} and fc2 {_show(s['fc2'])}")


def check_json_values(value: Any, where: str) -> None:
    """Raise ``_Bad`` naming the first value that JSON cannot store (an object, NaN, a key that is neither a
    string nor an int: JSON writes int keys as strings, as Hugging Face configs' ``id2label`` expect)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) and not _is_int(k):
                raise _Bad(where, f"expected string keys, got {_show(k)}")
            check_json_values(v, _join(where, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json_values(v, f"{where}[{i}]")
    elif not _is_json(value):
        raise _Bad(where, f"expected a JSON value (string, number, true/false, null, list or object), got "
                          f"{_show(value)}")


def json_text(recipe: dict, origin: str) -> str:
    """The recipe as JSON text; a value JSON cannot hold raises :class:`SavedModelError` naming its field."""
    try:
        check_json_values(recipe, "")
    except _Bad as e:
        raise SavedModelError(f"{origin}: {e}; give JSON values (e.g. act_layer='relu', not nn.ReLU)") from None
    return json.dumps(recipe, allow_nan=False)
