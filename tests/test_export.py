"""Backbone files and ONNX export: onnxruntime agrees with torch in eval mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gbcosface.backbones import build_backbone
from gbcosface.export import load_backbone, main, save_backbone
from tests.optional import require


def _calibrated(name: str, d: int, **kw) -> nn.Module:
    """A backbone whose BatchNorm running statistics come from data (cumulative average), so
    eval-mode outputs are O(1) and a 1e-4 tolerance is meaningful."""
    torch.manual_seed(0)
    model = build_backbone(name, d, **kw)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 112, 112))
    return model.eval()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = _calibrated("tiny", 24, width=8)
    wrapped = nn.Sequential()
    wrapped.module = model  # like DDP: save_backbone must unwrap, keys without "module."
    save_backbone(tmp_path / "m.pt", "tiny", wrapped, backbone_kwargs={"width": 8}, step=12)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["backbone"] == "tiny" and raw["embedding_size"] == 24
    assert raw["config"] == {"backbone_kwargs": {"width": 8}, "step": 12}
    assert not any(k.startswith("module.") for k in raw["state_dict"])
    loaded = load_backbone(tmp_path / "m.pt")
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training


def test_plain_state_dict_needs_a_name(tmp_path: Path) -> None:
    model = build_backbone("iresnet18", 128)  # arcface_torch saves model.module.state_dict()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"sd.pt: a plain state dict.*--backbone"):
        load_backbone(tmp_path / "sd.pt")
    loaded = load_backbone(tmp_path / "sd.pt", name="r18")
    assert loaded.embedding_size == 128
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"sd.pt: weights do not fit backbone 'tiny'"):
        load_backbone(tmp_path / "sd.pt", name="tiny")


@pytest.mark.parametrize("name,d,kw,exporter", [
    ("tiny", 64, {"width": 8}, "dynamo"), ("tiny", 64, {"width": 8}, "torchscript"),
    ("mobilefacenet", 128, {}, "dynamo"),
    pytest.param("iresnet18", 512, {}, "dynamo", marks=pytest.mark.slow),
])
def test_onnx_matches_torch(tmp_path: Path, name: str, d: int, kw: dict, exporter: str, capsys) -> None:
    ort = require("onnxruntime")
    require("onnx")
    if exporter == "dynamo":
        require("onnxscript")
    model = _calibrated(name, d, **kw)
    save_backbone(tmp_path / "model.pt", name, model, backbone_kwargs=kw)
    main(["--checkpoint", str(tmp_path / "model.pt"), "--output", str(tmp_path / "model.onnx"),
          "--exporter", exporter])
    assert "max abs difference" in capsys.readouterr().out
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(x).numpy()
        out = sess.run(None, {"images": x.numpy()})[0]
        assert out.shape == (batch, d)
        assert np.abs(ref).max() > 0.1  # outputs are not trivially tiny
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
