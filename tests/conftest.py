"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: extra threads only add sync overhead (100x slower on a busy 2-core box).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache, read offline (no network is ever tried); returns ``put(repo_id,
    state_dict)``, which stores ``model.safetensors`` in it the way ``hf_hub_download`` leaves a download."""
    import huggingface_hub.constants as hub
    from safetensors.torch import save_file

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    def put(repo_id: str, state: dict) -> None:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / commit / "model.safetensors"))

    return put


@pytest.fixture(params=["conv", "linear"])
def backend(request):
    """Both point-wise primitives (1x1 conv of a channels-last view, F.linear), whatever this CPU picks."""
    from localify.layers import set_pointwise_backend

    prev = set_pointwise_backend(request.param)
    yield request.param
    set_pointwise_backend(prev)
