"""Registry sweep: run localify on every timm architecture family and every Hugging Face vision model type.

For each model (tiny, random init, nothing downloaded) the sweep runs ``localify.find_mlps``, then
``localify.localify`` on a copy with default options, then an output check (eval mode, no grad: the largest
difference of any output tensor, relative to ``max(1, max|original|)``, at most 1e-4 on the input localify
traced with). Every model runs in a worker process with a time limit. The result is a markdown table (one row
per model, counts on top) and a JSON file of the raw results.

    OMP_NUM_THREADS=1 python scripts/sweep.py --all --out sweep.md --json sweep.json
    python scripts/sweep.py --timm --family 'swin|hiera' --limit 5

Statuses: ``converted`` (and the check passed), ``mismatch`` (converted, outputs changed), ``refused``
(every MLP found was left alone, with the reasons), ``untraceable`` (``TraceError``), ``no_mlp``
(``NoMLPFoundError``), ``example_input`` (``ExampleInputError``), ``localify_error`` (another
``LocalifyError``), ``build_failed`` (the library itself could not build the model: not localify's fault),
``too_large`` (still over the parameter limit after shrinking), ``crashed`` (any other exception from localify
or from running the converted model: a bug), ``timeout``, ``died`` (the worker process died), ``skipped``.
A converted site counts as *unproven* unless localify attached a grid proof that holds (``site.proof``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep_models as tables  # noqa: E402

TOLERANCE = 1e-4
BATCH = 2
MAX_PARAMS = 150_000_000  # a model still larger than this after shrinking is not built (memory on 2 cores)
_LIMIT = f"over the sweep's limit of {MAX_PARAMS // 1_000_000}M"
STATUSES = ("converted", "mismatch", "refused", "untraceable", "no_mlp", "example_input", "localify_error",
            "crashed", "timeout", "died", "build_failed", "too_large", "skipped")
TIMM_SHRINK_ATTEMPTS = ("shrunk", "shallow", "default")
HF_ATTEMPTS = ("tiny", "shallow", "default")
LOCALIFY_DIR = None  # set lazily: the directory of the localify package, to find its frames in tracebacks


class SweepTimeout(BaseException):
    """Raised in a worker by SIGALRM; a BaseException so that no ``except Exception`` in a library eats it."""


# ============================================================================================ model lists
def _timm_family(name: str) -> str:
    from timm.models._registry import model_entrypoint

    return model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _size_rank(name: str) -> tuple:
    """Sort key: smallest-sounding variant first, then larger patches, lower resolution, shorter name."""
    tokens = re.split(r"[_\-]", name.lower())
    rank = len(tables.SIZE_WORDS) + 0.5
    for i, words in enumerate(tables.SIZE_WORDS):
        if any(t in words for t in tokens):
            rank = min(rank, i)
    for big, r in (("base", 8), ("medium", 8), ("large", 9), ("huge", 10), ("giant", 11), ("gigantic", 12)):
        if big in tokens:
            rank = max(rank, r)
    nums = [int(m) for m in re.findall(r"(\d{3,4})", name)]
    res = max(nums) if nums else 224
    patch = re.search(r"patch(\d+)", name)
    return (rank, res, -(int(patch.group(1)) if patch else 16), len(name), name)


def timm_specs(family_re: str | None = None) -> list[dict]:
    """One small variant per timm family (module under ``timm.models``), plus the curated extra variants."""
    import timm

    by_family: dict[str, list[str]] = {}
    for name in timm.list_models():
        by_family.setdefault(_timm_family(name), []).append(name)
    specs = []
    for family in sorted(by_family):
        names = [tables.TIMM_VARIANT.get(family) or min(by_family[family], key=_size_rank)]
        names += [n for n in tables.TIMM_EXTRA if n in by_family[family] and n not in names]
        specs += [timm_spec(name) for name in names]
    return [s for s in specs if not family_re or re.search(family_re, s["family"] + " " + s["name"])]


_VISION_SUBCONFIGS = ("vision_config", "image_config", "vision_encoder_config", "vision_tower_config")
_IMAGE_MAPPINGS = ("IMAGE", "VISION", "VIDEO", "DEPTH", "OBJECT", "SEMANTIC", "INSTANCE", "UNIVERSAL",
                   "KEYPOINT", "MASK_GEN", "BACKBONE", "MATTING", "NORMAL_ESTIMATION", "POSE")


def _hf_image_types() -> set[str]:
    from transformers.models.auto import modeling_auto as ma

    types: set[str] = set()
    for n in dir(ma):
        if n.endswith("MAPPING_NAMES") and any(k in n for k in _IMAGE_MAPPINGS):
            types |= set(getattr(ma, n))
    return types


def _has_vision_attrs(cfg: Any) -> bool:
    return any(hasattr(cfg, a) for a in ("image_size", "num_channels")) or (
        hasattr(cfg, "patch_size") and not hasattr(cfg, "num_mel_bins"))


def _vision_subconfig(cfg: Any) -> str | None:
    from transformers import PretrainedConfig

    for attr in _VISION_SUBCONFIGS:
        if isinstance(getattr(cfg, attr, None), PretrainedConfig):
            return attr
    return None


def hf_spec(model_type: str, image_types: set[str] | None = None) -> dict | None:
    """The sweep spec of one HF model type: the model itself, or the vision sub-model of a multimodal type
    (``parent`` type, ``sub`` config attribute); ``None`` if it is not a vision/video model."""
    from transformers import AutoConfig

    image_types = _hf_image_types() if image_types is None else image_types
    t = model_type
    base = {"library": "hf", "family": t, "name": t, "parent": t, "sub": None, "types": [t]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = AutoConfig.for_model(t)
    except Exception as e:  # noqa: BLE001 - a config that cannot be built is reported, not fatal
        return {**base, "config_error": f"{type(e).__name__}: {_first_line(e)}"} if t in image_types else None
    sub = _vision_subconfig(cfg)
    vision = t in image_types or _has_vision_attrs(cfg) or any(
        _has_vision_attrs(getattr(cfg, a)) for a in (sub, "backbone_config") if a and getattr(cfg, a, None))
    if not vision:
        return None
    why = tables.HF_SKIP.get(t) or next(
        (w for suf, w in tables.HF_SKIP_SUFFIX.items() if t.endswith(suf)), None)
    if why:
        return {**base, "skip": why}
    key = (getattr(getattr(cfg, sub), "model_type", None) or t) if sub else t
    return {**base, "family": key, "name": key, "sub": sub}


def hf_specs(family_re: str | None = None) -> list[dict]:
    """Every HF model type that is a vision/video model (in an image mapping or with an image config), one
    spec per distinct vision model: multimodal types that share a vision tower (SigLIP, CLIP, ...) are swept
    once, and the row lists every type it covers."""
    from transformers.models.auto import configuration_auto as ca

    image_types = _hf_image_types()
    specs: dict[str, dict] = {}
    for t in sorted(ca.CONFIG_MAPPING_NAMES):
        if family_re and not re.search(family_re, t):
            continue
        spec = hf_spec(t, image_types)
        if spec is None:
            continue
        key = spec["name"]
        if key in specs:
            specs[key]["types"].append(t)
            if t == key:  # build it as itself rather than as the sub-model of another type
                specs[key].update(parent=t, sub=None)
            continue
        specs[key] = spec
    return list(specs.values())


def timm_spec(name: str) -> dict:
    """The sweep spec of one timm model."""
    family = _timm_family(name)
    spec = {"library": "timm", "family": family, "name": name, "note": tables.TIMM_EXTRA.get(name, "")}
    if family in tables.TIMM_SKIP:
        spec["skip"] = tables.TIMM_SKIP[family]
    return spec


# ============================================================================================ building
def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _cfg_attr(cfg: Any, name: str) -> Any:
    """``cfg.name``, else the same attribute of its backbone / vision sub-config."""
    v = getattr(cfg, name, None)
    for sub in ("backbone_config", "vision_config"):
        if v is None:
            v = getattr(getattr(cfg, sub, None), name, None)
    return v


def default_input(model: Any, size: tuple[int, int] | None = None) -> tuple[str | None, Any]:
    """The input localify builds by default, as (keyword or None for positional, tensor): a (2, C, H, W) image
    at ``size`` (what localify traced with), else at the size the model's config says (HF ``image_size`` /
    ``num_channels``; timm: the patch embedding's ``img_size``, else ``pretrained_cfg``)."""
    import torch

    cfg = getattr(model, "config", None)
    if _is_hf(model) and cfg is not None:
        chans = getattr(cfg, "num_channels", 3) or 3
        size = size or _as_hw(getattr(cfg, "image_size", None)) or (224, 224)
        key: str | None = "pixel_values"
    else:
        pc = getattr(model, "pretrained_cfg", None) or {}
        chans = getattr(model, "in_chans", None) or (pc.get("input_size") or (3,))[0]
        if size is None:
            for m in model.modules():
                size = _as_hw(getattr(m, "img_size", None))
                if size:
                    break
        if size is None and pc.get("input_size"):
            size = tuple(pc["input_size"][1:])
        size, key = size or (224, 224), None
    g = torch.Generator().manual_seed(0)
    return key, torch.randn(BATCH, int(chans), int(size[0]), int(size[1]), generator=g)


def own_input(model: Any) -> tuple[str | None, Any]:
    """The input the model itself takes: like :func:`default_input`, but an HF model gets its image size from
    a backbone / vision sub-config when its own config has none, video models (``num_frames``) get a
    (2, T, C, H, W) clip, and the keyword is the one its ``forward`` names (``pixel_values_videos``)."""
    import torch

    if not _is_hf(model):
        return default_input(model)
    cfg = model.config
    chans = _cfg_attr(cfg, "num_channels") or 3
    size = _as_hw(_cfg_attr(cfg, "image_size")) or (224, 224)
    frames = _cfg_attr(cfg, "num_frames") or _cfg_attr(cfg, "frames_per_clip")
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    key = next((k for k in ("pixel_values", "pixel_values_videos") if k in params), "pixel_values")
    shape = (BATCH, int(chans), *size)
    video = key == "pixel_values_videos" or hasattr(cfg, "num_frames")
    if isinstance(frames, int) and frames > 0 and video:
        shape = (BATCH, frames, int(chans), *size)
    g = torch.Generator().manual_seed(0)
    return key, torch.randn(*shape, generator=g)


def _as_hw(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and v > 0:
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) >= 2 and all(isinstance(x, int) for x in v[-2:]):
        return (int(v[-2]), int(v[-1]))
    return None


def _call(model: Any, inp: tuple[str | None, Any]) -> Any:
    """Run ``model`` on ``inp`` (keyword, tensor) without grad, with a fixed seed (random masking, noise)."""
    import torch

    key, x = inp
    torch.manual_seed(0)
    with torch.no_grad():
        return model(x) if key is None else model(**{key: x})


def _as_example(inp: tuple[str | None, Any]) -> Any:
    key, x = inp
    return x if key is None else {key: x}


def _is_hf(model: Any) -> bool:
    return type(model).__module__.startswith("transformers.")


# ---------------------------------------------------------------------------------------------------- timm
class _Captured(Exception):
    pass


@contextlib.contextmanager
def _timm_overrides(overrides: dict | None, seen: dict | None = None) -> Iterator[None]:
    """While active, timm's ``build_model_with_cfg`` (in every timm module that imported it) records the class
    and kwargs an entry point passes (into ``seen``, then stops the build) or applies ``overrides`` to those
    kwargs: the shrink then wins over an entry point's own ``dict(depths=..., **kwargs)`` and reaches fields
    of a ``model_cfg`` dataclass (MaxViT, MViTv2, ByobNet)."""
    from timm.models import _builder

    orig = _builder.build_model_with_cfg

    def patched(model_cls, variant, pretrained, **kwargs):
        if seen is not None:
            seen["cls"], seen["kwargs"] = model_cls, kwargs
            raise _Captured
        kwargs = dict(kwargs)
        cfg = kwargs.get("model_cfg")
        for k, v in (overrides or {}).items():
            if dataclasses.is_dataclass(cfg) and k in {f.name for f in dataclasses.fields(cfg)}:
                cfg = dataclasses.replace(cfg, **{k: v})
                kwargs["model_cfg"] = cfg
            else:
                kwargs[k] = v
        return orig(model_cls, variant, pretrained, **kwargs)

    mods = [m for n, m in list(sys.modules.items())
            if n.startswith("timm.models") and getattr(m, "build_model_with_cfg", None) is orig]
    for m in mods:
        m.build_model_with_cfg = patched
    try:
        yield
    finally:
        for m in mods:
            m.build_model_with_cfg = orig


def _timm_variant_kwargs(name: str) -> tuple[Any, dict]:
    """The model class and the constructor kwargs timm's entry point passes for ``name`` (nothing is built),
    merged with the class's own defaults and the fields of its ``model_cfg`` dataclass."""
    import timm

    seen: dict = {}
    try:
        with _timm_overrides(None, seen):
            timm.create_model(name, pretrained=False)
    except _Captured:
        pass
    except Exception:  # noqa: BLE001 - an entry point that does more than build: no kwargs known
        return None, {}
    cls, kwargs = seen.get("cls"), dict(seen.get("kwargs", {}))
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "feature_cfg", "pretrained_strict",
              "pretrained_filter_fn", "kwargs_filter", "pretrained_model_args", "cache_dir"):
        kwargs.pop(k, None)
    cfg = kwargs.pop("model_cfg", None) or kwargs.get("cfg")
    if dataclasses.is_dataclass(cfg):
        kwargs = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **kwargs}
    if cls is not None and inspect.isclass(cls):
        try:
            params = inspect.signature(cls.__init__).parameters
            defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
            kwargs = {**defaults, **kwargs}
        except (TypeError, ValueError):
            pass
    return cls, kwargs


def _pow2_heads(h: int, stage: int) -> int:
    """Heads of stage ``stage`` after shrinking: the largest power of two <= min(h, 2**stage, 8)."""
    n = max(1, min(h, 1 << stage, 8))
    return 1 << (n.bit_length() - 1)


def _int_list(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and bool(v) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in v)


def _shrink_kwargs(vals: dict, shallow: bool = False) -> dict:
    """Generic shrink of the constructor kwargs in ``vals`` (what the variant passes, merged with the class
    defaults): 2 blocks (1 per stage), 64 wide with 2 heads (32 per head and stage for hierarchical
    models)."""
    out: dict = {}
    for key in ("depth", "num_blocks"):  # blocks of a plain ViT / MLP-Mixer
        if isinstance(vals.get(key), int) and not isinstance(vals[key], bool) and vals[key] > 2:
            out[key] = 2
    for key in ("depth", "depths", "layers", "stages"):  # blocks per stage (Swin, ResNet, VOLO, Hiera)
        v = vals.get(key)
        if _int_list(v):
            out[key] = tuple(min(d, 1) for d in v)
    if shallow:
        return out
    heads, dim, dims = vals.get("num_heads"), vals.get("embed_dim"), vals.get("embed_dims")
    if isinstance(heads, int) and isinstance(dim, int):
        out["num_heads"], out["embed_dim"] = min(heads, 2), 32 * min(heads, 2)
    elif isinstance(heads, (tuple, list)) and all(isinstance(h, int) for h in heads):
        new_heads = tuple(_pow2_heads(h, i) for i, h in enumerate(heads))
        out["num_heads"] = new_heads
        if isinstance(dim, int):
            out["embed_dim"] = 32 * new_heads[0]
        if isinstance(dims, (tuple, list)) and len(dims) == len(heads):
            out["embed_dims"] = tuple(32 * h for h in new_heads)
    elif isinstance(dim, int) and dim > 64:
        out["embed_dim"] = 64
    if "embed_dims" not in out and isinstance(dims, (tuple, list)) and dims and all(
            isinstance(d, int) for d in dims):
        out["embed_dims"] = tuple(min(d, 32 << i) for i, d in enumerate(dims))
    if "embed_dim" not in out and _int_list(dim):
        out["embed_dim"] = tuple(min(d, 32 << i) for i, d in enumerate(dim))
    if isinstance(vals.get("dims"), (tuple, list)) and all(isinstance(d, int) for d in vals["dims"]):
        out["dims"] = tuple(min(d, 32 << i) for i, d in enumerate(vals["dims"]))
    return out


def _timm_attempts(name: str, family: str) -> list[tuple[str, dict]]:
    _, vals = _timm_variant_kwargs(name)
    attempts: list[tuple[str, dict]] = []
    seen: list[dict] = []
    if family in tables.TIMM_KWARGS:
        attempts.append(("table", tables.TIMM_KWARGS[family]))
        seen.append(tables.TIMM_KWARGS[family])
    for label in TIMM_SHRINK_ATTEMPTS:
        kw = {} if label == "default" else _shrink_kwargs(vals, shallow=label == "shallow")
        if kw not in seen:
            attempts.append((label, kw))
            seen.append(kw)
    return attempts


def build_timm(spec: dict) -> tuple[Any, dict]:
    import timm
    import torch

    errors = []
    for label, kw in _timm_attempts(spec["name"], spec["family"]):
        try:
            with _timm_overrides(kw):
                with torch.device("meta"):
                    n = _n_params(timm.create_model(spec["name"], pretrained=False))
                if n > MAX_PARAMS:
                    errors.append(f"{label}: {n / 1e6:.0f}M parameters, {_LIMIT}")
                    continue
                torch.manual_seed(0)
                model = timm.create_model(spec["name"], pretrained=False).eval()
            _call(model, own_input(model))
            return model, {"attempt": label, "kwargs": _jsonable(kw), "build_errors": errors}
        except SweepTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - try the next, less shrunk, kwargs
            errors.append(f"{label} {_jsonable(kw)}: {type(e).__name__}: {_first_line(e, 200)}")
    raise (_TooLarge if errors and all(_LIMIT in e for e in errors) else _BuildFailed)("; ".join(errors))


class _BuildFailed(Exception):
    pass


class _TooLarge(_BuildFailed):
    pass


# ---------------------------------------------------------------------------------------------------- HF
_TINY = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2,
         "intermediate_size": 64, "projection_dim": 32, "out_hidden_size": 32, "embed_dim": 32,
         "depth": 2, "num_heads": 2}
_LAYER_KEYS = ("num_hidden_layers", "depth", "depths", "num_layers")


def _hf_overrides(cfg: Any, model_type: str, shallow: bool) -> dict:
    d = cfg.to_dict()
    out: dict = {}
    for k, v in _TINY.items():
        if k not in d or (shallow and k not in _LAYER_KEYS):
            continue
        cur = d[k]
        if isinstance(cur, bool) or cur is None:
            continue
        if isinstance(cur, int):
            out[k] = min(cur, v) if k in _LAYER_KEYS else v
        elif isinstance(cur, (list, tuple)) and cur and all(isinstance(x, int) for x in cur):
            if k in ("depths", "depth"):
                out[k] = [1] * len(cur)
            elif k in ("num_heads", "num_attention_heads") and not shallow:
                out[k] = [_pow2_heads(h, i) for i, h in enumerate(cur)]
    if not shallow:
        hs = d.get("hidden_sizes")
        if isinstance(hs, (list, tuple)) and hs and all(isinstance(x, int) for x in hs):
            out["hidden_sizes"] = [min(h, 16 << i) for i, h in enumerate(hs)]
        if isinstance(d.get("depths"), (list, tuple)):
            out["depths"] = [1] * len(d["depths"])
    elif isinstance(d.get("depths"), (list, tuple)):
        out["depths"] = [1] * len(d["depths"])
    out.update(tables.HF_OVERRIDES.get(model_type, {}))
    return {k: v for k, v in out.items() if v is not None}


def _rebuild_config(cfg: Any, overrides: dict) -> Any:
    """``cfg`` rebuilt with ``overrides``. A ViT backbone that feeds k of its layers to a neck (DPT, Depth
    Anything, ViTMatte) keeps k layers and feeds all of them."""
    d = cfg.to_dict()
    overrides = dict(overrides)
    if "num_hidden_layers" in overrides and "stage_names" in d:
        k = len(d.get("out_indices") or [])
        for key in ("stage_names", "out_features", "out_indices"):
            d.pop(key, None)
        if k > 1:
            overrides["num_hidden_layers"] = max(overrides["num_hidden_layers"], k)
            n = overrides["num_hidden_layers"]
            overrides["out_indices"] = list(range(n - k + 1, n + 1))
    d.update(overrides)
    for k in ("transformers_version", "model_type"):
        d.pop(k, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(cfg).from_dict(d)


def _hf_model_class(cfg: Any, parent: str) -> Any:
    """The model class for ``cfg``: the AutoModel class of its type, else an image task class (depth,
    detection, ...) of it, else the class in its parent's modeling module whose config class it is."""
    from transformers import PreTrainedModel
    from transformers.models.auto import modeling_auto as ma

    mt = cfg.model_type
    mappings = ["MODEL_MAPPING_NAMES"] + sorted(
        n for n in dir(ma) if n.endswith("MAPPING_NAMES") and any(k in n for k in _IMAGE_MAPPINGS))
    for mname in mappings:
        cls_name = getattr(ma, mname).get(mt)
        if isinstance(cls_name, (tuple, list)):
            cls_name = cls_name[0]
        if cls_name:
            import transformers

            cls = getattr(transformers, cls_name, None)
            if cls is not None:
                return cls
    modname = type(cfg).__module__.replace(".configuration_", ".modeling_")
    mod = importlib.import_module(modname)
    cands = [c for _, c in inspect.getmembers(mod, inspect.isclass)
             if issubclass(c, PreTrainedModel) and c.__module__ == modname
             and getattr(c, "config_class", None) is type(cfg) and not c.__name__.endswith("PreTrainedModel")]
    if not cands:
        raise _BuildFailed(f"no model class for config {type(cfg).__name__} in {modname}")

    def score(c: Any) -> tuple:
        n = c.__name__
        return ("VisionModel" not in n, "Vision" not in n, "Encoder" not in n, len(n))

    return min(cands, key=score)


def build_hf(spec: dict) -> tuple[Any, dict]:
    import torch
    from transformers import AutoConfig

    if spec.get("config_error"):
        raise _BuildFailed(f"AutoConfig.for_model({spec['parent']!r}): {spec['config_error']}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(spec["parent"])
    if spec.get("sub"):
        cfg = getattr(cfg, spec["sub"])
    errors: list[str] = []
    fallback = None
    for label in HF_ATTEMPTS:
        try:
            ov = {} if label == "default" else _hf_overrides(cfg, cfg.model_type, shallow=label == "shallow")
            bb = getattr(cfg, "backbone_config", None)
            bb_ov = ov.pop("backbone_config", {})
            c = _rebuild_config(cfg, ov)
            if bb is not None and label != "default" and hasattr(bb, "to_dict"):
                bb_ov = {**_hf_overrides(bb, bb.model_type, label == "shallow"), **bb_ov}
                c.backbone_config = _rebuild_config(bb, bb_ov)
                ov["backbone_config"] = bb_ov
            cls = _hf_model_class(c, spec["parent"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.device("meta"):
                    n = _n_params(cls._from_config(c))
                if n > MAX_PARAMS:
                    errors.append(f"{label}: {n / 1e6:.0f}M parameters, {_LIMIT}")
                    continue
                torch.manual_seed(0)
                model = cls._from_config(c).eval()
            info = {"attempt": label, "kwargs": _jsonable(ov), "class": cls.__name__, "build_errors": errors}
            try:
                _call(model, own_input(model))
            except SweepTimeout:
                raise
            except Exception as e:  # noqa: BLE001 - built but does not run on pixels alone
                errors.append(f"{label}: forward(pixel_values): {type(e).__name__}: {_first_line(e, 200)}")
                if fallback is None:
                    fallback = (model, {**info, "forward_error": errors[-1]})
                continue
            return model, info
        except SweepTimeout:
            raise
        except _BuildFailed as e:
            errors.append(str(e))
            break
        except Exception as e:  # noqa: BLE001 - try the next, less shrunk, config
            errors.append(f"{label} {_jsonable(ov) if label != 'default' else ''}: {type(e).__name__}: "
                          f"{_first_line(e, 200)}")
    if fallback is not None:  # it builds: localify must still fail cleanly on it
        fallback[1]["build_errors"] = errors
        return fallback
    raise (_TooLarge if errors and all(_LIMIT in e for e in errors) else _BuildFailed)("; ".join(errors))


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        if isinstance(v, dict):
            return {k: _jsonable(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [_jsonable(x) for x in v]
        return repr(v)


# ============================================================================================ one model
def _tensors(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def output_error(a: Any, b: Any) -> float:
    """Largest difference over all float output tensors, relative to max(1, max|original|)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or not ta:
        return math.inf
    worst = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return math.inf
        x, y = x.double(), y.double()
        scale = max(1.0, float(x.abs().max()) if x.numel() else 1.0)
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        if not math.isfinite(diff):
            diff = 0.0 if torch_equal_nan(x, y) else math.inf
        worst = max(worst, diff / scale)
    return worst


def torch_equal_nan(x: Any, y: Any) -> bool:
    import torch

    return bool(torch.equal(torch.isnan(x), torch.isnan(y)) and torch.allclose(
        torch.nan_to_num(x), torch.nan_to_num(y), rtol=0, atol=TOLERANCE))


def _where(e: BaseException) -> str:
    """The last traceback frame inside the localify package (file:line function), else the last frame."""
    import localify

    root = str(Path(localify.__file__).resolve().parent)
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if str(Path(f.filename).resolve()).startswith(root)]
    f = (mine or frames or [None])[-1]
    if f is None:
        return ""
    rel = os.path.relpath(f.filename, str(Path(root).parent)) if mine else f.filename
    return f"{rel}:{f.lineno} {f.name}"


def _proof(site: Any) -> tuple[Any, bool]:
    """The site's grid proof (``site.proof``, once localify has one) and whether it holds."""
    proof = getattr(site, "proof", None)
    if proof is None:
        return None, False
    ok = getattr(proof, "ok", None)
    if ok is None and isinstance(proof, dict):
        ok = proof.get("ok")
    if ok is None and isinstance(proof, bool):
        ok = proof
    desc = proof.describe() if hasattr(proof, "describe") else proof
    return _jsonable(desc if not dataclasses.is_dataclass(desc) else dataclasses.asdict(desc)), bool(ok)


def suspicious_layout(grid: tuple[int, int] | None, size: tuple[int, int] | None) -> str:
    """Why a grid does not look like a patch grid of the input (empty: it does): its aspect ratio differs from
    the image's, or it does not divide the image into whole patches."""
    if not grid or not size:
        return ""
    (r, c), (h, w) = grid, size
    why = []
    if r * w != c * h:
        why.append(f"aspect {r}x{c} vs image {h}x{w}")
    if h % r or w % c:
        why.append(f"not a whole-patch grid of {h}x{w}")
    return "; ".join(why)


def _site_dict(site: Any, size: tuple[int, int] | None) -> dict:
    tok = site.tokens
    proof, proof_ok = _proof(site)
    d = {"block": site.block, "path": site.path, "fc1": list(site.fc1), "fc2": site.fc2,
         "dims": f"{site.in_features}->{site.hidden_features}->{site.out_features}",
         "activation": site.activation, "status": site.status, "reason": site.reason,
         "tokens": tok.describe() if tok is not None else None,
         "layout": tok.layout if tok is not None else None,
         "grid": list(tok.grid) if tok is not None else None,
         "prefix": tok.prefix if tok is not None else None, "suffix": tok.suffix if tok is not None else None,
         "proof": proof, "proof_ok": proof_ok}
    d["suspicious"] = suspicious_layout(tuple(tok.grid), size) if tok is not None and site.convertible else ""
    return d


def _classify_error(e: BaseException) -> str:
    import localify

    for cls, status in ((localify.TraceError, "untraceable"), (localify.NoMLPFoundError, "no_mlp"),
                        (localify.ExampleInputError, "example_input"),
                        (localify.NotLocalifiableError, "refused"),
                        (localify.LocalifyError, "localify_error")):
        if isinstance(e, cls):
            return status
    return "crashed"


def _localify_run(model: Any, example: tuple[str | None, Any] | None, res: dict) -> None:
    """find_mlps, localify on a copy and the output check, with localify's default input (``example`` None)
    or with ``example``; fills ``res`` (status, sites, error, times, ...). Raises only SweepTimeout."""
    import localify

    kw = {} if example is None else {"example_inputs": _as_example(example)}
    step = "find_mlps"
    try:
        t0 = time.perf_counter()
        plan = localify.find_mlps(model, **kw)
        res["times"]["find_mlps"] = time.perf_counter() - t0
        size = tuple(plan.input_size) if plan.input_size else None
        if size is None and example is not None:  # a video clip: its frames' size
            size = tuple(int(d) for d in example[1].shape[-2:])
        res["input_size"] = list(size) if size else None
        res["sites"] = [_site_dict(s, size) for s in plan.sites]
        res["tracer"] = getattr(plan, "tracer", None)

        step = "localify"
        t0 = time.perf_counter()
        converted = localify.localify(copy.deepcopy(model), **kw)
        res["times"]["localify"] = time.perf_counter() - t0
        res["n_locality_linear"] = sum(isinstance(m, localify.LocalityLinear) for m in converted.modules())

        step = "check"
        t0 = time.perf_counter()
        inp = example if example is not None else default_input(model, size)
        converted.eval()
        err = output_error(_call(model, inp), _call(converted, inp))
        res["times"]["check"] = time.perf_counter() - t0
        res["max_rel_err"] = err
        res["status"] = "converted" if err <= TOLERANCE else "mismatch"
    except SweepTimeout:
        res["step"] = step
        raise
    except Exception as e:  # noqa: BLE001 - every failure is a result
        status = _classify_error(e) if step in ("find_mlps", "localify") else "crashed"
        res.update(status=status, error={"type": type(e).__name__, "message": _first_line(e, 1000),
                                         "where": _where(e), "step": step})
        if status == "crashed":
            res["error"]["traceback"] = traceback.format_exc()[-4000:]


_RETRY = ("example_input", "untraceable", "localify_error", "no_mlp")


def run_one(spec: dict, timeout: float | None = None) -> dict:
    """Build one model, run find_mlps, localify (on a copy) and the output check; never raises.

    When localify fails on its default input with a typed error and the model runs on an input of its own
    that differs (a video clip, an image size from a sub-config), the same steps run again with that input
    as ``example_inputs``; that result is ``res["own_input"]``."""
    import torch

    torch.set_num_threads(1)
    res: dict = _ident(spec)
    res.update(status=None, sites=[], error=None, times={})
    if spec.get("skip"):
        res.update(status="skipped", error={"type": "skip", "message": spec["skip"]})
        return res
    t_all, cpu_all = time.perf_counter(), time.process_time()
    if timeout:
        def on_alarm(signum, frame):
            raise SweepTimeout

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    cur = res
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            try:
                model, info = build_hf(spec) if spec["library"] == "hf" else build_timm(spec)
            except _TooLarge as e:
                res.update(status="too_large", error={"type": "too_large", "message": str(e)[:2000]})
                return res
            except _BuildFailed as e:
                res.update(status="build_failed", error={"type": "build", "message": str(e)[:2000]})
                return res
            except Exception as e:  # noqa: BLE001
                res.update(status="build_failed",
                           error={"type": type(e).__name__, "message": _first_line(e, 1000)})
                return res
            res["times"]["build"] = time.perf_counter() - t0
            res.update(build=info, model_class=type(model).__name__, params=_n_params(model))
            _localify_run(model, None, res)
            if res["status"] in _RETRY and not info.get("forward_error"):
                own = own_input(model)
                dflt = default_input(model)
                differs = own[0] != dflt[0] or tuple(own[1].shape) != tuple(dflt[1].shape)
                if differs or res["status"] == "example_input":
                    cur = res["own_input"] = {"status": None, "sites": [], "error": None, "times": {},
                                              "input": [own[0], list(own[1].shape)]}
                    _localify_run(model, own, cur)
    except SweepTimeout:
        cur.update(status="timeout", error={"type": "timeout", "step": cur.get("step"),
                                            "message": f"over {timeout:.0f} s in {cur.get('step', 'build')}"})
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
        res["times"]["total"] = time.perf_counter() - t_all
        res["times"]["cpu"] = time.process_time() - cpu_all
    return res


def _runs(res: dict) -> list[tuple[str, dict]]:
    """The localify runs of one result: ("default", res) and, if there was one, ("own input", its run)."""
    return [("default", res)] + ([("own input", res["own_input"])] if res.get("own_input") else [])


def unproven(res: dict) -> list[dict]:
    """Converted sites (default run and own-input run) whose grid proof is missing or does not hold."""
    return [s for _, run in _runs(res) if run["status"] in ("converted", "mismatch")
            for s in run["sites"] if s["status"] == "convertible" and not s["proof_ok"]]


def suspicious(res: dict) -> list[tuple[str, dict]]:
    """Converted sites whose grid does not look like a patch grid of the input, with their run's label."""
    return [(label, s) for label, run in _runs(res) if run["status"] in ("converted", "mismatch")
            for s in run["sites"] if s["status"] == "convertible" and s.get("suspicious")]


# ============================================================================================ pool
def _ident(spec: dict) -> dict:
    return {k: spec.get(k) for k in ("library", "family", "name", "note", "types")}


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.CRITICAL)  # torch.export logs whole graphs at ERROR level when it gives up
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def run_all(specs: list[dict], workers: int, timeout: float, log: Any = print) -> list[dict]:
    """Run every spec in a pool of ``workers`` processes, at most ``timeout`` s each (a worker stuck past
    ``timeout + 60`` s is killed and its model recorded as a timeout)."""
    import multiprocessing as mp

    results: dict[int, dict] = {}
    todo = list(range(len(specs)))[::-1]
    retries: Counter = Counter()
    t_start = time.perf_counter()
    ctx = mp.get_context("spawn")

    def new_pool() -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                      max_tasks_per_child=100)

    pool = new_pool()
    running: dict[cf.Future, tuple[int, float]] = {}
    try:
        while todo or running:
            while todo and len(running) < workers:
                i = todo.pop()
                running[pool.submit(run_one, specs[i], timeout)] = (i, time.perf_counter())
            done, _ = cf.wait(list(running), timeout=5, return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in done:
                i, _t0 = running.pop(fut)
                try:
                    results[i] = fut.result()
                except Exception as e:  # noqa: BLE001 - the worker died (segfault, OOM kill, pool broken)
                    broken = True
                    retries[i] += 1
                    if retries[i] <= 1:
                        todo.append(i)
                        continue
                    results[i] = {**_ident(specs[i]), "status": "died", "sites": [], "times": {},
                                  "error": {"type": type(e).__name__, "message": _first_line(e)}}
                _progress(log, len(results), len(specs), results[i], t_start)
            now = time.perf_counter()
            stuck = [f for f, (_, t0) in running.items() if now - t0 > timeout + 60]
            if stuck or broken:
                for f in stuck:
                    i, _ = running.pop(f)
                    results[i] = {**_ident(specs[i]), "status": "timeout", "sites": [], "times": {},
                                  "error": {"type": "timeout",
                                            "message": f"worker stuck over {timeout + 60:.0f} s"}}
                    _progress(log, len(results), len(specs), results[i], t_start)
                for i, _t in running.values():  # their worker may be the one killed: run them again
                    todo.append(i)
                running.clear()
                for p in list(getattr(pool, "_processes", {}).values()):
                    if p.is_alive():
                        p.kill()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [results[i] for i in range(len(specs))]


def _progress(log: Any, n: int, total: int, r: dict, t_start: float) -> None:
    sites = r.get("sites") or []
    conv = sum(s["status"] == "convertible" for s in sites)
    extra = ""
    if r.get("error") and r["status"] != "converted":
        extra = f"  {r['error'].get('type')}: {r['error'].get('message', '')[:90]}"
    own = r.get("own_input")
    if own:
        extra += f"  | own input: {own['status']}"
    log(f"[{n:>3}/{total}] {time.perf_counter() - t_start:6.0f}s  {r['library']:<4} {r['name']:<42} "
        f"{r['status']:<13} {conv}/{len(sites)} sites  {r.get('times', {}).get('total', 0):5.1f}s{extra}",
        flush=True)


# ============================================================================================ report
def summarize(results: list[dict]) -> dict:
    counts = Counter(r["status"] for r in results)
    own = [r["own_input"] for r in results if r.get("own_input")]
    unp = [(r, s) for r in results for s in unproven(r)]
    return {
        "models": len(results),
        "by_library": dict(Counter(r["library"] for r in results)),
        "counts": {k: counts.get(k, 0) for k in STATUSES},
        "own_input_counts": dict(Counter(o["status"] for o in own)),
        "crashed_total": counts.get("crashed", 0) + sum(o["status"] == "crashed" for o in own),
        "mismatch_total": counts.get("mismatch", 0) + sum(o["status"] == "mismatch" for o in own),
        "sites": sum(len(run["sites"]) for r in results for _, run in _runs(r)),
        "converted_sites": sum(s["status"] == "convertible" for r in results for _, run in _runs(r)
                               if run["status"] in ("converted", "mismatch") for s in run["sites"]),
        "unproven_sites": len(unp),
        "unproven_models": len({r["name"] for r, _ in unp}),
        "suspicious_sites": sum(len(suspicious(r)) for r in results),
    }


def _cell(s: Any, n: int = 80) -> str:
    s = str(s or "").replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def _conv_cell(run: dict) -> str:
    conv = [s for s in run["sites"] if s["status"] == "convertible"]
    if run["status"] not in ("converted", "mismatch"):
        return "0"
    grids = sorted({s["tokens"] for s in conv}, key=str)
    return f"{len(conv)} ({_cell(', '.join(grids), 40)})" if conv else "0"


def _with_own(n: int, own: int) -> str:
    return f"{n} (+{own} with own input)" if own else str(n)


def _first_refusal(run: dict) -> str:
    refused = [s for s in run["sites"] if s["status"] != "convertible"]
    return f"{refused[0]['status']}: {refused[0]['reason']}" if refused else ""


def write_markdown(results: list[dict], path: Path, meta: dict) -> None:
    summ = summarize(results)
    c = summ["counts"]
    ordered = sorted(results, key=lambda r: (r["library"] != "timm", r["family"], r["name"]))
    oc = summ["own_input_counts"]
    lines = [
        "# localify registry sweep",
        "",
        f"{summ['models']} models ({', '.join(f'{k} {v}' for k, v in summ['by_library'].items())}), built by "
        f"`scripts/sweep.py` (tiny, random init); {meta.get('seconds', 0):.0f} s with {meta.get('workers')} "
        f"worker(s), {meta.get('timeout'):.0f} s per model ({meta.get('cpu_seconds', 0):.0f} CPU s in the "
        f"workers; load average at the end {', '.join(f'{x:.1f}' for x in meta.get('load_average', ()))}); "
        f"torch {meta.get('torch')}, timm {meta.get('timm')}, transformers {meta.get('transformers')}.",
        "",
        "| converted (check passed) | output mismatch | refused | untraceable | no MLP | example input | "
        "other localify error | **crashed** | timeout | worker died | build failed | too large | skipped |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {c['converted']} | {_with_own(c['mismatch'], oc.get('mismatch', 0))} | {c['refused']} | "
        f"{c['untraceable']} | {c['no_mlp']} | {c['example_input']} | {c['localify_error']} | "
        f"**{_with_own(c['crashed'], oc.get('crashed', 0))}** | {c['timeout']} | {c['died']} | "
        f"{c['build_failed']} | {c['too_large']} | {c['skipped']} |",
        "",
        f"MLP sites found (all runs): {summ['sites']}; converted: {summ['converted_sites']}; "
        f"**unproven conversions: "
        f"{summ['unproven_sites']} site(s) in {summ['unproven_models']} model(s)** (converted without a grid "
        f"proof that holds); converted sites whose grid does not look like a patch grid of the input: "
        f"{summ['suspicious_sites']}. Crashes in all runs: **{summ['crashed_total']}**; output mismatches: "
        f"**{summ['mismatch_total']}**.",
        "",
        f"Models that failed with a typed error on localify's default input and run on an input of their own "
        f"(a video clip, a size from a sub-config) were run again with it as `example_inputs`: "
        f"{sum(oc.values())} model(s), {', '.join(f'{k} {v}' for k, v in sorted(oc.items())) or 'none'}.",
        "",
        "| library | family | model | MLP sites | converted | refused (first reason) | status | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ordered:
        status = r["status"] + (f": {r['error'].get('type')}" if r.get("error") and r["status"] != "converted"
                                and r["error"].get("type") not in (r["status"], "skip") else "")
        note = []
        if r.get("error") and r["status"] != "converted":
            note.append(_cell(r["error"].get("message"), 100))
        susp = {s["suspicious"] for _, s in suspicious(r)}
        if susp:
            note.append("suspicious grid: " + _cell("; ".join(sorted(susp)), 80))
        own = r.get("own_input")
        if own:
            err = own.get("error") or {}
            note.append(f"own input {own['input'][0]} {'x'.join(map(str, own['input'][1]))}: {own['status']} "
                        f"{_conv_cell(own)}")
            if err:
                note[-1] += f" ({_cell(err.get('type'), 30)}: {_cell(err.get('message'), 60)})"
        if r.get("build", {}).get("forward_error"):
            note.append("does not run on pixels alone: " + _cell(r["build"]["forward_error"], 90))
        if r.get("types") and len(r["types"]) > 1:
            note.append("also " + _cell(", ".join(t for t in r["types"] if t != r["name"]), 80))
        if r.get("build", {}).get("attempt") in ("shallow", "default"):
            note.append(f"built with {r['build']['attempt']} kwargs")
        name = r["name"]
        if r["library"] == "hf" and r.get("model_class"):
            name += f" ({r['model_class']})"
        lines.append(f"| {r['library']} | {r['family']} | {_cell(name, 70)} | {len(r['sites'])} | "
                     f"{_conv_cell(r)} | {_cell(_first_refusal(r), 70)} | {status} | {' · '.join(note)} |")

    def section(title: str, rows: list[str]) -> None:
        lines.extend(["", f"## {title} ({len(rows)})", ""] + (rows or ["none"]))

    runs = [(r, label, run) for r in ordered for label, run in _runs(r)]
    section("Crashes", [f"- {r['library']} `{r['name']}` ({label}): {run['error']['type']}: "
                       f"{_cell(run['error']['message'], 160)} — at `{run['error'].get('where')}` "
                       f"({run['error'].get('step')})"
                       for r, label, run in runs if run["status"] == "crashed"])
    section("Output mismatches", [f"- {r['library']} `{r['name']}` ({label}): max relative error "
                                  f"{run.get('max_rel_err'):.3g}" for r, label, run in runs
                                  if run["status"] == "mismatch"])
    section("Untraceable", [f"- {r['library']} `{r['name']}` ({label}): {_cell(run['error']['message'], 200)}"
                            for r, label, run in runs if run["status"] == "untraceable"])
    section("Example-input errors", [
        f"- {r['library']} `{r['name']}` ({label}): {_cell(run['error']['message'], 200)}"
        for r, label, run in runs if run["status"] == "example_input"])
    section("Converted sites with a suspicious grid", [
        f"- {r['library']} `{r['name']}` ({label}) block {s['block']} `{s['path']}`: {s['tokens']} "
        f"{s['layout']} — {s['suspicious']}" for r in ordered for label, s in suspicious(r)])
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--timm", action="store_true", help="timm families only")
    which.add_argument("--hf", action="store_true", help="Hugging Face model types only")
    which.add_argument("--all", action="store_true", help="both (the default)")
    ap.add_argument("--family", help="regex on family / model name")
    ap.add_argument("--limit", type=int, help="at most N models (after --family)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    ap.add_argument("--out", default="sweep.md", help="markdown table")
    ap.add_argument("--json", default=None, help="raw results (JSON)")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    ap.add_argument("--from-json", metavar="FILE",
                    help="rewrite --out (and --json's summary) from the raw results of an earlier run")
    args = ap.parse_args(argv)
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        write_markdown(doc["results"], Path(args.out), doc["meta"])
        if args.json:
            doc["summary"] = summarize(doc["results"])
            Path(args.json).write_text(json.dumps(doc, indent=1, default=repr))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    specs: list[dict] = []
    if not args.hf:
        specs += timm_specs(args.family)
    if not args.timm:
        specs += hf_specs(args.family)
    if args.limit:
        specs = specs[: args.limit]
    if args.list:
        for s in specs:
            skip = f"  (skip: {s['skip']})" if s.get("skip") else ""
            print(f"{s['library']:<4} {s['family']:<28} {s['name']}{skip}")
        print(f"{len(specs)} models")
        return 0
    print(f"sweep: {len(specs)} models, {args.workers} worker(s), {args.timeout:.0f} s each", flush=True)
    t0 = time.perf_counter()
    results = run_all(specs, args.workers, args.timeout)
    import timm
    import torch
    import transformers

    meta = {"seconds": time.perf_counter() - t0, "workers": args.workers, "timeout": args.timeout,
            "cpu_seconds": sum(r.get("times", {}).get("cpu", 0.0) for r in results),
            "load_average": os.getloadavg(),
            "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__}
    write_markdown(results, Path(args.out), meta)
    if args.json:
        doc = {"meta": meta, "summary": summarize(results), "results": results}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=repr))
    summ = summarize(results)
    print(json.dumps(summ["counts"]), flush=True)
    print(f"unproven conversions: {summ['unproven_sites']} site(s) in {summ['unproven_models']} model(s); "
          f"written {args.out}" + (f", {args.json}" if args.json else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
