"""Scale-out on ComfyUI-Distributed: a master and two workers on loopback run the distributed example
workflows, and every collected PNG equals a single-instance run (same pixels, bit for bit).

* ``distributed_batch_restore``: each participant restores one photo of a batch (photo index and SUPIR
  seed from Distributed Seed), SUPIR then CodeFormer faces; equals one ComfyUI restoring the whole
  batch (image i uses seed + i, faces detected and restored per image).
* ``distributed_many_seeds``: each participant restores the same photo with its own seed; equals one
  ComfyUI restoring a batch of copies.
* the per-photo job route for photos of different sizes: one ``/distributed/queue`` job per photo with
  ``load_balance`` on; each equals that photo restored alone.

ComfyUI: the newest tree (``COMFYUI_PATH`` if set, see ``trees.py``); ComfyUI-Distributed:
``COMFYUI_DISTRIBUTED_PATH``, else ``shared/comfyui-distributed/1.4.4`` beside the checkout (copied to a
temporary folder: it writes ``gpu_config.json`` into its own folder). Skipped when either is missing.
Tiny weights under the published file names. Each participant has its own base directory (same
models, same photos: local workers receive no media). The pack's seeds are changed between workflows
(ComfyUI caches identical prompts).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO_ROOT / "example_workflows"


def _beside_checkout(*parts: str) -> Path | None:
    for parent in REPO_ROOT.parents:
        if (parent / "shared" / Path(*parts)).is_dir():
            return parent / "shared" / Path(*parts)
    return None


DISTRIBUTED_PATH = Path(os.environ.get("COMFYUI_DISTRIBUTED_PATH")
                        or _beside_checkout("comfyui-distributed", "1.4.4") or "/nonexistent")
if not (DISTRIBUTED_PATH / "nodes" / "collector.py").is_file():
    pytest.skip(f"no ComfyUI-Distributed copy (COMFYUI_DISTRIBUTED_PATH={DISTRIBUTED_PATH})", allow_module_level=True)

from .comfy_server import ComfyServer, ui_to_api  # noqa: E402

WORKERS = ("1", "2")
STEPS = 8  # the Quality preset's sampler, shortened: the point is equality, not quality


def write_models(models_dir: Path) -> None:
    """Tiny weights (also under the published file names the workflows use); no LLaVA: no captions here."""
    from photo_restoration.testing.tiny_checkpoints import write_all, writers

    write_all(models_dir, only=[name for name in writers() if "llava" not in name])


def photos() -> dict[str, tuple[int, int]]:
    """Every LoadImage file of the distributed workflows (and the mixed-size route) with its size."""
    sizes = {f"mixed_{k}.png": wh for k, wh in enumerate([(64, 48), (48, 64), (56, 56)])}
    for path in WORKFLOWS.glob("distributed_*.json"):
        sizes.update(json.loads(path.read_text())["extra"]["photo_restoration_test"]["inputs"])
    return sizes


@pytest.fixture(scope="module")
def cluster(newest_comfy_tree, tmp_path_factory):
    from photo_restoration.testing.images import synthetic_photo

    root = tmp_path_factory.mktemp("distributed")
    dist = root / "ComfyUI-Distributed"
    shutil.copytree(DISTRIBUTED_PATH, dist, ignore=shutil.ignore_patterns("__pycache__", "tests", "gpu_config.json"))
    models = root / "models"
    write_models(models)
    env = {"COMFYUI_HEARTBEAT_TIMEOUT": "900", "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    servers = {}
    for name in ("master", *(f"worker{w}" for w in WORKERS)):
        base = root / name
        (base / "input").mkdir(parents=True)
        (base / "models").symlink_to(models, target_is_directory=True)
        for k, (file, (w, h)) in enumerate(sorted(photos().items())):
            synthetic_photo(w, h, seed=k).save(base / "input" / file)
        servers[name] = ComfyServer(newest_comfy_tree.path, base, extra_args=("--enable-cors-header",),
                                    extra_env=dict(env, **({} if name == "master" else {"COMFYUI_IS_WORKER": "1"})),
                                    custom_nodes={"ComfyUI-Distributed": dist})
    workers = [{"id": w, "name": f"worker {w}", "host": "127.0.0.1", "port": servers[f"worker{w}"].port,
                "enabled": True, "type": "local"} for w in WORKERS]
    (dist / "gpu_config.json").write_text(json.dumps({
        "master": {"host": "127.0.0.1"}, "workers": workers,
        "settings": {"worker_timeout_seconds": 900, "auto_launch_workers": False}}, indent=1))
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.start(), servers.values()))
        yield servers
    finally:
        for s in servers.values():
            s.stop()


# ---- prompts ----------------------------------------------------------------------------------

def load_prompt(master: ComfyServer, name: str, seed: int) -> dict:
    """The example workflow as an API prompt, with the SUPIR seed (the Distributed Seed feeding SUPIR's
    seed) set to ``seed``, the sampler shortened to ``STEPS`` and one face per photo and network call."""
    prompt = ui_to_api(json.loads((WORKFLOWS / f"{name}.json").read_text()), master.get("/object_info"))
    (restore,) = [n for n in prompt.values() if n["class_type"] == "PhotoRestoreSupirRestore"]
    restore["inputs"]["steps"] = STEPS
    prompt[restore["inputs"]["seed"][0]]["inputs"]["seed"] = seed
    for node in prompt.values():
        if node["class_type"] == "PhotoRestoreCodeFormerRestore":
            node["inputs"]["max_faces"] = 1  # the tiny detector finds two; each costs ~9 s on one CPU thread
            # one face per network call: faces of several images in one call (before faces were chunked per
            # image) differed in the last float bits, once by one 8-bit step, from one face per call
            node["inputs"]["face_batch_size"] = 1
    return prompt


def single_instance(prompt: dict) -> dict:
    """The same work without ComfyUI-Distributed: Distributed Seeds become their (master) values, an
    ImageFromBatch picking by Distributed Seed and the Collector become pass-throughs."""
    prompt = copy.deepcopy(prompt)
    seeds = {k: n["inputs"]["seed"] for k, n in prompt.items() if n["class_type"] == "DistributedSeed"}
    passthrough = {k: n["inputs"]["images"] for k, n in prompt.items() if n["class_type"] == "DistributedCollector"}
    for k, n in prompt.items():
        if n["class_type"] == "ImageFromBatch" and isinstance(n["inputs"]["batch_index"], list) \
                and n["inputs"]["batch_index"][0] in seeds:
            passthrough[k] = n["inputs"]["image"]
    for k in [*seeds, *passthrough]:
        del prompt[k]
    for n in prompt.values():
        for name, value in n["inputs"].items():
            if isinstance(value, list) and len(value) == 2:
                while isinstance(value, list) and value[0] in passthrough:
                    value = passthrough[value[0]]
                if isinstance(value, list) and value[0] in seeds:
                    value = seeds[value[0]]
                n["inputs"][name] = value
    return prompt


def run(server: ComfyServer, prompt: dict, distributed: bool = False) -> list[np.ndarray]:
    """Run and return the pixels of every PNG the SaveImage nodes wrote, in order."""
    from PIL import Image

    if distributed:
        body = {"prompt": prompt, "client_id": "photo-restoration-tests", "enabled_worker_ids": list(WORKERS)}
        entry = server.wait(server.post("/distributed/queue", body)["prompt_id"])
    else:
        entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"].get("messages"))[-4000:]
    pixels = []
    for node_id, node in prompt.items():
        if node["class_type"] == "SaveImage":
            for img in entry["outputs"][node_id]["images"]:
                with Image.open(server.base_dir / "output" / img.get("subfolder", "") / img["filename"]) as im:
                    pixels.append(np.asarray(im.convert("RGB")))
    return pixels


def assert_same_pngs(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected), f"{len(got)} PNGs, expected {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, f"PNG {i}: {a.shape} != {b.shape}"
        diff = np.abs(a.astype(int) - b.astype(int))
        assert not diff.any(), f"PNG {i}: {int((diff > 0).sum())} values differ, by up to {int(diff.max())}"


# ---- tests ------------------------------------------------------------------------------------

def test_workers_are_up_and_run_the_pack(cluster):
    for server in cluster.values():
        info = server.get("/object_info")
        assert "PhotoRestoreSupirRestore" in info and "DistributedCollector" in info, server.log()[-3000:]


def test_batch_restore_across_workers_equals_a_single_instance_batch(cluster):
    master = cluster["master"]
    prompt = load_prompt(master, "distributed_batch_restore", seed=4242)
    collected = run(master, prompt, distributed=True)
    reference = run(master, single_instance(prompt))
    assert len(reference) == 3 and reference[0].shape == (96, 128, 3)
    assert_same_pngs(collected, reference)
    assert not np.array_equal(collected[0], collected[1])  # three photos, three results


def test_many_seeds_across_workers_equal_a_single_instance_batch_of_copies(cluster):
    master = cluster["master"]
    prompt = load_prompt(master, "distributed_many_seeds", seed=777)
    collected = run(master, prompt, distributed=True)
    reference = single_instance(prompt)
    (load,) = [k for k, n in reference.items() if n["class_type"] == "LoadImage"]
    reference["copies"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [load, 0], "amount": 3}}
    for n in reference.values():
        if n["class_type"] == "PhotoRestoreSupirRestore":
            n["inputs"]["image"] = ["copies", 0]
    assert_same_pngs(collected, run(master, reference))
    assert not np.array_equal(collected[0], collected[1])  # seed, seed + 1


def test_photos_of_different_sizes_as_load_balanced_jobs_equal_single_runs(cluster):
    """The README's route for a folder of mixed sizes: one job per photo, Collector load_balance on, and
    the seed a plain value (a Distributed Seed would add the offset of whichever worker takes the job)."""
    master = cluster["master"]
    base = load_prompt(master, "distributed_many_seeds", seed=99)
    (load,) = [k for k, n in base.items() if n["class_type"] == "LoadImage"]
    (collector,) = [k for k, n in base.items() if n["class_type"] == "DistributedCollector"]
    (restore,) = [n for n in base.values() if n["class_type"] == "PhotoRestoreSupirRestore"]
    del base[restore["inputs"]["seed"][0]]
    restore["inputs"]["seed"] = 99
    base[collector]["inputs"]["load_balance"] = True
    jobs = []
    for k in range(3):
        job = copy.deepcopy(base)
        job[load]["inputs"]["image"] = f"mixed_{k}.png"
        jobs.append(job)
    collected = [run(master, job, distributed=True) for job in jobs]
    for k, job in enumerate(jobs):
        assert_same_pngs(collected[k], run(master, single_instance(job)))
    assert [c[0].shape for c in collected] == [(96, 128, 3), (128, 96, 3), (112, 112, 3)]
