"""``LOCALIFY_POINTWISE=measure``: the point-wise primitive chosen per kind of call by timing both in place.

The clock is replaced by one that advances by a cost per op (read by a dispatch mode), so which primitive is
"faster" is set by the test, never by the machine: these tests do not depend on timing or load.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import localify.layers as layers
from localify.layers import pointwise, pointwise_backend, pointwise_measurements, set_pointwise_backend

CONV_OPS = {"convolution", "conv2d", "mkldnn_convolution"}
LINEAR_OPS = {"linear", "addmm", "mm", "matmul"}


class CostClock(TorchDispatchMode):
    """A fake clock (``now``) that advances by ``costs["conv"]`` per convolution op and ``costs["linear"]`` per
    matrix-product op run inside the context; ``ran`` lists which primitive each op belonged to."""

    def __init__(self, conv: float, linear: float) -> None:
        super().__init__()
        self.costs = {"conv": conv, "linear": linear}
        self.t = 0.0
        self.ran: list[str] = []

    def now(self) -> float:
        return self.t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        kind = "conv" if name in CONV_OPS else "linear" if name in LINEAR_OPS else None
        if kind is not None:
            self.t += self.costs[kind]
            self.ran.append(kind)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def measure(monkeypatch):
    """``measure`` mode with a fake clock; the previous setting (and a clean table) afterwards."""
    prev = set_pointwise_backend("measure")
    layers._measured.reset()

    def use(clock: CostClock) -> CostClock:
        monkeypatch.setattr(layers._measured, "clock", clock.now)
        return clock

    yield use
    set_pointwise_backend(prev)
    layers._measured.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


INPUTS = {  # (x, batch): a (B, H, W, C) grid, (B, N, C) tokens, (R, C) rows of 2 samples
    "grid": (torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(0)), None),
    "tokens": (torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)), None),
    "rows": (torch.randn(10, 16, generator=torch.Generator().manual_seed(2)), 2),
}


@pytest.mark.parametrize("faster", ["conv", "linear"])
@pytest.mark.parametrize("kind", list(INPUTS))
def test_measure_keeps_the_faster_primitive(measure, faster, kind):
    x, batch = INPUTS[kind]
    w, b = torch.randn(24, 16), torch.randn(24)
    ref = F.linear(x, w, b)
    clock = measure(CostClock(conv=1.0 if faster == "conv" else 3.0, linear=1.0 if faster == "linear" else 3.0))
    trials = layers._measured.trials
    with torch.inference_mode(), clock:
        for i in range(2 * trials):
            assert rel_err(pointwise(x, w, b, batch), ref) <= 1e-6
            if i < 2 * trials - 1:
                assert pointwise_measurements() == {}, i  # no choice before trials calls of each
        trial_ops = list(clock.ran)
        clock.ran.clear()
        for _ in range(3):
            assert rel_err(pointwise(x, w, b, batch), ref) <= 1e-6
    assert trial_ops.count("conv") == trial_ops.count("linear") == trials  # alternated
    assert set(clock.ran) == {faster}  # then only the faster one
    (key, chosen), = pointwise_measurements().items()
    assert chosen == faster and key[0] == tuple(x.shape) and key[4] == batch
    assert pointwise_backend() == "measure"
    set_pointwise_backend("linear")  # the choice outlives a switch of the backend
    with torch.inference_mode(), clock:
        clock.ran.clear()
        pointwise(x, w, b, batch)
        assert set(clock.ran) == {"linear"}
        set_pointwise_backend("measure")
        clock.ran.clear()
        pointwise(x, w, b, batch)
        assert set(clock.ran) == {faster}
    assert pointwise_measurements() == {key: faster}


def test_measure_decides_each_kind_of_call_apart(measure):
    """Batch size, grad mode and thread count are part of the kind: each gets its own trials."""
    clock = measure(CostClock(conv=1.0, linear=2.0))
    w = torch.randn(24, 16)
    threads = torch.get_num_threads()
    calls = [(1, False, threads), (4, False, threads), (1, True, threads), (1, False, threads + 1)]
    try:
        for b, grad, n in calls:
            torch.set_num_threads(n)
            with torch.set_grad_enabled(grad), clock:
                for _ in range(2 * layers._measured.trials):
                    pointwise(torch.randn(b, 3, 4, 16), w, None)
    finally:
        torch.set_num_threads(threads)
    kinds = pointwise_measurements()
    assert set(kinds.values()) == {"conv"}
    assert {(k[0][0], k[5], k[6]) for k in kinds} == set(calls)


def test_measure_times_nothing_in_a_captured_graph(measure, monkeypatch):
    """Under torch.compile the choice is the ``auto`` one and nothing is timed (no clock in a graph)."""
    clock = measure(CostClock(conv=1.0, linear=2.0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    w = torch.randn(24, 16)
    with torch.inference_mode(), clock:
        for _ in range(3 * layers._measured.trials):
            pointwise(torch.randn(2, 3, 4, 16), w, None)
    assert pointwise_measurements() == {} and layers._measured.samples == {}
    assert set(clock.ran) == {"conv" if layers._AUTO_POINTWISE == "conv" else "linear"}


def test_measure_from_many_threads(measure):
    """Concurrent first calls share one table: every result is right and each kind is decided once."""
    clock = measure(CostClock(conv=1.0, linear=1.5))
    w, b = torch.randn(24, 16), torch.randn(24)
    xs = [torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    refs = [F.linear(x, w, b) for x in xs]
    errors = []

    def work(i: int) -> None:
        try:
            with torch.inference_mode():
                for _ in range(20):
                    assert rel_err(pointwise(xs[i], w, b), refs[i]) <= 1e-6
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    with clock:  # a dispatch mode is per thread: the workers' ops cost nothing, the table is still shared
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    kinds = pointwise_measurements()
    assert len(kinds) == 1 and layers._measured.samples == {}


def test_measure_on_a_converted_model(measure):
    """A converted model in ``measure`` mode: the first calls mix both primitives, every output matches the
    ``linear`` one, and the choice then holds for the model's projections."""
    import timm

    import localify

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                              patch_size=8, img_size=32, num_classes=5).eval()
    localify.localify(model)
    x = torch.randn(2, 3, 32, 32)
    prev = set_pointwise_backend("linear")
    with torch.inference_mode():
        ref = model(x)
    set_pointwise_backend(prev)
    clock = measure(CostClock(conv=1.0, linear=2.0))
    with torch.inference_mode(), clock:
        outs = [model(x) for _ in range(layers._measured.trials + 2)]
    assert all(rel_err(y, ref) <= 1e-5 for y in outs)
    assert set(pointwise_measurements().values()) == {"conv"} and len(pointwise_measurements()) == 2
