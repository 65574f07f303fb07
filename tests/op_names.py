"""A dispatch mode that records which aten (and mkldnn) ops run: for tests of which primitive a path takes."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpNames(TorchDispatchMode):
    """The names of the ops that run inside the context (``names``: e.g. ``linear``, ``convolution``)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
