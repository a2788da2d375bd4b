"""The CodeFormer face nodes without ComfyUI, on tiny weights written in the official layouts:
loaders, the restore node end to end, the no-face path, odd inputs, input never modified, clear
errors for missing files."""
import pytest
import torch

from photo_restoration.nodes import comfy
from photo_restoration.nodes.face_nodes import (NODE_CLASS_MAPPINGS, CodeFormerFaceRestore, LoadCodeFormer,
                                                LoadFaceDetector)
from photo_restoration.testing import tiny_codeformer, tiny_faces


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("face_models")
    tiny_codeformer.WRITERS["codeformer"](root, 0)
    tiny_faces.write_retinaface_mobilenet(root, 0)
    tiny_faces.write_parsenet(root, 0)
    comfy.set_models_dir(root)
    yield root
    comfy.set_models_dir(None)


@pytest.fixture(scope="module")
def loaded(models):
    (cf,) = LoadCodeFormer().load("codeformer.pth", "fp32")
    (det,) = LoadFaceDetector().load("mobilenet0.25", "parsenet")
    return cf, det


def test_every_input_has_a_tooltip_and_ids_are_prefixed(models):
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("PhotoRestore") and cls.DESCRIPTION
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, (_, *opts) in section.items():
                assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    assert "codeformer.pth" in LoadCodeFormer.INPUT_TYPES()["required"]["model_name"][0]


@pytest.mark.slow
def test_restore_end_to_end_on_tiny_weights(loaded):
    cf, det = loaded
    img = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(0))
    before = img.clone()
    out, mask, restored, original, info = CodeFormerFaceRestore().restore(
        img, cf, det, fidelity=0.5, upscale=2, max_faces=1)
    assert torch.equal(img, before)
    assert out.shape == (1, 192, 256, 3) and mask.shape == (1, 192, 256)
    assert restored.shape == original.shape == (1, 512, 512, 3)
    assert mask.max() > 0.5 and torch.isfinite(out).all()
    assert "1 restored" in info


@pytest.mark.parametrize("shape", [(1, 50, 60, 4), (1, 50, 60, 1), (1, 1, 1, 3), (3, 40, 30, 3)])
def test_no_face_path_and_odd_inputs(loaded, shape):
    cf, det = loaded
    img = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    before = img.clone()
    # the rigged detector scores faces 0.9997: a threshold of 1.0 finds none
    out, mask, restored, original, info = CodeFormerFaceRestore().restore(img, cf, det, detection_threshold=1.0)
    assert torch.equal(img, before) and torch.equal(out, img)
    assert mask.shape == shape[:3] and mask.sum() == 0
    assert restored.shape == (1, 512, 512, 3) and "no faces" in info


def test_detector_without_parser(models):
    (det,) = LoadFaceDetector().load("mobilenet0.25", "none")
    assert det["parser"] is None and det["detector"].model.name == "mobilenet0.25"


def test_missing_weights_name_file_folder_and_publisher(models):
    with pytest.raises(FileNotFoundError) as err:
        LoadFaceDetector().load("resnet50", "none")
    msg = str(err.value)
    assert "detection_Resnet50_Final.pth" in msg and "facedetection" in msg and "xinntao/facexlib" in msg
    with pytest.raises(FileNotFoundError) as err:
        LoadFaceDetector().load("mobilenet0.25", "bisenet")
    assert "parsing_bisenet.pth" in str(err.value)


def test_wrong_file_is_a_clear_value_error(models, tmp_path):
    from photo_restoration.codeformer.detection import load_retinaface
    from photo_restoration.codeformer.parsing import load_parser

    bad = tmp_path / "detection_mobilenet0.25_Final.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="detection_mobilenet0.25_Final.pth"):
        load_retinaface(bad)
    torch.save({"foo.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="RetinaFace"):
        load_retinaface(bad)
    with pytest.raises(ValueError, match="parsing"):
        load_parser(bad)


def test_resnet50_file_with_dataparallel_prefix_loads(tmp_path):
    from photo_restoration.codeformer.detection import load_retinaface

    sd = {f"module.{k}": v for k, v in tiny_faces.retinaface_state_dict("resnet50", 0).items()}
    det = load_retinaface(sd)
    assert det.name == "resnet50"


def test_load_face_detector_leaves_the_global_random_state_alone(models):
    state = torch.random.get_rng_state()
    LoadFaceDetector().load("mobilenet0.25", "parsenet")
    assert torch.equal(torch.random.get_rng_state(), state)


def test_new_inputs_are_optional_and_at_the_end():
    """Old workflows keep loading: the added widgets are optional and come after every earlier input."""
    optional = list(CodeFormerFaceRestore.INPUT_TYPES()["optional"])
    assert optional[-3:] == ["has_aligned", "draw_box", "face_fidelity"]
    assert optional[:-3][-1] == "face_batch_size"


def test_empty_batch_is_an_empty_result(loaded):
    cf, det = loaded
    out, mask, restored, original, info = CodeFormerFaceRestore().restore(torch.zeros(0, 40, 30, 3), cf, det,
                                                                          upscale=2)
    assert out.shape == (0, 80, 60, 3) and mask.shape == (0, 80, 60) and "empty batch" in info


def test_bad_face_index_and_face_fidelity_name_the_input(loaded):
    cf, det = loaded
    img = torch.rand(1, 40, 30, 3)
    for kwargs, name in (({"face_index": "1-"}, "face_index"), ({"face_index": "abc"}, "face_index"),
                         ({"face_fidelity": "0.5,high"}, "face_fidelity")):
        with pytest.raises(ValueError, match=name):
            CodeFormerFaceRestore().restore(img, cf, det, **kwargs)


@pytest.mark.slow
def test_has_aligned_toned_face_keeps_its_tint_through_codeformer(loaded):
    cf, det = loaded
    small = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    y = torch.nn.functional.interpolate(small, size=(512, 512), mode="bilinear").mean(1)[0]
    face = torch.stack([y, y * 0.8, y * 0.55], -1)[None]  # sepia-toned aligned face
    out, mask, restored, original, info = CodeFormerFaceRestore().restore(face, cf, det, has_aligned=True)
    assert out.shape == face.shape and bool((mask == 1).all())
    assert torch.allclose(out[0].mean((0, 1)), face[0].mean((0, 1)), atol=2 / 255)
    assert torch.allclose(out[0].std((0, 1)), face[0].std((0, 1)), atol=2 / 255)
