"""Model sources: build a base model from a timm name, a Hugging Face config or a user factory, and remember
how it was built so a saved model can be rebuilt without pickling anything.

A source string is one of:

* a timm model name, or a unique prefix of one (``deit_tiny`` -> ``deit_tiny_patch16_224``);
* ``hf:PATH_OR_ID``: a Hugging Face model from a local directory or the local cache (offline);
* ``module.path:factory``: a function (or class) in your own code that returns the model.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ._checkpoint import load_checkpoint
from ._paths import file_kind
from .errors import CheckpointError, ModelSourceError, SavedModelError, UntrustedCodeError, first_line

__all__ = ["ModelSource", "BuiltModel", "build_model", "create_model", "resolve_timm_name", "get_source",
           "set_source", "check_loadable"]

SOURCE_ATTR = "_localify_source"


@dataclass
class ModelSource:
    """How to rebuild a base model: ``kind`` is "timm", "hf" or "factory"."""

    kind: str
    name: str  # timm name, HF path/id, or "module.path:factory"
    kwargs: dict = field(default_factory=dict)  # timm / factory keyword arguments
    hf_class: str | None = None  # transformers class name, for "hf"
    hf_config: dict | None = None  # the full config, so the architecture is rebuilt without the files
    # guessed from the model (timm's architecture name with default kwargs, a Hugging Face model's config)
    # rather than given: localify.save checks that it rebuilds the same function. Not saved.
    inferred: bool = field(default=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["inferred"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSource:
        return cls(**{k: v for k, v in d.items() if k != "inferred"})

    def describe(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.name}"
        return self.name


def get_source(model: nn.Module) -> ModelSource | None:
    src = getattr(model, SOURCE_ATTR, None)
    if src is not None:
        return src
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and type(model).__module__.startswith("transformers"):
        return ModelSource("hf", getattr(cfg, "_name_or_path", "") or type(model).__name__,
                           hf_class=type(model).__name__, hf_config=cfg.to_dict(), inferred=True)
    return None


def infer_timm_source(model: nn.Module) -> ModelSource | None:
    """The timm name that rebuilds ``model`` with default kwargs, if its parameters match (checked on meta).

    Parameter shapes do not fix the function (``act_layer``, ``global_pool`` change none of them): the source
    is marked ``inferred`` and :func:`localify.save` checks one forward of the rebuilt model."""
    if not type(model).__module__.startswith("timm."):
        return None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        return None
    import timm
    import torch

    try:
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False)
    except Exception:
        return None
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    return ModelSource("timm", name, inferred=True) if mine == theirs else None


def set_source(model: nn.Module, source: ModelSource) -> None:
    object.__setattr__(model, SOURCE_ATTR, source)


def resolve_timm_name(name: str) -> str:
    """A timm model name, or the one model whose name starts with ``name``."""
    import timm

    names = timm.list_models()
    if name in names:
        return name
    base, dot, tag = name.partition(".")
    if dot and base in names:  # a pretrained tag such as deit_tiny_patch16_224.fb_in1k
        return name
    starts = [n for n in names if n.startswith(name)]
    if len(starts) == 1:
        return starts[0]
    # "deit_tiny" means deit_tiny_patch16_224, not deit_tiny_distilled_patch16_224: prefer the one candidate
    # whose remaining name parts only give the patch / window / image size
    plain = [n for n in starts if all(re.fullmatch(r"patch\d+|window\d+|\d+", t) for t in
                                      n[len(name):].strip("_").split("_") if t)]
    if len(plain) == 1:
        return plain[0]
    if len(starts) > 1:
        shown = ", ".join(starts[:8]) + (", ..." if len(starts) > 8 else "")
        raise ModelSourceError(f"model name {name!r} is ambiguous: it starts {len(starts)} timm models ({shown}); "
                               f"give the full name")
    stem = name
    while len(stem) > 3 and not any(n.startswith(stem) for n in names):
        stem = stem[:-1]
    close = [n for n in names if len(stem) > 3 and n.startswith(stem)][:3]
    close += [n for n in difflib.get_close_matches(name, names, n=5, cutoff=0.5) if n not in close][: 5 - len(close)]
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ModelSourceError(f"unknown model {name!r}: not a timm model name, 'hf:PATH' or 'module:factory'{hint}")


def create_model(source: str | ModelSource, *, pretrained: bool = False,
                 checkpoint_path: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """Build a base model from a source string or a :class:`ModelSource`, remembering the source.

    Args:
        source: a timm name (or unique prefix), ``hf:PATH_OR_ID`` or ``module.path:factory``.
        pretrained: load the model's pretrained weights. timm: ``timm.create_model(..., pretrained=True)``,
            which reads the Hugging Face cache (set ``HF_HUB_OFFLINE=1`` to never touch the network);
            ``hf:``: the weights saved in the directory or the local cache (never downloaded); a factory is
            called with ``pretrained=True``. Weights that cannot be found raise :class:`CheckpointError`.
        checkpoint_path: a local weights file loaded afterwards (as :func:`localify.load_checkpoint` does),
            like timm's ``checkpoint_path``.
        **kwargs: timm / factory keyword arguments, or config overrides for ``hf:``. They are part of the
            remembered source; ``pretrained`` and ``checkpoint_path`` are not (a saved model stores its
            weights).

    Without ``pretrained`` or ``checkpoint_path`` the weights are random, as with timm.
    """
    src = source if isinstance(source, ModelSource) else parse_source(source, kwargs)
    model = _build(src, pretrained)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    set_source(model, src)
    return model


def parse_source(text: str, kwargs: dict | None = None) -> ModelSource:
    kwargs = dict(kwargs or {})
    if text.startswith("hf:"):
        return _hf_source(text[3:], kwargs)
    if ":" in text and not os.path.exists(text):
        return ModelSource("factory", text, kwargs)
    return ModelSource("timm", resolve_timm_name(text), kwargs)


def _hf_source(path: str, kwargs: dict) -> ModelSource:
    import transformers

    if (path.startswith(("/", ".", "~")) or os.sep in path and path.count("/") > 1) and not Path(path).expanduser().exists():
        raise ModelSourceError(f"hf:{path}: no such directory")
    _check_hf_files(path, ModelSourceError)
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as e:
        raise ModelSourceError(
            f"cannot read a Hugging Face config for {path!r} from a local directory or the local cache "
            f"(no download is tried): {first_line(e)}"
        ) from None
    archs = getattr(cfg, "architectures", None) or []
    cls = next((a for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        model_cls = transformers.AutoModel._model_mapping.get(type(cfg), None) if hasattr(
            transformers.AutoModel, "_model_mapping") else None
        cls = model_cls.__name__ if model_cls is not None else None
    if cls is None:
        raise ModelSourceError(f"the config at {path!r} names no transformers model class ({archs!r})")
    return ModelSource("hf", path, {}, hf_class=cls, hf_config=cfg.to_dict())


def _build(src: ModelSource, pretrained: bool = False) -> nn.Module:
    if src.kind == "timm":
        import timm

        try:
            return timm.create_model(src.name, pretrained=pretrained, **src.kwargs)
        except TypeError as e:
            raise ModelSourceError(f"timm could not build {src.name} with {src.kwargs}: {e}") from None
        except Exception as e:  # the hub client, a corrupt file: anything that kept the weights from loading
            if not pretrained:
                raise
            hint = ("; with no network, put them in the Hugging Face cache and set HF_HUB_OFFLINE=1, or pass a "
                    "local file as checkpoint_path") if isinstance(e, OSError) else ""
            raise CheckpointError(f"timm could not load pretrained weights for {src.name}: {first_line(e)}{hint}"
                                  ) from None
    if src.kind == "hf":
        cls = _hf_model_class(src.hf_class)
        if cls is None:
            raise ModelSourceError(f"transformers has no model class {src.hf_class!r}")
        cfg_cls = getattr(cls, "config_class", None)
        cfg = cfg_cls.from_dict(dict(src.hf_config or {})) if cfg_cls is not None else None
        if cfg is None:
            raise ModelSourceError(f"cannot rebuild the config of {src.hf_class}")
        if pretrained:
            return _hf_pretrained(cls, cfg, src.name)
        return cls(cfg)
    if src.kind == "factory":
        return _call_factory(src.name, {**src.kwargs, "pretrained": True} if pretrained else src.kwargs)
    raise ModelSourceError(f"unknown model source kind {src.kind!r}")


def _hf_model_class(name: str | None) -> type | None:
    """The ``transformers`` model class of that name (a ``PreTrainedModel``), or None."""
    import transformers

    if not isinstance(name, str) or not name.isidentifier():
        return None
    try:
        cls = getattr(transformers, name, None)
    except Exception:  # a lazy import that fails (a missing optional dependency)
        return None
    ok = isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
    return cls if ok else None


def _remote_code_keys(cfg: Any, where: str = "hf_config") -> list[str]:
    """Where a config asks for code from outside transformers (``auto_map``, ``trust_remote_code``)."""
    found = []
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k in ("auto_map", "trust_remote_code") and v:
                found.append(f"{where}.{k}")
            found += _remote_code_keys(v, f"{where}.{k}")
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            found += _remote_code_keys(v, f"{where}[{i}]")
    return found


def check_loadable(src: ModelSource, *, trust_code: bool, where: str) -> None:
    """Refuse a source read from a file that would run code the file names, before anything is imported.

    A ``module:factory`` source imports that module and calls the function: only with ``trust_code=True``.
    A timm name must be a model timm registers (and its kwargs plain JSON values); a Hugging Face source
    must name a model class of ``transformers`` itself with a config that asks for no remote code."""
    if src.kind == "factory":
        if not trust_code:
            mod, _, fn = src.name.partition(":")
            raise UntrustedCodeError(
                f"{where} rebuilds its base model by importing module {mod!r} and calling its function {fn!r}"
                f"{' with ' + _short(src.kwargs) if src.kwargs else ''}; loading never runs code named by a file "
                f"unless asked: pass trust_code=True (--trust-code) if you trust this file and that module")
        return
    if src.kind == "timm":
        import timm

        if not timm.is_model(src.name):
            raise SavedModelError(f"{where} names the base model {src.name!r}, which is not a timm model (timm "
                                  f"{timm.__version__}); it was saved with another timm, or edited")
        return
    if src.kind == "hf":
        if _hf_model_class(src.hf_class) is None:
            raise SavedModelError(f"{where} names the base model class {src.hf_class!r}, which is not a model class "
                                  f"of transformers; localify rebuilds Hugging Face models from transformers' own "
                                  f"classes only (no remote code)")
        remote = _remote_code_keys(src.hf_config)
        if remote:
            raise SavedModelError(f"{where} holds a Hugging Face config that asks for remote code ({', '.join(remote)}"
                                  f"); localify never loads remote code: rebuild the model from a transformers class")
        cls = _hf_model_class(src.hf_class)
        want = getattr(getattr(cls, "config_class", None), "model_type", None)
        got = (src.hf_config or {}).get("model_type")
        if want and got and want != got:
            raise SavedModelError(f"{where} pairs the class {src.hf_class} (model_type {want!r}) with a config of "
                                  f"model_type {got!r}; the recipe is corrupt or was edited")
        return
    raise SavedModelError(f"{where} names an unknown model source kind {src.kind!r}")


def _short(kwargs: dict) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) <= 80 else text[:77] + "..."


def _check_hf_files(name: str, error: type[Exception]) -> None:
    """Every file of a local Hugging Face directory is a regular file (transformers would block on a FIFO)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return
    for f in sorted(path.iterdir()):
        try:
            mode = f.stat().st_mode
        except OSError:
            continue  # a dangling link: transformers reports what it misses
        if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
            raise error(f"{f} is a {file_kind(mode)}, not a regular file; a Hugging Face directory holds files")


def hf_has_weights(name: str) -> bool | None:
    """Whether a Hugging Face directory holds weight files; None for a hub id (only loading tells)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def _hf_pretrained(cls: type, cfg: Any, name: str) -> nn.Module:
    """``cls.from_pretrained`` from a local directory or the local cache only; the config is the source's.

    As with timm's ``num_classes``, a task head of another size (``num_labels`` overridden) is re-initialised;
    a backbone weight of another shape is an error."""
    _check_hf_files(name, CheckpointError)
    if hf_has_weights(name) is False:
        raise CheckpointError(f"{name} holds a config but no weights (*.safetensors or *.bin)")
    where = name if Path(name).expanduser().is_dir() else f"the local cache for {name!r}"
    try:
        model, info = cls.from_pretrained(name, config=cfg, local_files_only=True, ignore_mismatched_sizes=True,
                                          output_loading_info=True)
    except Exception as e:  # missing files, a corrupt file
        raise CheckpointError(f"cannot load the weights in {where} (no download is tried): {first_line(e)}"
                              ) from None
    prefix = getattr(model, "base_model_prefix", "")
    has_head = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)
    bad = sorted(k for k, *_ in info.get("mismatched_keys", ()) if not has_head or k.startswith(prefix + "."))
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise CheckpointError(f"the weights in {where} do not fit the model built from its config: {len(bad)} "
                              f"backbone tensor(s) have other shapes ({shown}); check the config overrides")
    return model


def _call_factory(spec: str, kwargs: dict) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelSourceError(f"factory {spec!r} must look like 'module.path:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelSourceError(f"cannot import module {mod_name!r} for factory {spec!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ModelSourceError(f"module {mod_name!r} has no {attr!r}")
    try:
        model = fn(**kwargs)
    except TypeError as e:
        if "pretrained" in kwargs and "pretrained" in str(e):
            raise ModelSourceError(f"factory {spec!r} takes no 'pretrained' argument; load its weights with "
                                   f"checkpoint_path= instead") from None
        raise
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model



@dataclass
class BuiltModel:
    """A base model built from a source, and where its weights came from."""

    model: nn.Module
    source: ModelSource
    weights: str  # in words: "random init (...)", "pretrained weights", "checkpoint FILE", ...


def build_model(source: str | ModelSource, *, pretrained: bool | str = False,
                checkpoint_path: str | os.PathLike | None = None, **kwargs: Any) -> BuiltModel:
    """:func:`create_model` that also says where the weights came from, with the command line's policy.

    ``pretrained="auto"``: a Hugging Face model gets the weights stored with its config (directory or local
    cache) when there are any and random weights otherwise; other sources get random weights. A string that
    names an existing path (not ``hf:``) is refused with what to pass instead. The model is in eval mode.
    """
    if isinstance(source, str) and not source.startswith("hf:") and ":" not in source and Path(source).exists():
        hint = (f"a Hugging Face model directory is given as hf:{source}" if (Path(source) / "config.json").exists()
                else f"a saved localify model is loaded with localify.load({source!r}) or 'localify verify'")
        raise ModelSourceError(f"{source!r} is a path, not a model name; {hint}")
    src = source if isinstance(source, ModelSource) else parse_source(source, kwargs)
    if pretrained == "auto" and src.kind == "hf" and checkpoint_path is None:
        model, weights = _hf_auto(src)
    else:
        pretrained = pretrained is True
        model = create_model(src, pretrained=pretrained, checkpoint_path=checkpoint_path)
        weights = _weights_text(src, pretrained, checkpoint_path)
    return BuiltModel(model.eval(), src, weights)


def _hf_auto(src: ModelSource) -> tuple[nn.Module, str]:
    """An ``hf:`` model with the weights stored with its config, or random weights if there are none."""
    has_weights = hf_has_weights(src.name)  # None for a hub id: only loading tells
    if has_weights is False:
        return create_model(src), f"random init ({src.name} holds a config but no weights)"
    try:
        return create_model(src, pretrained=True), f"Hugging Face weights from {src.name}"
    except CheckpointError:
        if has_weights:  # a directory whose weights do not load
            raise
        return create_model(src), f"random init (no weights for {src.name} in the local cache)"


def _weights_text(src: ModelSource, pretrained: bool, checkpoint: Any) -> str:
    parts = []
    if pretrained:
        parts.append("Hugging Face weights from " + src.name if src.kind == "hf" else "pretrained weights")
    if checkpoint is not None:
        parts.append(f"checkpoint {checkpoint}")
    if not parts:
        return "random init (pass --pretrained or --checkpoint FILE for pretrained weights)"
    return ", then ".join(parts)
