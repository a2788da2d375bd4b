"""The ``faces`` command line and the tiled upscaler used for background / face upsampling."""
import numpy as np
import torch
from PIL import Image

from photo_restoration.cli import main
from photo_restoration.codeformer.upscale import model_upscaler, tiled_upscale
from photo_restoration.testing import tiny_codeformer, tiny_faces
from photo_restoration.testing.images import synthetic_photo


def nearest2x(x):
    return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_tiled_upscale_equals_the_whole_image_for_a_local_model():
    x = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(0))
    tiled = tiled_upscale(nearest2x, x, tile=32, overlap=8)
    assert tiled.shape == (2, 3, 140, 180)
    assert torch.allclose(tiled, nearest2x(x), atol=1e-6)
    calls = []
    up = model_upscaler(lambda t: calls.append(t.shape) or nearest2x(t), tile=64, overlap=16)
    assert up(x).shape == (2, 3, 140, 180) and len(calls) == 4


def test_faces_command_restores_a_folder(tmp_path):
    models = tmp_path / "models"
    tiny_codeformer.WRITERS["codeformer"](models, 0)
    tiny_faces.write_retinaface_mobilenet(models, 0)
    src = tmp_path / "in"
    src.mkdir()
    synthetic_photo(64, 48).save(src / "a.png")
    synthetic_photo(40, 30).convert("L").save(src / "b.png")
    out = tmp_path / "out"
    # threshold 1.0: the rigged detector's faces (0.9997) are rejected, so no network time is spent
    rc = main(["faces", str(src), "--out", str(out), "--models", str(models), "--detector", "mobilenet0.25",
               "--parser", "none", "-s", "2", "--threshold", "1.0"])
    assert rc == 0
    a, b = Image.open(out / "a.png"), Image.open(out / "b.png")
    assert a.size == (128, 96) and a.mode == "RGB"
    assert b.size == (80, 60) and b.mode == "L"
    assert np.asarray(a).std() > 0
