"""Inside each real ComfyUI tree, a sampler step's denoised latent becomes a preview picture on the node's
progress bar, and the steps of image 2 of a batch continue the bar."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]

PREVIEW_SCRIPT = """
import sys, os, json, importlib.util, torch
sys.path.insert(0, os.getcwd())
from comfy.cli_args import args, LatentPreviewMethod
args.cpu = True
args.preview_method = LatentPreviewMethod.Latent2RGB
import folder_paths, comfy.model_management, comfy.utils
spec = importlib.util.spec_from_file_location("pack_under_test", os.path.join(sys.argv[1], "__init__.py"),
                                              submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = pack; spec.loader.exec_module(pack)
adapter = sys.modules["pack_under_test.nodes.comfy"]
io = sys.modules["pack_under_test.nodes.supir_io"]
pipeline = sys.modules["pack_under_test.supir.pipeline"]
seen = []
comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: seen.append([v, t, type(p[1]).__name__ if p else None]))
with adapter.Progress(4, "x") as bar:
    cb = pipeline._Part(io.NodeCallbacks(bar, previews=True), 1, 2)  # image 2 of a batch of 2
    cb.progress(1, 2, preview=torch.randn(1, 4, 8, 8))
    cb.progress(2, 2, preview=None)
print("RESULT" + json.dumps(seen))
"""


def test_sampler_progress_carries_latent_previews_in_comfyui(comfy_tree):
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", PREVIEW_SCRIPT, str(REPO_ROOT)],
                          cwd=comfy_tree.path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert seen == [[3, 4, "Image"], [4, 4, None]]
