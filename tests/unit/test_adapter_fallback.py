"""The ComfyUI adapter without ComfyUI: models dir from env/argument, cpu, tqdm, no interrupt."""
import torch

from photo_restoration.nodes import comfy as adapter


def test_comfyui_is_not_detected_in_plain_python():
    assert adapter.comfy_present() is False


def test_models_dir_from_env_and_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PHOTO_RESTORE_MODELS", str(tmp_path / "env"))
    adapter.set_models_dir(None)
    assert adapter.models_dir() == str(tmp_path / "env")
    adapter.set_models_dir(tmp_path / "arg")
    try:
        assert adapter.models_dir() == str(tmp_path / "arg")
        (tmp_path / "arg" / "facedetection" / "sub").mkdir(parents=True)
        (tmp_path / "arg" / "facedetection" / "sub" / "a.pth").write_bytes(b"x")
        (tmp_path / "arg" / "facedetection" / "readme.txt").write_text("not a model")
        assert adapter.list_files("facedetection") == ["sub/a.pth"]
        assert adapter.full_path("facedetection", "sub/a.pth").endswith("a.pth")
        (tmp_path / "arg" / "LLM" / "llava-tiny").mkdir(parents=True)
        assert adapter.list_dirs("LLM") == ["llava-tiny"]
    finally:
        adapter.set_models_dir(None)


def test_missing_file_error_names_file_and_folder(tmp_path):
    adapter.set_models_dir(tmp_path)
    try:
        try:
            adapter.full_path("facerestore_models", "codeformer.pth")
        except FileNotFoundError as e:
            assert "codeformer.pth" in str(e) and "facerestore_models" in str(e)
        else:
            raise AssertionError("no error")
    finally:
        adapter.set_models_dir(None)


def test_device_dtype_and_management_fall_back_to_plain_torch():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert adapter.torch_device().type == expected
    assert adapter.intermediate_device().type == "cpu"
    assert adapter.pick_dtype("bf16") is torch.bfloat16
    if expected == "cpu":
        assert adapter.pick_dtype("auto") is torch.float32
    managed = adapter.manage(torch.nn.Linear(2, 2))
    assert managed.patcher is None
    assert isinstance(adapter.load(managed), torch.nn.Linear)
    adapter.register_model_folders()  # no-op without ComfyUI
    adapter.check_interrupt()  # never raises without ComfyUI


def test_progress_falls_back_to_tqdm():
    with adapter.Progress(3, "test") as p:
        p.progress(1, 3, preview=torch.rand(3, 8, 8))
        p.advance()
        p.check_interrupt()
        assert p._n == 2
