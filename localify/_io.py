"""Saving and loading converted models without pickle: safetensors weights plus a JSON recipe.

A saved model is either one file (``model.safetensors``, or ``model.pt`` holding the same safetensors bytes)
whose metadata carries the recipe, or a directory (``model.safetensors``, ``localify_recipe.json`` and, for a
Hugging Face model, its ``config.json``). The recipe names the base model's source (timm name and kwargs, a
Hugging Face config, or ``module:factory``), the localify configuration, every converted site and the
library versions; its schema is in :mod:`localify._recipe`. Loading rebuilds the base, replays the
conversion without tracing, and loads the weights strictly.

What a saved model guarantees:

* Loading runs no code the file names: a ``module:factory`` source needs ``load(..., trust_code=True)``; timm
  names and Hugging Face classes resolve only to what timm / transformers register (no ``auto_map``).
* It is exactly what was saved: the recipe holds a SHA-256 of every tensor (name, dtype, shape, bytes), and a
  directory's recipe lists every file it wrote with its size and SHA-256; a stray, missing or altered file
  is an error naming it. (In the one-file form the safetensors header already fixes every tensor's name,
  dtype, shape and byte range, and the tensor digest covers the bytes.)
* It rebuilds the same function: a source that localify inferred (not given by ``source=``) is checked at
  save time by rebuilding the model from the recipe and comparing one forward (once per model and
  conversion: later checkpoints of the same model skip it).
* Writes are atomic, even under SIGKILL: everything is written inside one temp directory
  ``.NAME.localify-tmp-PID-XXXX`` next to the output (safetensors' own temp file included), fsynced, and
  moved over the output with one rename (``renameat2(RENAME_EXCHANGE)`` for a directory). A temp directory
  left by a killed save (its process is gone) is removed by the next save to the same output.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checkpoint import load_checkpoint, mismatch_message
from ._convert import fuse
from ._paths import check_input_file, check_output_path
from ._plan import SiteRecord
from ._recipe import (
    FORMAT,
    FORMAT_VERSION,
    RECIPE_FILE,
    RECIPE_KEY,
    WEIGHT_SETS,
    WEIGHTS_FILE,
    json_text,
    validate,
)
from ._sources import ModelSource, check_loadable, create_model, get_source, parse_source, set_source
from ._splice import get_state, localify_modules, locality_keys, splice
from ._trace import eval_mode, make_example_inputs
from ._variants import LocalifyConfig
from ._version import __version__
from .errors import LocalifyError, SavedModelError, first_line

__all__ = ["save", "check_save_path", "load", "load_checkpoint", "read_recipe", "FORMAT_VERSION", "RECIPE_FILE", "FILE_SUFFIXES"]

FILE_SUFFIXES = (".safetensors", ".pt")
HF_CONFIG_FILE = "config.json"
V1_FILES = (RECIPE_FILE, WEIGHTS_FILE, HF_CONFIG_FILE)  # what a format-1 directory save could hold
TMP_TAG = ".localify-tmp-"
CHECKED_ATTR = "_localify_rebuild_checked"  # the recipe an inferred source was proven to rebuild
_INFLIGHT: set[str] = set()  # names of the temp directories this process is writing now


def _versions() -> dict:
    import timm
    import transformers

    return {"localify": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__}


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor in name order: its name, dtype, shape and bytes (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- save
def check_save_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """The rule :func:`save` applies to its output, checked without saving (so that a long job can refuse a
    bad output before it starts): ``.safetensors`` / ``.pt`` is one file, a name without a suffix a directory;
    an existing output needs ``force``; a non-empty directory that is not a localify save is never replaced."""
    return check_output_path(path, suffixes=FILE_SUFFIXES, directory=RECIPE_FILE, force=force)


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: str | ModelSource | None = None,
    weights: str = "all",
    force: bool = False,
) -> Path:
    """Save a converted model: weights (safetensors) and the recipe that rebuilds it.

    ``path`` ending in ``.safetensors`` or ``.pt`` gives one file; a name without a suffix gives a directory
    (``model.safetensors``, ``localify_recipe.json``, and ``config.json`` for Hugging Face models); other
    suffixes are refused. ``weights="locality"`` stores only the parameters localify added and
    ``"trainable"`` only those with ``requires_grad`` (plus localify's buffers); load them onto the base
    checkpoint with ``load(path, base_checkpoint=...)``. An existing output is never overwritten unless
    ``force=True``; the write is atomic. When the base model's source was inferred (a timm model built
    without :func:`localify.create_model`, a Hugging Face model), the model is rebuilt from the recipe and
    one forward compared first; pass ``source=`` if that fails. Nothing is written if any check fails.

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
    path = check_save_path(path, force=force)
    src = _resolve_source(model, source)
    tensors = _select_weights(model, weights)
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": _versions(),
        "base": src.to_dict(),
        "config": state.config.to_dict(),
        "sites": [r.to_dict() for r in state.sites],
        "fused": state.fused or any(m.fused for _, m in localify_modules(model)),
        "weights": weights,
        "weights_sha256": tensor_digest(tensors),
    }
    origin = f"cannot save {path}"
    text = json_text(recipe, origin)
    recipe = validate(json.loads(text), form="file", origin=origin,
                      hint="check source= and the model's conversion")  # exactly what load will check
    if source is None and src.inferred:
        key = json.dumps([recipe[k] for k in ("base", "config", "sites", "fused")])
        if getattr(model, CHECKED_ATTR, None) != key:  # checked once per model and conversion
            _check_rebuilds(model, src, recipe, path)
            object.__setattr__(model, CHECKED_ATTR, key)

    _remove_stale_temps(path)
    if path.suffix in FILE_SUFFIXES:
        _save_file(path, tensors, text)
    else:
        _save_dir(path, model, src, tensors, recipe, text)
    return path


def _resolve_source(model: nn.Module, source: str | ModelSource | None) -> ModelSource:
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


def _outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a forward's output (tensor, tuple/list, dict or Hugging Face ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _outputs(v)]
    return []


def _check_rebuilds(model: nn.Module, src: ModelSource, recipe: dict, path: Path) -> None:
    """Rebuild ``model`` from an inferred source and the recipe, load its weights and compare one forward."""
    how = ("from its parameter shapes (the timm architecture with default options)" if src.kind == "timm"
           else "from its config")
    if src.kind == "timm":
        ask = (f"pass source= (a ModelSource with the options the model was built with, e.g. "
               f"ModelSource('timm', {src.name!r}, {{'act_layer': 'relu'}}), or 'module:factory'), or build the "
               f"model with localify.create_model()")
    else:
        ask = "pass source= ('hf:PATH_OR_ID' it was built from, a ModelSource or 'module:factory')"
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        try:
            rebuilt = create_model(src)
            replay(rebuilt, recipe)
            p = next((t for t in model.parameters() if t.is_floating_point()), None)
            if p is not None:
                rebuilt.to(device=p.device, dtype=p.dtype)
            rebuilt.load_state_dict(model.state_dict(), strict=True)
            example = make_example_inputs(model)
            with torch.no_grad(), eval_mode(model):
                want = _outputs(model(*example.args, **example.kwargs))
                got = _outputs(rebuilt.eval()(*example.args, **example.kwargs))
        except Exception as e:  # anything that keeps the recipe from rebuilding this model
            raise SavedModelError(f"cannot save {path}: its base model source {src.describe()} was inferred {how}, "
                                  f"and rebuilding from it failed ({first_line(e, 200)}); {ask}") from None
    tol = 1e-5 if p is None or p.dtype in (torch.float32, torch.float64) else 1e-2
    worst = None
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
        worst = "other output shapes"
    else:
        for a, b in zip(want, got):
            if not a.is_floating_point():
                worst = worst or (None if torch.equal(a, b) else "other integer outputs")
                continue
            a, b = a.double(), b.double()
            if not torch.equal(a.isnan(), b.isnan()):
                worst = "NaN in other places"
                break
            a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
            diff, scale = (a - b).abs().max().item(), a.abs().max().item()
            if diff != 0 and not diff <= tol * scale:
                worst = f"outputs differ by up to {diff:.3g} at output scale {scale:.3g}"
                break
    if worst is not None:
        raise SavedModelError(
            f"cannot save {path}: its base model source {src.describe()} was inferred {how}, but the model "
            f"rebuilt from it computes another function ({worst}): it was built with options its shapes do not "
            f"show (act_layer, global_pool, ...); {ask}")


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file (safetensors writes a ``.tmpXXXX`` beside it first: inside our temp dir)."""
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors' temp file is 0600; give the file the usual permissions


def _save_file(path: Path, tensors: dict, text: str) -> None:
    tmp = _new_temp(path)
    try:
        target = tmp / path.name
        _write_safetensors(tensors, target, {RECIPE_KEY: text})
        _fsync(target)
        os.replace(target, path)
        _fsync(path.parent)
    finally:
        _drop_temp(tmp)


def _save_dir(path: Path, model: nn.Module, src: ModelSource, tensors: dict, recipe: dict, text: str) -> None:
    tmp = _new_temp(path)
    try:
        cfg = getattr(model, "config", None)
        if src.kind == "hf" and hasattr(cfg, "save_pretrained"):
            cfg.save_pretrained(tmp)  # config.json, as save_pretrained writes it
        # the weights keep the model's own state-dict names (save_pretrained may rename them for older versions)
        _write_safetensors(tensors, tmp / WEIGHTS_FILE, {RECIPE_KEY: text, "format": "pt"})
        files = {}
        for f in sorted(tmp.iterdir()):
            if f.is_symlink() or not f.is_file():
                raise SavedModelError(f"cannot save {path}: writing it left {f.name}, which is not a regular file")
            _fsync(f)
            files[f.name] = {"size": f.stat().st_size, "sha256": _file_sha256(f)}
        (tmp / RECIPE_FILE).write_text(json.dumps({**recipe, "files": files}))
        _fsync(tmp / RECIPE_FILE)
        _fsync(tmp)
        _swap_in(tmp, path)
        _fsync(path.parent)
    finally:
        _drop_temp(tmp)  # after a swap it holds the old directory


# ---------------------------------------------------------------------------------------- atomic writes
def _new_temp(path: Path) -> Path:
    """A fresh temp directory beside ``path``: ``.NAME.localify-tmp-PID-XXXXXXXX``."""
    tmp = path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")
    _INFLIGHT.add(tmp.name)
    try:
        tmp.mkdir()
    except BaseException:
        _INFLIGHT.discard(tmp.name)
        raise
    return tmp


def _drop_temp(tmp: Path) -> None:
    for p in (tmp, tmp.with_name(tmp.name + "-old")):
        shutil.rmtree(p, ignore_errors=True)
        _INFLIGHT.discard(p.name)


def _fsync(path: Path) -> None:
    if os.name != "posix" and path.is_dir():
        return  # directories cannot be opened for fsync there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap, harmless liveness probe: keep the temp directory
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def stale_temps(path: Path) -> list[Path]:
    """Temp directories of earlier saves to ``path`` whose process is gone (a save killed midway)."""
    pattern = re.compile(re.escape(f".{path.name}{TMP_TAG}") + r"(\d+)-[0-9a-f]+(-old)?")
    out = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for e in entries:
        m = pattern.fullmatch(e.name)
        if m is None or e.name in _INFLIGHT:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or not _alive(pid):  # our own pid, not in flight: left by a dead process
            out.append(path.with_name(e.name))
    return out


def _remove_stale_temps(path: Path) -> None:
    for p in stale_temps(path):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux / glibc
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``; an existing ``path`` ends up at ``tmp``."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        return
    # no atomic exchange here: a kill between the two renames leaves no output (the old one is in the temp)
    old = tmp.with_name(tmp.name + "-old")
    _INFLIGHT.add(old.name)
    os.rename(path, old)
    os.rename(tmp, path)


# --------------------------------------------------------------------------------------------------- load
def _check_safetensors(path: Path) -> None:
    check_input_file(path, what="saved model", error=SavedModelError)  # a FIFO would block the read below
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


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise SavedModelError(f"the recipe in {where} is corrupt (not JSON: {first_line(e, 100)}); save the "
                              f"model again") from None


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe of a saved model (file or directory), validated field by field.

    For a directory, its files are checked against the recipe's list (names, regular files, sizes; the
    SHA-256s are checked by :func:`load`)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SavedModelError(f"{path} does not exist") from None
    except OSError as e:
        raise SavedModelError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        f = path / RECIPE_FILE
        if not os.path.lexists(f):
            raise SavedModelError(f"{path} is a directory without {RECIPE_FILE}: not a model saved by localify")
        check_input_file(f, what="recipe", error=SavedModelError)
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SavedModelError(f"cannot read {f}: {e}") from None
        recipe = validate(_parse(text, str(f)), form="dir", origin=str(path))
        _check_files(path, recipe, hashes=False)
        return recipe
    _check_safetensors(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:
        raise SavedModelError(f"{path} is not a readable safetensors file: {first_line(e, 200)}") from None
    if RECIPE_KEY not in meta:
        raise SavedModelError(f"{path} holds weights but no localify recipe: not a model saved by localify")
    return validate(_parse(meta[RECIPE_KEY], str(path)), form="file", origin=str(path))


def _check_files(path: Path, recipe: dict, *, hashes: bool) -> None:
    """A directory save holds exactly the files its recipe lists (format 1: the files it could write)."""
    names = sorted(os.listdir(path))
    listed = recipe.get("files")
    known = set(listed) | {RECIPE_FILE} if listed is not None else set(V1_FILES)
    again = "copy the whole directory again, or save the model again"
    for name in names:
        if name not in known:
            raise SavedModelError(f"{path} holds {name}, which the save did not write: a directory save must hold "
                                  f"exactly its files; move {name} out of it (or {again})")
    for name in sorted(listed or {WEIGHTS_FILE: None}):
        if name not in names:
            raise SavedModelError(f"{path} lacks {name}, which the save wrote; {again}")
    for name, entry in sorted((listed or {}).items()):
        f = path / name
        st = check_input_file(f, what="saved file", error=SavedModelError)
        if st.st_size != entry["size"]:
            raise SavedModelError(f"{f} has {st.st_size} bytes but the save wrote {entry['size']}: it was altered or "
                                  f"truncated; {again}")
        if hashes and _file_sha256(f) != entry["sha256"]:
            raise SavedModelError(f"{f} is not the file the save wrote (its SHA-256 differs): it was altered; {again}")


def _read_weights(path: Path, recipe: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.is_dir():
        _check_files(path, recipe, hashes=True)
        f = path / WEIGHTS_FILE
        _check_safetensors(f)
    else:
        f = path
    try:
        tensors = load_file(str(f))
    except Exception as e:
        raise SavedModelError(f"{f} is not a readable safetensors file: {first_line(e, 200)}") from None
    if not path.is_dir() and "weights_sha256" in recipe and tensor_digest(tensors) != recipe["weights_sha256"]:
        raise SavedModelError(f"{path}: the weights are not those the save wrote (their SHA-256 differs): the file "
                              f"was altered or damaged; save the model again")
    return tensors


def load(path: str | os.PathLike, *, base_checkpoint: str | os.PathLike | dict | None = None,
         trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save`: base model, conversion replayed, weights loaded strictly.

    Nothing is unpickled, and no code the file names runs: a model saved from a ``module:factory`` source
    imports that module and calls the function, which needs ``trust_code=True`` (like transformers'
    ``trust_remote_code``); otherwise :class:`~localify.errors.UntrustedCodeError`. For a save with
    ``weights="locality"`` / ``"trainable"``, ``base_checkpoint`` (a file or a state dict of the original
    model) is loaded into the base first. The model comes back in eval mode.
    """
    path = Path(path)
    recipe = read_recipe(path)
    src = ModelSource.from_dict(recipe["base"])
    check_loadable(src, trust_code=trust_code, where=str(path))
    if recipe["weights"] != "all" and base_checkpoint is None:
        raise SavedModelError(
            f"{path} stores only the {recipe['weights']} weights; pass base_checkpoint= (the original "
            f"model's weights; --checkpoint on the command line) to load it"
        )
    tensors = _read_weights(path, recipe)
    model = create_model(src)
    if recipe["weights"] != "all":
        load_checkpoint(model, base_checkpoint)
    model.eval()
    try:
        replay(model, recipe)
    except SavedModelError:
        raise
    except (LocalifyError, AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise SavedModelError(f"{path}: the recipe does not fit the rebuilt base model {src.describe()}: "
                              f"{first_line(e, 200)}") from None
    set_source(model, src)
    _load_state(model, tensors, strict=recipe["weights"] == "all", where=str(path))
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
        raise SavedModelError(mismatch_message(where, missing, unexpected, bad))
    model.load_state_dict(tensors, strict=strict)
