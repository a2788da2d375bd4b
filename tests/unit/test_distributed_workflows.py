"""The ComfyUI-Distributed example workflows, read as files (no ComfyUI needed): what a user relies on
when scaling out. tests/integration/test_distributed.py runs them on a master and two workers."""
import json
from pathlib import Path

import pytest

from photo_restoration.nodes.supir_nodes import MAX_SEED

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("distributed_*.json"))
DISTRIBUTED_SEED_MAX = 1125899906842624  # 2**50, ComfyUI-Distributed 1.4.4's DistributedSeed widget maximum
OUR_NODES = "PhotoRestore"


def graph(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    downstream = {}
    for _, src, _, dst, _, _ in wf["links"]:
        downstream.setdefault(src, set()).add(dst)
    return wf, nodes, downstream


def reachable(start, downstream):
    seen, todo = set(), [start]
    while todo:
        for nxt in downstream.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_there_are_two_distributed_examples():
    assert [p.stem for p in WORKFLOWS] == ["distributed_batch_restore", "distributed_many_seeds"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_all_restoration_runs_before_the_collector(path):
    wf, nodes, downstream = graph(path)
    (collector,) = [i for i, n in nodes.items() if n["type"] == "DistributedCollector"]
    after = reachable(collector, downstream)
    assert after and all(nodes[i]["type"] == "SaveImage" for i in after)  # only the master saves
    assert not [nodes[i]["type"] for i in after if nodes[i]["type"].startswith(OUR_NODES)]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_supir_seed_comes_from_a_distributed_seed_within_its_range(path):
    wf, nodes, _ = graph(path)
    links = {l[0]: l for l in wf["links"]}
    (restore,) = [n for n in nodes.values() if n["type"] == "PhotoRestoreSupirRestore"]
    (seed_in,) = [i for i in restore["inputs"] if i["name"] == "seed"]
    source = nodes[links[seed_in["link"]][1]]
    assert source["type"] == "DistributedSeed"
    assert 0 <= source["widgets_values"][0] < DISTRIBUTED_SEED_MAX < MAX_SEED  # the pack's seeds go further


def test_each_participant_picks_its_photo_by_a_fixed_zero_distributed_seed():
    wf, nodes, _ = graph(WORKFLOWS[0])
    links = {l[0]: l for l in wf["links"]}
    (pick,) = [n for n in nodes.values() if n["type"] == "ImageFromBatch"]
    (index_in,) = [i for i in pick["inputs"] if i["name"] == "batch_index"]
    source = nodes[links[index_in["link"]][1]]
    assert source["type"] == "DistributedSeed" and source["widgets_values"] == [0, "fixed"]
    assert pick["widgets_values"][1] == 1  # one photo per participant


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_a_note_explains_the_setup_and_the_plain_comfyui_test_skips_it(path):
    wf, nodes, _ = graph(path)
    notes = " ".join(n["widgets_values"][0] for n in nodes.values() if n["type"] == "Note")
    for words in ("ComfyUI-Distributed", "--enable-cors-header", "Collector", "seed"):
        assert words in notes
    assert wf["extra"]["photo_restoration_test"]["requires"] == ["ComfyUI-Distributed"]
    published = {"sd_xl_base_1.0.safetensors", "SUPIR-v0Q.ckpt"}
    (loader,) = [n for n in nodes.values() if n["type"] == "PhotoRestoreSupirLoader"]
    assert set(loader["widgets_values"][:2]) == published
