"""Hugging Face round trip: a converted HF model saved by localify reloads as the same class, and converted
models train inside ``transformers.Trainer`` (tiny ViTForImageClassification, in-memory dataset, CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import localify

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'localify[test]')")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(variant: str = "dwconv") -> transformers.ViTForImageClassification:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.ViTForImageClassification(cfg)
    model.eval()
    localify.localify(model, variant=variant)
    with torch.no_grad():  # move off the identity kernel so the round trip is tested on non-trivial weights
        for m in model.modules():
            if isinstance(m, (localify.LocalityLinear, localify.LocalViTFFN)):
                m.dwconv.weight.add_(0.05 * torch.randn_like(m.dwconv.weight))
    return model


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _trainer(model: nn.Module, tmp_path) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, save_strategy="no", learning_rate=1e-2, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Images())


@pytest.mark.parametrize("variant", ["residual", "localvit"])
def test_hf_save_reload_same_class(tmp_path, variant):
    model = tiny_vit(variant)
    path = localify.save(model, tmp_path / "vit_local")
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    back = localify.load(path)
    assert type(back) is transformers.ViTForImageClassification
    assert back.config.num_labels == 3 and not back.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).logits, model(pixel_values=x).logits)
        # other sizes too, through the run-time grid
        y = torch.randn(1, 3, 48, 24)
        a = back(pixel_values=y, interpolate_pos_encoding=True).logits
        assert torch.equal(a, model(pixel_values=y, interpolate_pos_encoding=True).logits)


@pytest.mark.slow
def test_trainer_trains_converted_model(tmp_path):
    model = tiny_vit("localvit")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _trainer(model, tmp_path).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.state_dict()
    dw = next(k for k in after if k.endswith("mlp.dwconv.weight"))  # vit.layers.0 (5.x), vit.encoder.layer.0
    assert not torch.equal(after[dw], before[dw])
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert after[dw.replace("dwconv.weight", "bn2.num_batches_tracked")].item() == 2
    # the trained model saves and reloads as the same class, same outputs
    model.eval()
    back = localify.load(localify.save(model, tmp_path / "trained.safetensors"))
    assert type(back) is transformers.ViTForImageClassification
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).logits, model(pixel_values=x).logits)


@pytest.mark.slow
def test_trainer_locality_only(tmp_path):
    """mark_trainable inside Trainer: only the depth-wise kernels and the classifier move."""
    model = tiny_vit("dwconv")
    report = localify.mark_trainable(model, "locality", head=True)
    assert report.head == ("classifier",) and 0 < report.fraction < 0.5
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer(model, tmp_path).train()
    train = set(report.trainable_names)
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved <= train
    # the last block's kernel gets no gradient: the classifier reads the class token, which skips the conv
    assert {"classifier.weight", "classifier.bias"} <= moved
    assert sorted(k for k in moved if k.endswith("dwconv.weight")) == sorted(train - {"classifier.weight",
                                                                                   "classifier.bias"})[:1]
