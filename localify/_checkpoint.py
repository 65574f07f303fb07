"""Reading plain checkpoints (pretrained weights of a base model) without ever unpickling code.

``.safetensors`` files are read with safetensors; ``.pth`` / ``.bin`` / ``.pt`` with ``torch.load(...,
weights_only=True)``. Only regular files are opened (a FIFO would block forever). Keys that do not fit the
model raise :class:`~localify.errors.CheckpointError` naming them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._paths import check_input_file
from .errors import CheckpointError, first_line

__all__ = ["load_tensors", "load_checkpoint", "mismatch_message"]


def mismatch_message(where: str, missing: list, unexpected: list, bad: list) -> str:
    """``the weights in WHERE do not fit the model: 2 missing (a, b); 1 wrong shape (c)``."""
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
            mismatch_message(where, missing, unexpected, bad).replace("the weights in", "the checkpoint").replace(
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


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a file by name, never unpickling: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` read
    with ``weights_only=True`` (a dict of tensors). Raises :class:`CheckpointError` for anything else."""
    obj = _read_checkpoint(Path(path))
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} holds {bad[0]!r}, which is not a tensor; expected tensors by name")
    return obj


def _read_checkpoint(path: Path) -> dict[str, Any]:
    check_input_file(path, what="checkpoint", error=CheckpointError)  # exists, a regular file (not a FIFO)
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
