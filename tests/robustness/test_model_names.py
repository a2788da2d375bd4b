"""Model names resolve inside the registered model folders only, in and out of ComfyUI: absolute paths and
``..`` leading out are refused with a ValueError naming the input; sub-folders, ``./`` and symlinks that
users place inside a folder work."""
from __future__ import annotations

import os
import sys
import types

import pytest

from photo_restoration.nodes import comfy

from .fuzz import call, case, node, outcome

ESCAPES = {
    "dotdot": "../../etc/passwd",
    "dotdot-in-the-middle": "sub/../../checkpoints_secret.safetensors",
    "dotdot-backslash": "..\\..\\secret.ckpt",
    "absolute": "/etc/passwd",
    "absolute-backslash": "\\\\server\\share\\model.ckpt",
    "windows-drive": "C:\\models\\model.ckpt",
    "windows-drive-slash": "c:/models/model.ckpt",
    "only-dots": "..",
    "empty": "",
    "blank": "   ",
    "nul": "model\x00.ckpt",
    "300KB": "a" * 300_000,
    "not-text": 42,
}


@pytest.mark.parametrize("name", [case(f"full_path-{k}", v) for k, v in ESCAPES.items()])
def test_names_leading_out_of_the_folder_are_refused(models_dir, name):
    with pytest.raises(ValueError) as info:
        comfy.full_path("checkpoints", name)
    text = str(info.value)
    assert "checkpoints" in text and len(text) < 2000
    assert repr(name)[:30].strip("'") in text or str(name)[:30] in text or "No model chosen" in text


def test_a_file_outside_is_not_reached_even_when_it_exists(models_dir, tmp_path):
    outside = models_dir.parent / "outside_secret.safetensors"
    outside.write_bytes(b"x")
    for name in ("../outside_secret.safetensors", str(outside), "sub/../../outside_secret.safetensors"):
        with pytest.raises(ValueError, match="outside_secret"):
            comfy.full_path("checkpoints", name)


def test_sub_folders_dot_segments_and_user_symlinks_work(models_dir, names, tmp_path):
    folder = models_dir / "checkpoints"
    sub = folder / "SUPIR"
    sub.mkdir(exist_ok=True)
    (sub / "copy.safetensors").write_bytes((folder / names["supir"]).read_bytes())
    elsewhere = tmp_path / "big_disk"
    elsewhere.mkdir()
    (elsewhere / "linked.safetensors").write_bytes(b"x")
    os.symlink(elsewhere / "linked.safetensors", folder / "linked.safetensors")
    assert comfy.full_path("checkpoints", "SUPIR/copy.safetensors") == str(sub / "copy.safetensors")
    assert comfy.full_path("checkpoints", "SUPIR\\copy.safetensors") == str(sub / "copy.safetensors")
    assert comfy.full_path("checkpoints", f"./{names['supir']}") == str(folder / names["supir"])
    assert comfy.full_path("checkpoints", f"SUPIR/../{names['supir']}") == str(folder / names["supir"])
    assert os.path.realpath(comfy.full_path("checkpoints", "linked.safetensors")) == \
        str((elsewhere / "linked.safetensors").resolve())
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors.*checkpoints"):
        comfy.full_path("checkpoints", "nowhere.safetensors")


@pytest.fixture
def inside_comfyui(monkeypatch, models_dir):
    """A stand-in for ComfyUI's folder_paths with its own name handling (``get_full_path`` normalises with
    ``os.path.relpath(os.path.join("/", name), "/")`` and returns files only)."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models_dir)
    fp.folder_names_and_paths = {k: ([os.path.join(str(models_dir), sub)], exts)
                                 for k, (sub, exts) in comfy.MODEL_FOLDERS.items()}

    def get_full_path(key, filename):
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for root in fp.folder_names_and_paths[key][0]:
            if os.path.isfile(os.path.join(root, filename)):
                return os.path.join(root, filename)
        return None

    fp.get_full_path = get_full_path
    fp.get_folder_paths = lambda key: list(fp.folder_names_and_paths[key][0])
    fp.get_filename_list = lambda key: sorted(os.listdir(fp.folder_names_and_paths[key][0][0]))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setitem(sys.modules, "comfy.model_management", types.ModuleType("comfy.model_management"))
    assert comfy.comfy_present()
    return fp


@pytest.mark.parametrize("name", [case(f"in-comfyui-full_path-{k}", v) for k, v in ESCAPES.items()])
def test_inside_comfyui_the_same_rule_holds(inside_comfyui, name):
    with pytest.raises(ValueError):
        comfy.full_path("checkpoints", name)


def test_inside_comfyui_files_and_llava_folders_resolve(inside_comfyui, models_dir, names):
    assert comfy.full_path("checkpoints", names["supir"]) == str(models_dir / "checkpoints" / names["supir"])
    assert comfy.full_path("LLM", names["llava"]) == str(models_dir / "LLM" / names["llava"])


# ---- through the loader nodes -------------------------------------------------------------------------

def _loader_cases():
    nodes = {
        "LoadSupir-sdxl": ("SupirLoader", "sdxl_checkpoint"),
        "LoadSupir-supir": ("SupirLoader", "supir_checkpoint"),
        "LoadCodeFormer": ("LoadCodeFormer", "model_name"),
        "LoadFaceModel": ("LoadFaceModel", "model_name"),
        "LoadLlava": ("LoadLlava", "model"),
    }
    for label, (short, widget) in nodes.items():
        for k, v in {**ESCAPES, "missing": "nowhere.safetensors"}.items():
            yield case(f"{label}-name-{k}", short, widget, v)


@pytest.mark.parametrize("short, widget, value", list(_loader_cases()))
def test_loader_nodes_refuse_names_outside_their_folders(loader_inputs, short, widget, value):
    inputs = {**loader_inputs[short], widget: value}
    words = [str(value)[:30], "model chosen", "not a valid file name"]
    kind = outcome(lambda: call(node(short), inputs), inputs, words, errors=(ValueError, FileNotFoundError))
    assert kind == "error"


@pytest.mark.parametrize("value", [case("LoadFaceDetector-detector-unknown", "Ultra"),
                                   case("LoadFaceDetector-detector-dotdot", "../../x")])
def test_face_detector_choices_are_checked(value):
    inputs = {"detector": value, "parser": "parsenet"}
    assert outcome(lambda: call(node("LoadFaceDetector"), inputs), inputs, [value]) == "error"
