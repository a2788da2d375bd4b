"""The pack inside a real ComfyUI: it loads with no import failure, every node is listed, the
adapter's ComfyUI path works, and every example workflow runs and produces images of the expected
size. Runs only when ``COMFYUI_PATH`` points at a ComfyUI checkout; skipped (never faked) otherwise.

Each workflow may say what the test should feed and expect in ``extra.photo_restoration_test``:
``{"inputs": {"<file name>": [width, height]}, "outputs": {"<node id>": [width, height]}}``, and
``"requires": ["<other pack>"]`` to skip it here (e.g. ComfyUI-Distributed: tests/integration/test_distributed.py);
``LoadImage`` files with no entry get a 96x80 generated photo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))

if not COMFYUI_PATH:
    pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to test against", allow_module_level=True)
if not (Path(COMFYUI_PATH) / "main.py").is_file():
    pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no main.py)", pytrace=False)

from .comfy_server import ComfyServer, ui_to_api  # noqa: E402


def test_info(workflow: dict) -> dict:
    return workflow.get("extra", {}).get("photo_restoration_test", {})


test_info.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from photo_restoration.testing.images import synthetic_photo
    from photo_restoration.testing.tiny_checkpoints import write_all

    base = tmp_path_factory.mktemp("comfy_base")
    write_all(base / "models")
    (base / "input").mkdir(exist_ok=True)
    for wf_path in WORKFLOWS:
        wf = json.loads(wf_path.read_text())
        sizes = test_info(wf).get("inputs", {})
        for node in wf["nodes"]:
            if node["type"] == "LoadImage":
                name = node["widgets_values"][0]
                w, h = sizes.get(name, (96, 80))
                synthetic_photo(w, h).save(base / "input" / name)
    srv = ComfyServer(Path(COMFYUI_PATH), base)
    srv.start()
    yield srv
    srv.stop()


def test_pack_loads_and_lists_every_node(server):
    from photo_restoration import NODE_CLASS_MAPPINGS

    info = server.get("/object_info")
    missing = [n for n in NODE_CLASS_MAPPINGS if n not in info]
    log = server.log()
    assert "IMPORT FAILED" not in log or server.pack_name not in log.split("IMPORT FAILED")[-1][:400], log[-3000:]
    assert "could not import nodes/" not in log, log[-3000:]
    assert not missing, f"nodes missing from /object_info: {missing}\n{log[-3000:]}"
    for name in NODE_CLASS_MAPPINGS:
        assert info[name]["description"], f"{name} has no description"


def test_model_folders_are_registered(server):
    for key in ("checkpoints", "upscale_models", "facerestore_models", "facedetection", "LLM"):
        # the endpoint lists files of a folder key; it answers 404 for unknown keys
        server.get(f"/models/{key}")


@pytest.mark.parametrize("wf_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs(server, wf_path):
    from PIL import Image

    workflow = json.loads(wf_path.read_text())
    if test_info(workflow).get("requires"):  # other packs' nodes, e.g. ComfyUI-Distributed (test_distributed.py)
        pytest.skip(f"needs {', '.join(test_info(workflow)['requires'])}, not installed in this ComfyUI")
    prompt = ui_to_api(workflow, server.get("/object_info"))
    entry = server.run_prompt(prompt)
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status.get("messages"), indent=1)[-4000:]
    expected = test_info(workflow).get("outputs", {})
    produced = 0
    for node_id, out in entry["outputs"].items():
        for img in out.get("images", []):
            folder = server.base_dir / ("output" if img["type"] == "output" else "temp") / img.get("subfolder", "")
            with Image.open(folder / img["filename"]) as im:
                size = list(im.size)
            produced += 1
            if node_id in expected:
                assert size == list(expected[node_id]), f"node {node_id}: image {size} != expected {expected[node_id]}"
    assert produced, "the workflow produced no image"


ADAPTER_SCRIPT = textwrap.dedent(
    """
    import sys, os, json, importlib.util, torch
    sys.path.insert(0, os.getcwd())
    from comfy.cli_args import args
    args.cpu = True
    import folder_paths
    base = sys.argv[1]
    folder_paths.models_dir = os.path.join(base, "models")
    extra = os.path.join(base, "extra_facedet")
    folder_paths.add_model_folder_path("facedetection", extra)   # what extra_model_paths.yaml does
    import comfy.model_management as mm
    import comfy.utils
    spec = importlib.util.spec_from_file_location(
        "pack_under_test", os.path.join(sys.argv[2], "__init__.py"),
        submodule_search_locations=[sys.argv[2]])
    pack = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = pack
    spec.loader.exec_module(pack)
    adapter = sys.modules["pack_under_test.nodes.comfy"]
    paths, exts = folder_paths.folder_names_and_paths["facedetection"]
    out = {"present": adapter.comfy_present(), "facedet_paths": paths, "exts": sorted(exts),
           "llm_exts": sorted(folder_paths.folder_names_and_paths["LLM"][1])}
    managed = adapter.manage(torch.nn.Linear(3, 3))
    out["patcher"] = type(managed.patcher).__name__
    out["loaded_device"] = str(next(adapter.load(managed).parameters()).device)
    out["dtype_auto"] = str(adapter.pick_dtype("auto"))
    p = adapter.Progress(4)
    p.progress(2, 4, torch.rand(8, 8, 3)); p.check_interrupt(); p.close()
    mm.interrupt_current_processing(True)
    try:
        adapter.check_interrupt(); out["interrupt"] = "not raised"
    except Exception as e:
        out["interrupt"] = type(e).__name__
    print("RESULT" + json.dumps(out))
    """
)


def test_adapter_uses_comfyui_internals(tmp_path):
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", ADAPTER_SCRIPT,
                           str(tmp_path), str(REPO_ROOT)], cwd=COMFYUI_PATH, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["present"] is True
    # the path added before the pack loaded is kept, the default one is appended after it
    assert out["facedet_paths"][0] == str(tmp_path / "extra_facedet")
    assert out["facedet_paths"][-1] == str(tmp_path / "models" / "facedetection")
    assert ".pth" in out["exts"] and ".safetensors" in out["exts"] and out["llm_exts"]
    assert out["patcher"] == "ModelPatcher"
    assert out["loaded_device"] == "cpu" and out["dtype_auto"] == "torch.float32"
    assert out["interrupt"] == "InterruptProcessingException"
