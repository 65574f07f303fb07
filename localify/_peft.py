"""Parameter-efficient retrofit: train only what localify added (optionally with the classifier head), or add
LoRA with PEFT (:func:`lora_targets` points PEFT at the layers it can wrap and merge exactly).

:func:`mark_trainable` freezes a converted model except its new locality parameters (the depth-wise kernels
of ``dwconv`` / ``residual`` blocks, the whole ``localvit`` blocks) and, with ``head=True``, the classifier.
It returns a :class:`TrainableReport` (PEFT's ``print_trainable_parameters`` as a value: localify never
prints). Such a model can be saved with ``localify.save(model, path, weights="trainable")``: only the trained
tensors and the recipe are stored, and ``localify.load(path, base_checkpoint=...)`` rebuilds the model on top
of the original weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ._splice import localify_modules, locality_keys
from .errors import ConfigError

__all__ = ["mark_trainable", "lora_targets", "TrainableReport", "find_classifier", "locality_parameter_names"]

MODES = ("locality", "all")
# top-level attributes that hold the classification head in Hugging Face and common user models
HEAD_ATTRS = ("classifier", "cls_classifier", "distillation_classifier", "head", "head_dist", "heads",
              "classification_head", "fc", "logits")


@dataclass(frozen=True)
class TrainableReport:
    """How many parameters train (``requires_grad``) out of all; ``str()`` gives PEFT's one-line summary."""

    trainable: int
    total: int
    mode: str = "locality"
    head: tuple[str, ...] = ()  # module paths of the classifier head made trainable
    trainable_names: tuple[str, ...] = field(default=(), repr=False)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.fraction

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")

    @classmethod
    def of(cls, model: nn.Module, mode: str = "custom", head: Iterable[str] = ()) -> TrainableReport:
        """The report for ``model`` as it stands (shared parameters counted once)."""
        params = list(model.named_parameters())
        names = tuple(n for n, p in params if p.requires_grad)
        return cls(sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params),
                   mode, tuple(head), names)


def locality_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters localify added: the depth-wise kernels of ``LocalityLinear`` (not the wrapped
    projection) and every parameter of a ``LocalViTFFN``."""
    params = {n for n, _ in model.named_parameters()}
    return [k for k in locality_keys(model) if k in params]


def find_classifier(model: nn.Module) -> list[str]:
    """Module paths of the classification head(s) of ``model`` ([] if none is found).

    timm: ``model.get_classifier()`` (a module, or a tuple for distilled models). Hugging Face and user
    models: a top-level child named ``classifier``, ``cls_classifier`` / ``distillation_classifier`` (DeiT with
    teacher), ``head``, ``heads``, ``fc``...; else the last top-level ``nn.Linear`` whose output size is the
    number of labels (``config.num_labels`` / ``num_classes``).
    """
    paths = {id(m): n for n, m in model.named_modules()}
    found: list[str] = []

    def add(mod: object) -> None:
        if isinstance(mod, nn.Module) and id(mod) in paths and any(True for _ in mod.parameters()):
            if paths[id(mod)] and paths[id(mod)] not in found:
                found.append(paths[id(mod)])

    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:
            head = None
        for h in head if isinstance(head, (tuple, list)) else (head,):
            add(h)
        if found:
            return found
    children = dict(model.named_children())
    for attr in HEAD_ATTRS:
        add(children.get(attr))
    if found:
        return found
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_labels", None) or getattr(model, "num_classes", None)
    if n:
        last = None
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and mod.out_features == n and "." not in name:
                last = name
        if last:
            found.append(last)
    return found


def mark_trainable(model: nn.Module, which: str = "locality", head: bool | str | Iterable[str] = False
                   ) -> TrainableReport:
    """Choose what trains, in place: ``which="locality"`` freezes everything except the parameters localify
    added (and the classifier head with ``head=True``, or the modules named by ``head``); ``which="all"``
    unfreezes everything. Returns a :class:`TrainableReport`; ``str(report)`` reads
    ``trainable params: 12,345 || all params: 5,678,901 || trainable%: 0.2174``.

    BatchNorm running statistics of ``localvit`` blocks still update in train mode (they belong to the new
    blocks). Save the result with ``localify.save(model, path, weights="trainable")`` to store only the
    trained tensors.

    Raises:
        ConfigError: an unknown ``which``, a model without localify blocks (``"locality"``), ``head=True`` on a
            model whose classifier cannot be found, or a ``head`` path that does not exist.

    Example::

        >>> report = localify.mark_trainable(model, "locality", head=True)
        >>> str(report)
        'trainable params: 45,610 || all params: 5,762,410 || trainable%: 0.7915'
    """
    if which not in MODES:
        raise ConfigError(f"mark_trainable: which={which!r}; choose one of {', '.join(MODES)}")
    if which == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return TrainableReport.of(model, "all")

    names = set(locality_parameter_names(model))
    if not names:
        raise ConfigError(f"{type(model).__name__} has no localify blocks (no locality parameters to train); "
                          f"convert it with localify.localify() first")
    if head is True:
        heads = find_classifier(model)
        if not heads:
            raise ConfigError(
                f"head=True: no classifier head found in {type(model).__name__} (no get_classifier(), no "
                f"top-level {'/'.join(HEAD_ATTRS[:4])}, ...); pass its module path, e.g. head='classifier'")
    elif head is False or head is None:
        heads = []
    else:
        heads = [head] if isinstance(head, str) else list(head)
        for h in heads:
            try:
                model.get_submodule(h)
            except AttributeError:
                raise ConfigError(f"head={h!r}: {type(model).__name__} has no such module") from None
    for n, p in model.named_parameters():
        p.requires_grad_(n in names or any(n.startswith(h + ".") for h in heads))
    return TrainableReport.of(model, "locality", heads)


def lora_targets(model: nn.Module, names: Iterable[str]) -> list[str]:
    """``target_modules`` for PEFT's ``LoraConfig`` on a converted model: each name (matched as PEFT matches
    it, the full module path or its last parts) that lands on a localify module is redirected to the original
    layer it wraps (``fc1`` -> ``fc1.linear``), where LoRA is exact to merge; other names pass unchanged.

    PEFT cannot wrap a ``LocalityLinear`` itself, and a LoRA branch around it would bypass the depth-wise conv,
    so that ``merge_and_unload()`` could not reproduce it. Inside, ``merge_and_unload()`` folds the adapter
    into the original projection and the converted model is exactly what was trained.

    Raises:
        ConfigError: a name lands on a localify module that keeps no original layer (``localvit`` blocks:
            target their own ``fc1`` / ``fc2`` Linears by full name instead).

    Example::

        >>> cfg = peft.LoraConfig(r=8, target_modules=localify.lora_targets(model, ["qkv", "fc1", "fc2"]))
        >>> model = peft.get_peft_model(model, cfg)
    """
    wrappers = {n: m for n, m in localify_modules(model)}
    out: list[str] = []
    for target in names:
        hits = [n for n in wrappers if n == target or n.endswith("." + target)]
        if not hits:
            out.append(target)
            continue
        for n in hits:
            base = wrappers[n].get_base_layer()
            inner = next((c for c, m in wrappers[n].named_children() if m is base), None)
            if inner is None:
                raise ConfigError(f"LoRA target {target!r} is the localify block {n} ({type(wrappers[n]).__name__}), "
                                  f"which replaced the original layer; target its own projections by full name "
                                  f"(e.g. '{n}.fc1')")
            out.append(f"{target}.{inner}")
    return list(dict.fromkeys(out))
