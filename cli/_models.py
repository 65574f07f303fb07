"""Models on the command line: build a MODEL source with its weights (the library's policy, shown as it goes),
and tell a saved file from a source."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import localify

from ._output import Output


@dataclass
class LoadedModel:
    """A base model built from a source string, and how."""

    model: nn.Module
    source: localify.ModelSource
    requested: str  # what the user typed
    weights: str  # where the weights came from, in words

    @property
    def resolved(self) -> str:
        return self.source.describe()


def load_model(text: str, model_kwargs: dict, checkpoint: Path | None, out: Output,
               pretrained: bool = False) -> LoadedModel:
    """Build the base model of a source string (timm name or prefix, ``hf:``, ``module:factory``) with its
    weights, in eval mode: ``--pretrained`` weights, then ``--checkpoint``; an ``hf:`` model gets the weights
    stored with its config when there are any (:func:`localify.build_model` with ``pretrained="auto"``)."""
    with out.status(f"building {text}"):
        torch.manual_seed(0)
        built = localify.build_model(text, pretrained=True if pretrained else "auto", checkpoint_path=checkpoint,
                                     **model_kwargs)
    if built.source.kind == "timm" and built.source.name != text:
        out.note(f"{text} -> {built.source.name}", style="cyan")
    return LoadedModel(built.model, built.source, text, built.weights)


def is_saved_path(text: str) -> bool:
    """Whether a MODEL argument names a saved model (a file or directory) rather than a model source."""
    if text.startswith("hf:"):
        return False
    p = Path(text)
    return p.exists() or p.suffix in (".pt", ".safetensors", ".pth", ".bin") or "/" in text or os.sep in text


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
