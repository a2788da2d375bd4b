"""The pack inside every real ComfyUI tree (``trees.py``): it loads with no import failure, every node is
listed, the adapter's ComfyUI path works, every example workflow runs and produces images of the
expected size, our LATENTs survive core latent nodes, and a cancelled sample is followed by a good run.

Each workflow may say what the test should feed and expect in ``extra.photo_restoration_test``:
``{"inputs": {"<file name>": [width, height]}, "outputs": {"<node id>": [width, height]}}``;
``LoadImage`` files with no entry get a 96x80 generated photo. ``"requires": ["<custom node pack>"]``
marks a workflow that needs another pack (tested where that pack is installed, e.g. test_distributed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .comfy_server import ComfyServer, ui_to_api

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
# workflows that need another custom node pack run in that pack's own integration test (test_distributed.py)
PLAIN_WORKFLOWS = [p for p in WORKFLOWS
                   if not json.loads(p.read_text()).get("extra", {}).get("photo_restoration_test", {}).get("requires")]


def test_info(workflow: dict) -> dict:
    return workflow.get("extra", {}).get("photo_restoration_test", {})


test_info.__test__ = False  # a helper, not a test


def write_inputs(base: Path) -> None:
    """Every image the example workflows load, as generated photos of the size they ask for."""
    from photo_restoration.testing.images import synthetic_photo

    (base / "input").mkdir(parents=True, exist_ok=True)
    for wf_path in WORKFLOWS:
        wf = json.loads(wf_path.read_text())
        sizes = test_info(wf).get("inputs", {})
        for node in wf["nodes"]:
            if node["type"] == "LoadImage":
                name = node["widgets_values"][0]
                w, h = sizes.get(name, (96, 80))
                synthetic_photo(w, h).save(base / "input" / name)
    synthetic_photo(96, 80).save(base / "input" / "photo_96x80.png")


@pytest.fixture(scope="module")
def server(comfy_tree, tmp_path_factory):
    from photo_restoration.testing.tiny_checkpoints import write_all

    base = tmp_path_factory.mktemp(f"comfy_base_{comfy_tree.version}")
    write_all(base / "models")
    write_inputs(base)
    srv = ComfyServer(comfy_tree.path, base)
    srv.start()
    yield srv
    srv.stop()


def image_sizes(server: ComfyServer, entry: dict) -> dict[str, list[list[int]]]:
    """node id -> [[width, height], ...] of the images a finished prompt wrote."""
    from PIL import Image

    out: dict[str, list[list[int]]] = {}
    for node_id, node_out in entry["outputs"].items():
        for img in node_out.get("images", []):
            folder = server.base_dir / ("output" if img["type"] == "output" else "temp") / img.get("subfolder", "")
            with Image.open(folder / img["filename"]) as im:
                out.setdefault(node_id, []).append(list(im.size))
    return out


def assert_success(entry: dict) -> None:
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status.get("messages"), indent=1)[-4000:]


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


@pytest.mark.parametrize("wf_path", PLAIN_WORKFLOWS, ids=[p.stem for p in PLAIN_WORKFLOWS])
def test_example_workflow_runs(server, wf_path):
    workflow = json.loads(wf_path.read_text())
    info = server.get("/object_info")
    entry = server.run_prompt(ui_to_api(workflow, info))
    assert_success(entry)
    expected = test_info(workflow).get("outputs", {})
    sizes = image_sizes(server, entry)
    assert sizes, "the workflow produced no image"
    for node_id, size in expected.items():
        assert node_id in sizes, f"node {node_id} wrote no image; outputs: {sizes}"
        assert all(s == list(size) for s in sizes[node_id]), f"node {node_id}: images {sizes[node_id]} != {size}"


def test_example_workflows_name_the_published_files():
    """Users open the examples with their real models: the loaders must name the published files."""
    tiny = ("tiny_sdxl", "tiny_supir", "llava-tiny", "llava-next-tiny")
    for wf_path in WORKFLOWS:
        text = wf_path.read_text()
        assert not any(t in text for t in tiny), f"{wf_path.name} names a tiny test file"


# ---- LATENT interop with core latent nodes ---------------------------------------------------------

def _latent_prompt(seed: int, middle: dict, decode_from: str) -> dict:
    """LoadImage (96x80) -> Load SUPIR -> SUPIR Encode -> <core nodes> -> SUPIR Decode -> SaveImage."""
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo_96x80.png"}},
        "2": {"class_type": "PhotoRestoreSupirLoader",
              "inputs": {"sdxl_checkpoint": "sd_xl_base_1.0.safetensors", "supir_checkpoint": "SUPIR-v0Q.ckpt",
                         "weight_dtype": "fp32", "vae_dtype": "fp32"}},
        "3": {"class_type": "PhotoRestoreSupirEncode",
              "inputs": {"supir": ["2", 0], "image": ["1", 0], "tiled_vae": False, "encoder_tile_size": 512}},
        "9": {"class_type": "PhotoRestoreSupirDecode",
              "inputs": {"supir": ["2", 0], "latent": [decode_from, 0], "tiled_vae": False,
                         "decoder_tile_size": 512}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"latent_{seed}"}},
    }
    prompt.update(middle)
    return prompt


LATENT_CASES = {
    # name: (core nodes between Encode and Decode, node feeding Decode, expected [w, h] of every image)
    "as_encoded": ({}, "3", [[96, 80]]),
    "upscale_by_2": ({"4": {"class_type": "LatentUpscaleBy",
                            "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 2.0}}},
                     "4", [[192, 160]]),
    "crop": ({"4": {"class_type": "LatentCrop",
                    "inputs": {"samples": ["3", 0], "width": 64, "height": 80, "x": 8, "y": 16}}},
             "4", [[64, 80]]),
    "repeat_then_from_batch": ({"4": {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["3", 0], "amount": 3}},
                                "5": {"class_type": "LatentFromBatch",
                                      "inputs": {"samples": ["4", 0], "batch_index": 1, "length": 2}}},
                               "5", [[96, 80], [96, 80]]),
    "batch_with_itself": ({"4": {"class_type": "LatentBatch", "inputs": {"samples1": ["3", 0], "samples2": ["3", 0]}}},
                          "4", [[96, 80], [96, 80]]),
    "upscale_to_size": ({"4": {"class_type": "LatentUpscale",
                               "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "width": 256,
                                          "height": 192, "crop": "disabled"}}},
                        "4", [[256, 192]]),
    "composite_onto_ours": ({"4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                              "batch_size": 1}},
                             "5": {"class_type": "LatentComposite",
                                   "inputs": {"samples_to": ["3", 0], "samples_from": ["4", 0], "x": 0, "y": 0,
                                              "feather": 0}}},
                            "5", [[96, 80]]),
    "core_empty_latent": ({"4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48,
                                                                            "batch_size": 1}}},
                          "4", [[64, 48]]),
}


@pytest.mark.parametrize("case", list(LATENT_CASES), ids=list(LATENT_CASES))
def test_latent_through_core_nodes_decodes_at_its_current_size(server, case):
    """A LATENT changed by a core node decodes at 8x its current samples (an upscale-by keeps the
    recorded aspect and padding, scaled); recorded sizes are used only while they describe samples."""
    middle, decode_from, expected = LATENT_CASES[case]
    seed = abs(hash(case)) % 10_000
    entry = server.run_prompt(_latent_prompt(seed, middle, decode_from))
    assert_success(entry)
    assert image_sizes(server, entry)["10"] == expected


# ---- Cancel ------------------------------------------------------------------------------------------

def _sampler_prompt(seed: int, steps: int) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo_96x80.png"}},
        "2": {"class_type": "PhotoRestoreSupirLoader",
              "inputs": {"sdxl_checkpoint": "sd_xl_base_1.0.safetensors", "supir_checkpoint": "SUPIR-v0Q.ckpt",
                         "weight_dtype": "fp32", "vae_dtype": "fp32"}},
        "3": {"class_type": "PhotoRestoreSupirRestore",
              "inputs": {"supir": ["2", 0], "image": ["1", 0], "upscale_by": 1.0, "preset": "Quality",
                         "seed": seed, "steps": steps, "positive_prompt": "a photo", "negative_prompt": "blurry",
                         "min_short_side": 0, "tiling": "off", "tile_size": 1024, "tile_stride": 512,
                         "color_fix": "Wavelet", "tiled_vae": False}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"cancel_{seed}"}},
    }


def test_cancel_a_running_sample_then_run_again(server):
    """/interrupt stops SUPIR inside its sampling loop (the progress bar had moved), the prompt ends as
    interrupted, and the same workflow then runs to the end."""
    events: list[dict] = []
    with server.websocket(events) as ws:
        prompt_id = server.queue(_sampler_prompt(seed=101, steps=500), client_id=ws.client_id)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(e.get("type") == "progress" and e["data"].get("node") == "3" and e["data"]["value"] >= 2
                   for e in list(events)):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no sampling progress from SUPIR Restore within 300 s; events: {events[-5:]}")
        server.post("/interrupt", {})
        entry = server.wait(prompt_id, timeout=120)
    assert entry["status"]["status_str"] == "error"
    messages = dict((m[0], m[1]) for m in entry["status"]["messages"])
    assert "execution_interrupted" in messages, messages
    assert messages["execution_interrupted"]["node_id"] == "3", messages
    last = max(e["data"]["value"] for e in events if e.get("type") == "progress" and e["data"].get("node") == "3")
    assert last < 400, "the sampler did not stop promptly"

    again = server.run_prompt(_sampler_prompt(seed=102, steps=2), timeout=300)
    assert_success(again)
    assert image_sizes(server, again)["4"] == [[96, 80]]


# ---- The adapter's ComfyUI path, in-process --------------------------------------------------------

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
    except BaseException as e:   # ComfyUI >= 0.33: InterruptProcessingException is a BaseException
        out["interrupt"] = type(e).__name__
        out["interrupt_is_exception"] = isinstance(e, Exception)
    print("RESULT" + json.dumps(out))
    """
)


def test_adapter_uses_comfyui_internals(comfy_tree, tmp_path):
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", ADAPTER_SCRIPT,
                           str(tmp_path), str(REPO_ROOT)], cwd=comfy_tree.path, capture_output=True,
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
    if comfy_tree.version_tuple >= (0, 33):
        assert out["interrupt_is_exception"] is False  # so only `finally` (never `except Exception`) sees it
