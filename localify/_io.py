"""Saving and loading converted models without pickle: safetensors weights plus a JSON recipe.

A saved model is either one file (``model.safetensors``, or ``model.pt`` holding the same safetensors bytes)
whose metadata carries the recipe, or a directory (Hugging Face ``save_pretrained`` layout, or
``model.safetensors``) with ``localify_recipe.json`` beside the weights. The recipe names the base model's
source (timm name and kwargs, a Hugging Face config, or ``module:factory``), the localify configuration, every
converted site and the library versions. Loading rebuilds the base, replays the conversion without tracing,
and loads the weights strictly. Writes are atomic: a failure leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._convert import fuse
from ._plan import SiteRecord
from ._sources import ModelSource, create_model, get_source, set_source
from ._splice import get_state, localify_modules, locality_keys, splice
from ._variants import LocalifyConfig
from .errors import CheckpointError, SavedModelError, first_line

__all__ = ["save", "load", "load_checkpoint", "read_recipe", "FORMAT_VERSION"]

FORMAT = "localify"
FORMAT_VERSION = 1
RECIPE_KEY = "localify_recipe"
RECIPE_FILE = "localify_recipe.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHT_SETS = ("all", "locality", "trainable")


def _versions() -> dict:
    import timm
    import transformers

    from . import __version__

    return {"localify": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__}


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: str | ModelSource | None = None,
    weights: str = "all",
    force: bool = False,
) -> Path:
    """Save a converted model: weights (safetensors) and the recipe that rebuilds it.

    ``path`` ending in ``.safetensors`` or ``.pt`` gives one file; any other path gives a directory (the
    Hugging Face ``save_pretrained`` layout for HF models). ``weights="locality"`` stores only the parameters
    localify added and ``"trainable"`` only those with ``requires_grad`` (plus localify's buffers); load them
    onto the base checkpoint with ``load(path, base_checkpoint=...)``. An existing output is never
    overwritten unless ``force=True``; the write is atomic.

    Example::

        >>> localify.save(model, "deit_local.safetensors")
        >>> model = localify.load("deit_local.safetensors")
    """
    if weights not in WEIGHT_SETS:
        raise SavedModelError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_SETS)}")
    state = get_state(model)
    if state is None:
        raise SavedModelError(f"{type(model).__name__} was not converted by localify; convert it first "
                              f"(or save it with torch / save_pretrained)")
    src = _resolve_source(model, source)
    path = Path(path)
    if path.exists() and not force:
        raise SavedModelError(f"{path} already exists; pass force=True (--force) to overwrite it")
    if path.is_dir() and any(path.iterdir()) and not (path / RECIPE_FILE).exists():
        raise SavedModelError(f"{path} is a non-empty directory that is not a localify save; refusing to replace it")
    if not path.parent.exists():
        raise SavedModelError(f"cannot write {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise SavedModelError(f"cannot write {path}: directory {path.parent} is not writable")

    tensors = _select_weights(model, weights)
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "base": src.to_dict(),
        "config": state.config.to_dict(),
        "sites": [asdict(r) for r in state.sites],
        "fused": state.fused or any(m.fused for _, m in localify_modules(model)),
        "weights": weights,
    }
    text = json.dumps(recipe)
    if path.suffix in (".safetensors", ".pt"):
        _atomic_file(path, lambda tmp: _write_safetensors(tensors, tmp, {RECIPE_KEY: text}))
    else:
        _atomic_dir(path, lambda tmp: _write_dir(model, src, tensors, tmp, text, weights))
    return path


def _resolve_source(model: nn.Module, source: str | ModelSource | None) -> ModelSource:
    from ._sources import parse_source

    if isinstance(source, str):
        return parse_source(source)
    if isinstance(source, ModelSource):
        return source
    src = get_source(model)
    if src is None:
        raise SavedModelError(
            f"cannot tell how to rebuild {type(model).__name__}: pass source= (a timm name, 'hf:PATH', "
            f"'module:factory' or a ModelSource), or build the model with localify.create_model()"
        )
    return src


def _select_weights(model: nn.Module, weights: str) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if weights == "all":
        keys = list(sd)
    elif weights == "locality":
        keys = locality_keys(model)
    else:
        train = {n for n, p in model.named_parameters() if p.requires_grad}
        keys = [k for k in sd if k in train] + [k for k in locality_keys(model) if k not in train]
    out, seen = {}, {}
    for k in keys:
        t = sd[k].detach()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[k] = t.clone().contiguous() if ptr in seen else t.contiguous()  # safetensors refuses shared memory
        seen[ptr] = k
    return out


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def _write_dir(model: nn.Module, src: ModelSource, tensors: dict, tmp: Path, text: str, weights: str) -> None:
    tmp.mkdir()
    cfg = getattr(model, "config", None)
    if src.kind == "hf" and hasattr(cfg, "save_pretrained"):
        cfg.save_pretrained(tmp)  # config.json, as save_pretrained writes it
    # the weights keep the model's own state-dict names (save_pretrained may rename them for older versions)
    _write_safetensors(tensors, tmp / WEIGHTS_FILE, {RECIPE_KEY: text, "format": "pt"})
    (tmp / RECIPE_FILE).write_text(text)


def _atomic_file(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_dir(path: Path, write) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.rmdir()
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old) if path.is_dir() else path.unlink()
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------- load
def _check_safetensors(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as e:
        raise SavedModelError(f"cannot read {path}: {e.strerror}") from None
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return  # a safetensors header: 8-byte length, then JSON
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise SavedModelError(
            f"{path} holds a pickled payload (torch.save); localify never unpickles saved models. Save with "
            f"localify.save(), or load plain weights as a checkpoint (weights_only=True)"
        )
    raise SavedModelError(f"{path} is not a safetensors file (corrupt or truncated)")


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe of a saved model (file or directory), validated."""
    path = Path(path)
    if not path.exists():
        raise SavedModelError(f"{path} does not exist")
    if path.is_dir():
        f = path / RECIPE_FILE
        if not f.exists():
            raise SavedModelError(f"{path} is a directory without {RECIPE_FILE}: not a model saved by localify")
        try:
            recipe = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise SavedModelError(f"cannot read {f}: {e}") from None
    else:
        _check_safetensors(path)
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
        except Exception as e:
            raise SavedModelError(f"{path} is not a readable safetensors file: {e}") from None
        if RECIPE_KEY not in meta:
            raise SavedModelError(f"{path} holds weights but no localify recipe: not a model saved by localify")
        try:
            recipe = json.loads(meta[RECIPE_KEY])
        except ValueError as e:
            raise SavedModelError(f"the recipe in {path} is corrupt: {e}") from None
    if recipe.get("format") != FORMAT:
        raise SavedModelError(f"{path} is not a localify recipe (format {recipe.get('format')!r})")
    ver = recipe.get("format_version")
    if not isinstance(ver, int) or ver > FORMAT_VERSION:
        made = recipe.get("versions", {}).get("localify", "?")
        raise SavedModelError(
            f"{path} was saved by localify {made} with recipe format {ver}, newer than this localify reads "
            f"({FORMAT_VERSION}); upgrade localify"
        )
    return recipe


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SavedModelError(f"{path} holds no .safetensors weights")
        out: dict[str, torch.Tensor] = {}
        for f in files:
            _check_safetensors(f)
            out.update(load_file(str(f)))
        return out
    return load_file(str(path))


def load(path: str | os.PathLike, *, base_checkpoint: str | os.PathLike | dict | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`: base model, conversion replayed, weights loaded strictly.

    Nothing is unpickled. For a save with ``weights="locality"`` / ``"trainable"``, ``base_checkpoint``
    (a file or a state dict of the original model) is loaded into the base first. The model comes back in
    eval mode.
    """
    path = Path(path)
    recipe = read_recipe(path)
    tensors = _read_weights(path)
    src = ModelSource.from_dict(recipe["base"])
    model = create_model(src)
    if recipe.get("weights", "all") != "all":
        if base_checkpoint is None:
            raise SavedModelError(
                f"{path} stores only the {recipe['weights']} weights; pass base_checkpoint= (the original "
                f"model's weights; --checkpoint on the command line) to load it"
            )
        load_checkpoint(model, base_checkpoint)
    model.eval()
    replay(model, recipe)
    set_source(model, src)
    _load_state(model, tensors, strict=recipe.get("weights", "all") == "all", where=str(path))
    return model


def replay(model: nn.Module, recipe: dict) -> nn.Module:
    """Apply a recipe's conversion to a fresh base model, without tracing."""
    try:
        config = LocalifyConfig.from_dict(recipe["config"])
        records = [SiteRecord(**r) for r in recipe["sites"]]
        splice(model, config, records)
    except (AttributeError, KeyError, TypeError) as e:
        raise SavedModelError(f"the recipe does not fit the rebuilt base model: {e}") from None
    if recipe.get("fused"):
        was = model.training
        model.eval()
        fuse(model)
        model.train(was)
    return model


def _load_state(model: nn.Module, tensors: dict, *, strict: bool, where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in tensors] if strict else []
    unexpected = [k for k in tensors if k not in own]
    bad = [k for k in tensors if k in own and tuple(own[k].shape) != tuple(tensors[k].shape)]
    if missing or unexpected or bad:
        raise SavedModelError(_mismatch(where, missing, unexpected, bad))
    model.load_state_dict(tensors, strict=strict)


def _mismatch(where: str, missing: list, unexpected: list, bad: list) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
    return f"the weights in {where} do not fit the model: " + "; ".join(parts)


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | dict) -> nn.Module:
    """Load pretrained weights into a base model: ``.safetensors``, or ``.pth``/``.bin``/``.pt`` read with
    ``weights_only=True``. Keys that do not fit raise :class:`CheckpointError` naming them."""
    if isinstance(checkpoint, dict):
        state, where = checkpoint, "the given state dict"
    else:
        path = Path(checkpoint)
        where = str(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        state = _read_checkpoint(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    if set(state) != set(own) and not isinstance(checkpoint, dict):
        state = _hf_renamed(model, Path(checkpoint)) or state
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise CheckpointError(
            _mismatch(where, missing, unexpected, bad).replace("the weights in", "the checkpoint").replace(
                "do not fit", "does not fit"))
    model.load_state_dict(state, strict=True)
    return model


def _hf_renamed(model: nn.Module, path: Path) -> dict[str, torch.Tensor] | None:
    """A Hugging Face checkpoint file read the way ``from_pretrained`` reads it: transformers 5 renames the
    4.x-style keys that ``save_pretrained`` and the hub files use. None if ``model`` is not a HF model."""
    cfg = getattr(model, "config", None)
    if not hasattr(type(model), "from_pretrained") or not hasattr(cfg, "save_pretrained"):
        return None
    name = "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        os.symlink(path.resolve(), Path(tmp) / name)
        try:
            ref = type(model).from_pretrained(tmp, local_files_only=True)
        except Exception:
            return None
    return ref.state_dict()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not os.access(path, os.R_OK) or path.is_dir():
        raise CheckpointError(f"cannot read checkpoint {path}: not a readable file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"cannot load checkpoint {path} with weights_only=True: it is neither a PyTorch "
                              f"checkpoint nor safetensors (corrupt, truncated or another format)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path} with weights_only=True: {first_line(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj
