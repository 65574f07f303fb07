"""One converted model called from several threads at once, and from inside other models' forwards.

The run-time token grid of a converted block is recorded by a hook on its source module and read by the
block later in the same call. Calls that overlap in time (threads of an inference server) or nest (a model
called inside another forward) must each see their own grid: every output is compared with a reference
computed alone, one call at a time. Sizes with the same token count and transposed grids (4x6 and 6x4) make a
grid read from another call go unnoticed by shapes and show only in the values.
"""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from fc1_only import splice_fc1_only
from torch import nn

import localify
from localify._splice import get_state
from localify.layers import LocalityMLP

THREADS = 4
CALLS = 50
SIZES = [(64, 96), (96, 64), (64, 64), (32, 128)]  # grids 4x6, 6x4, 4x4, 2x8: 24, 24, 16, 16 tokens
TINY = dict(img_size=64, patch_size=16, depth=2, embed_dim=32, num_heads=2, dynamic_img_size=True,
            global_pool="avg", num_classes=10)  # every token reaches the output


def _randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random depth-wise kernels (and BatchNorm statistics): the identity kernels would hide a wrong grid."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def tiny_vit(variant: str = "dwconv") -> nn.Module:
    """``dwconv`` runs each MLP module as a LocalityMLP; ``dwconv-fc1`` converts fc1 only (as a save without
    ``per_token`` replays it, and as localify converts MLPs that are not one per-token module)."""
    torch.manual_seed(0)
    model = localify.create_model("vit_tiny_patch16_224", **TINY)
    name = variant.removesuffix("-fc1")
    if variant.endswith("-fc1"):
        splice_fc1_only(model, get_state(localify.localify(copy.deepcopy(model), kernel_size=3, variant=name)))
    else:
        localify.localify(model, kernel_size=3, variant=name)
    assert (type(model.blocks[0].mlp) is LocalityMLP) == (variant == "dwconv")
    return _randomise(model).eval()


def _inputs(sizes, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, h, w, generator=g) for h, w in sizes]


def _out(y):
    return y if isinstance(y, torch.Tensor) else y.last_hidden_state


def _hammer(call, inputs: list[torch.Tensor], refs: list[torch.Tensor], calls: int = CALLS) -> list[str]:
    """THREADS threads, each calling ``call`` ``calls`` times over all inputs (from its own offset), the
    calls lined up with a barrier; returns the mismatches and errors."""
    barrier = threading.Barrier(THREADS)
    bad: list[str] = []

    def work(t: int) -> None:
        with torch.no_grad():
            for i in range(calls):
                k = (t + i) % len(inputs)
                try:
                    barrier.wait(timeout=60)
                except threading.BrokenBarrierError:
                    bad.append(f"thread {t}: barrier broken")
                    return
                try:
                    y = _out(call(inputs[k]))
                except Exception as e:  # noqa: BLE001 - counted as a wrong call
                    bad.append(f"thread {t} call {i} input {tuple(inputs[k].shape)}: {type(e).__name__}: {e}")
                    continue
                if y.shape != refs[k].shape or not torch.allclose(y, refs[k], atol=1e-5):
                    bad.append(f"thread {t} call {i} input {tuple(inputs[k].shape)}: wrong values")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over often: the calls interleave op by op, not call by call
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    return bad


def _references(model, inputs):
    with torch.no_grad():
        return [_out(model(x)).clone() for x in inputs]


@pytest.mark.parametrize("variant", ["dwconv", "dwconv-fc1", "localvit"])
def test_threads_share_one_model(variant):
    model = tiny_vit(variant)
    inputs = _inputs(SIZES)
    refs = _references(model, inputs)
    assert not torch.allclose(refs[0].flatten(), refs[1].flatten(), atol=1e-3)  # 4x6 and 6x4 differ
    bad = _hammer(model, inputs, refs)
    assert not bad, f"{len(bad)} of {THREADS * CALLS} calls wrong: {bad[:5]}"


def test_threads_hf_swin():
    """Hugging Face Swin: its grids come from int arguments (``input_dimensions``), one source per stage."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                  window_size=4, mlp_ratio=2.0)
    model = transformers.SwinModel(cfg).eval()
    localify.localify(model, kernel_size=3, example_inputs=torch.randn(1, 3, 64, 64))
    _randomise(model)
    inputs = _inputs([(32, 48), (48, 32), (32, 32), (48, 48)])  # (HF Swin fails at 16x64 itself)
    refs = _references(model, inputs)
    assert not torch.allclose(refs[0].flatten(), refs[1].flatten(), atol=1e-3)
    bad = _hammer(model, inputs, refs, calls=25)
    assert not bad, f"{len(bad)} of {THREADS * 25} calls wrong: {bad[:5]}"


# ----------------------------------------------------------------------------------------- re-entrancy
class TwoSizes(nn.Module):
    """Calls one converted model at two sizes inside its own forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x), self.model(x.transpose(2, 3))], 1)


def test_wrapper_calls_model_at_two_sizes():
    model = tiny_vit()
    x = _inputs([(64, 96)])[0]
    with torch.no_grad():
        ref = torch.cat([model(x), model(x.transpose(2, 3))], 1)
        assert torch.allclose(TwoSizes(model)(x), ref, atol=1e-6)


class Recurse(nn.Module):
    """Block 1 of a model that calls the whole model again (once) on another image."""

    def __init__(self, block: nn.Module, model: nn.Module, image: torch.Tensor) -> None:
        super().__init__()
        self.block, self.image, self.depth = block, image, 0
        self.outer = [model]  # not a submodule: no cycle in the module tree

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.depth == 0:
            self.depth += 1
            try:
                y = y + self.outer[0](self.image).mean()
            finally:
                self.depth -= 1
        return y


def _features_by_hand(m: nn.Module, x: torch.Tensor, between) -> torch.Tensor:
    """timm's forward for the tiny ViT, block by block, with ``between`` added after block 1."""
    t = m.blocks[0](m.norm_pre(m._pos_embed(m.patch_embed(x))))
    return m.forward_head(m.norm(m.blocks[1](t + between)))


def test_model_called_inside_another_models_forward():
    """Model B (grid 6x4) runs inside block 1 of model A (grid 4x6): A's block 2 still reads 4x6 after it."""
    a, b = tiny_vit(), _randomise(tiny_vit(), seed=2)
    x = _inputs([(64, 96)])[0]
    xb = x.transpose(2, 3).contiguous()
    with torch.no_grad():
        ref = _features_by_hand(a, x, b(xb).mean())
        a.blocks[0] = Recurse(a.blocks[0], b, xb)
        out = a(x)
    assert torch.allclose(out, ref, atol=1e-5)


def test_recursive_call_of_the_same_model():
    """The same model called inside one of its own blocks at another size: each call keeps its own grid."""
    model = tiny_vit()
    x = _inputs([(64, 96)])[0]
    xt = x.transpose(2, 3).contiguous()
    with torch.no_grad():
        ref = _features_by_hand(model, x, model(xt).mean())
        model.blocks[0] = Recurse(model.blocks[0], model, xt)
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5)


def test_block_called_after_the_model_raises():
    model = tiny_vit()
    x = _inputs([(64, 64)])[0]
    with torch.no_grad():
        model(x)
        tokens = torch.randn(2, 17, 32)
        with pytest.raises(RuntimeError, match="never set"):
            model.blocks[0].mlp(tokens)
        with pytest.raises(RuntimeError, match="never set"):
            model.blocks[0].mlp.fc1(tokens)


def test_block_called_without_any_model_call_raises():
    model = tiny_vit("localvit")
    with torch.no_grad(), pytest.raises(RuntimeError, match="never set"):
        model.blocks[1].mlp(torch.randn(1, 17, 32))


def _frames_in_flight(model: nn.Module) -> int:
    """Frames left on this thread's stack of the model (0 once every call has returned or raised)."""
    (frames,) = {id(s._frames): s._frames for s in get_state(model).sources.values()}.values()
    return len(frames.stack()) - 1


def test_forward_features_and_exceptions():
    """Calls that skip the model's own ``__call__`` (forward_features) still read their own grid, in threads
    too; a call that raises leaves no frame behind; a block called after the model ran raises."""
    model = tiny_vit()
    xs = _inputs([(64, 96), (96, 64)])
    with torch.no_grad():
        refs = [model.forward_features(x) for x in xs]
        bad = _hammer(model.forward_features, xs, refs, calls=10)
        assert not bad, bad
        def fail(module, args):
            raise ValueError("stop in block 2")

        handle = model.blocks[1].register_forward_pre_hook(fail)
        with pytest.raises(ValueError, match="stop in block 2"):  # after block 1 read its grid
            model(xs[0])
        handle.remove()
        assert _frames_in_flight(model) == 0
        with pytest.raises(RuntimeError, match="never set"):
            model.blocks[0].mlp(torch.randn(1, 17, 32))
        assert torch.allclose(model(xs[1]), model.forward_head(refs[1]), atol=1e-6)
        assert _frames_in_flight(model) == 0


def test_activation_checkpointing():
    """Blocks recomputed in backward (timm's grad checkpointing) read the grid of the forward they redo."""
    model, ref = tiny_vit(), tiny_vit()
    model.set_grad_checkpointing(True)
    model.train()
    ref.train()
    x = _inputs([(64, 96)])[0]
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), n


# --------------------------------------------------------------------------------------- hooks, copies
def _root_hooks(model: nn.Module) -> tuple[int, int]:
    return len(model._forward_pre_hooks), len(model._forward_hooks)


def test_sources_share_one_pair_of_model_hooks():
    """HF Swin has a grid source per stage: the model gets one pre-hook and one hook, gone with the last."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                  window_size=4, mlp_ratio=2.0)
    model = transformers.SwinModel(cfg).eval()
    before = _root_hooks(model)
    localify.localify(model, example_inputs=torch.randn(1, 3, 32, 32))
    sources = list(get_state(model).sources.values())
    assert len(sources) >= 2
    assert _root_hooks(model) == (before[0] + 1, before[1] + 1)
    for s in sources[:-1]:
        s.detach()
    assert _root_hooks(model) == (before[0] + 1, before[1] + 1)
    sources[-1].detach()
    assert _root_hooks(model) == before


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_record_their_own_grids(how, tmp_path):
    """Copies (deepcopy, pickle) work and record their grids apart from the original, in threads too."""
    import pickle

    model = tiny_vit()
    if how == "pickle":  # a loaded model: see test_pickle_a_freshly_converted_model
        localify.save(model, tmp_path / "m.safetensors")
        model = localify.load(tmp_path / "m.safetensors")
    inputs = _inputs(SIZES)
    refs = _references(model, inputs)
    copied = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert _root_hooks(copied) == _root_hooks(model)
    assert _references(copied, inputs)[0].equal(refs[0])
    (mine,), (theirs,) = ({id(s._frames) for s in get_state(m).sources.values()} for m in (model, copied))
    assert mine != theirs

    def both(x):  # the original and its copy, interleaved
        return model(x) + copied(x)

    bad = _hammer(both, inputs, [2 * r for r in refs], calls=10)
    assert not bad, bad
    hooks = _root_hooks(model)
    for src in get_state(copied).sources.values():  # the copy's hooks go with the copy's sources
        src.detach()
    assert _root_hooks(copied) == (hooks[0] - 1, hooks[1] - 1) and _root_hooks(model) == hooks


def test_pickle_a_freshly_converted_model():
    import pickle

    model = tiny_vit()
    x = _inputs([(64, 96)])[0]
    with torch.no_grad():
        assert pickle.loads(pickle.dumps(model))(x).equal(model(x))
