"""Real insightface-format ArcFace ONNX loading, on a small random network with the same contract."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import InputError, ModelLoadError

IMAGES = Path(__import__("insightface").__file__).parent / "data" / "images"


class _TinyArcFace(torch.nn.Module):
    """112x112 RGB in [-1, 1] -> 512 (the insightface recognition contract)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, 4)
        self.fc = torch.nn.Linear(8 * 28 * 28, 512)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def export_tiny_arcface(path) -> torch.nn.Module:
    """Write a seeded random _TinyArcFace as an insightface-format ONNX (also used by benchmarks/)."""
    torch.manual_seed(0)
    net = _TinyArcFace().eval()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, torch.zeros(1, 3, 112, 112), str(path), input_names=["data"], output_names=["fc1"],
                      dynamic_axes={"data": {0: "n"}, "fc1": {0: "n"}}, opset_version=17, dynamo=False)
    return net


@pytest.fixture(scope="module")
def onnx_encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("antelope")
    return export_tiny_arcface(folder / "arcface.onnx"), folder


def test_aligned_crops_match_the_network(onnx_encoder):
    net, folder = onnx_encoder
    enc = ff.load_encoder(folder / "arcface.onnx")
    assert ff.load_encoder(folder).path.name == "arcface.onnx"  # a folder works too
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    emb = enc.encode(crops)
    with torch.no_grad():
        ref = F.normalize(net(torch.from_numpy(crops).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)), dim=1)
    assert emb.shape == (3, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb, ref, atol=1e-4)


def test_full_photo_without_detector_is_a_clear_error(onnx_encoder):
    _, folder = onnx_encoder
    enc = ff.load_encoder(folder)
    photo = IMAGES / "t1.jpg"  # a group photo shipped by the insightface package
    with pytest.raises(InputError, match=r"images\[0\].*no face detector"):
        enc.encode([str(photo)])


def test_bad_encoder_files(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        ff.load_encoder(tmp_path / "missing.onnx")
    (tmp_path / "arcface.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="arcface.onnx"):
        ff.load_encoder(tmp_path / "arcface.onnx")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.onnx.export(torch.nn.Linear(10, 128), torch.zeros(1, 10), str(wrong / "arcface.onnx"), dynamo=False)
    with pytest.raises(ModelLoadError):
        ff.load_encoder(wrong / "arcface.onnx")
