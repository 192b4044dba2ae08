"""Backbones: output shapes, InsightFace parameter counts and state-dict names."""

from __future__ import annotations

import pytest
import torch

from gbcosface.backbones import backbone_names, build_backbone

# arcface_torch iresnet: stem conv3x3(3->64)+BN+PReLU; stages of IBasicBlock with widths
# 64/128/256/512, the first block of each stage strided with a 1x1 conv+BN downsample;
# then bn2, dropout, fc (512*7*7 -> D), features (BatchNorm1d).
DEPTHS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
WIDTHS = (64, 128, 256, 512)
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_param_count(depths: tuple[int, ...], d: int) -> int:
    """Parameters from the layer arithmetic of the documented structure."""
    n = 3 * 64 * 9 + 2 * 64 + 64  # conv1, bn1, prelu
    cin = 64
    for w, depth in zip(WIDTHS, depths):
        for j in range(depth):
            c = cin if j == 0 else w
            n += 2 * c + c * w * 9 + 2 * w + w + w * w * 9 + 2 * w  # bn1 conv1 bn2 prelu conv2 bn3
            if j == 0:
                n += c * w + 2 * w  # downsample conv1x1 + BN
        cin = w
    return n + 2 * 512 + (512 * 49 * d + d) + 2 * d  # bn2, fc, features


def expected_keys(depths: tuple[int, ...]) -> set[str]:
    keys = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    keys |= {f"{m}.{p}" for m in ("bn1", "bn2", "features") for p in BN}
    for i, depth in enumerate(depths, start=1):
        for j in range(depth):
            pre = f"layer{i}.{j}."
            keys |= {pre + "conv1.weight", pre + "conv2.weight", pre + "prelu.weight"}
            keys |= {f"{pre}{m}.{p}" for m in ("bn1", "bn2", "bn3") for p in BN}
            if j == 0:
                keys |= {pre + "downsample.0.weight"} | {f"{pre}downsample.1.{p}" for p in BN}
    return keys


@pytest.mark.parametrize("name,published", [("iresnet50", 43.6e6), ("iresnet100", 65.2e6)])
def test_iresnet_parameter_counts(name: str, published: float) -> None:
    model = build_backbone(name, 512)
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_param_count(DEPTHS[name], 512)
    assert abs(count - published) < 0.05e6  # InsightFace's published sizes (43.6M / 65.2M)


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_iresnet_state_dict_names_match_arcface_torch(name: str) -> None:
    sd = build_backbone(name, 512).state_dict()
    assert set(sd) == expected_keys(DEPTHS[name])
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.conv1.weight"].shape == (512, 512, 3, 3)


@pytest.mark.parametrize("name,d", [("tiny", 64), ("tiny", 512), ("mobilefacenet", 128),
                                    ("iresnet18", 256), ("r50", 512)])
def test_output_shape(name: str, d: int) -> None:
    model = build_backbone(name, d).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, d)
    assert torch.isfinite(out).all()
    assert model.embedding_size == d


@pytest.mark.slow
def test_iresnet100_forward_shape() -> None:
    with torch.no_grad():
        assert build_backbone("iresnet100").eval()(torch.randn(1, 3, 112, 112)).shape == (1, 512)


def test_mobilefacenet_is_configurable_and_trains() -> None:
    model = build_backbone("mobilefacenet", 64, blocks=(2, 2, 2, 1), scale=1)
    out = model(torch.randn(4, 3, 112, 112))
    out.square().mean().backward()
    assert out.shape == (4, 64)
    assert all(p.grad is not None for p in model.parameters())


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        build_backbone("resnet9000")
    for name in backbone_names():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="bad options"):
        build_backbone("tiny", 8, no_such_option=1)
