"""Developer tool: open every example workflow in ComfyUI's real frontend (headless Chromium) to read the node
sizes the frontend gives them, lay the graphs out with those sizes, and save a thumbnail per workflow.

Not part of the test suite (it needs Chromium and Playwright, which the pack does not depend on)::

    python -m venv /tmp/pw && /tmp/pw/bin/pip install playwright pillow   # + Debian's chromium
    COMFYUI_PYTHON=.venv/bin/python /tmp/pw/bin/python tests/integration/workflow_frontend.py \\
        --comfyui ../shared/comfyui/0.33.0 [--layout] [--thumbnails] [--check]

``--layout`` rewrites ``pos`` / ``size`` in ``example_workflows/*.json``: columns keep the authors' left-to-right
order, nodes are stacked top to bottom with the frontend's sizes, and nodes that show an image after a run get
room below for it. ``--thumbnails`` writes ``example_workflows/<name>.jpg`` (the templates panel asks for them).
``--check`` reports overlapping nodes as the frontend draws them (title bar included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "example_workflows"
TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is drawn above pos[1]
GAP_X, GAP_Y = 60, 50
# nodes that show images after a run (the frontend grows them to fit): room kept below their widgets
PREVIEW_ROOM = {"PreviewImage": 260, "SaveImage": 300, "LoadImage": 0, "PhotoRestoreLlavaCaption": 300,
                "PhotoRestoreSupirTiles": 0, "PreviewAny": 120}


def start_server(comfy: Path, base: Path):
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from comfy_server import ComfyServer  # noqa: E402

    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    subprocess.run([py, "-m", "photo_restoration.testing.tiny_checkpoints", str(base / "models")], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    (base / "input").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for wf in WORKFLOWS.glob("*.json"):
        for node in json.loads(wf.read_text())["nodes"]:
            if node["type"] == "LoadImage":
                Image.new("RGB", (96, 80), (120, 110, 100)).save(base / "input" / node["widgets_values"][0])
    # ComfyUI-Distributed (for the scale-out examples), copied since it writes into its own folder
    extra = {}
    dist = ROOT.parent / "shared" / "comfyui-distributed" / "1.4.4"
    if dist.is_dir():
        import shutil

        shutil.copytree(dist, base / "ComfyUI-Distributed")
        extra["ComfyUI-Distributed"] = base / "ComfyUI-Distributed"
    return ComfyServer(comfy, base, custom_nodes=extra).start()


def measure(page, workflow: dict) -> dict[int, dict]:
    """Load a workflow into the frontend; node id -> {pos, size, type} as the frontend has them."""
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true); }", workflow)
    page.wait_for_timeout(800)
    nodes = page.evaluate("() => window.app.graph._nodes.map(n => ({id: n.id, type: n.type, "
                          "pos: Array.from(n.pos), size: Array.from(n.size)}))")
    return {str(n["id"]): n for n in nodes}


def layout(workflow: dict, sizes: dict[int, dict]) -> dict:
    """Columns by the authors' x order; each node gets the frontend's size and a slot below the previous one."""
    nodes = [n for n in workflow["nodes"]]
    cols: list[list[dict]] = []
    for n in sorted(nodes, key=lambda n: (n["pos"][0], n["pos"][1])):
        if cols and abs(cols[-1][0]["pos"][0] - n["pos"][0]) < 150:
            cols[-1].append(n)
        else:
            cols.append([n])
    x = 40
    for col in cols:
        y = 100
        width = 0
        for n in sorted(col, key=lambda n: n["pos"][1]):
            w, h = sizes[str(n["id"])]["size"]
            w, h = int(round(w)), int(round(h))
            n["size"] = [w, h]
            n["pos"] = [x, y]
            y += h + TITLE + GAP_Y + PREVIEW_ROOM.get(n["type"], 0)
            width = max(width, w)
        x += width + GAP_X
    return workflow


def overlaps(sizes: dict[int, dict]) -> list[tuple[int, int]]:
    boxes = {i: (n["pos"][0], n["pos"][1] - TITLE, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for i, n in sizes.items()}
    bad = []
    ids = sorted(boxes)
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            p, q = boxes[ids[a]], boxes[ids[b]]
            if p[0] < q[2] and q[0] < p[2] and p[1] < q[3] and q[1] < p[3]:
                bad.append((ids[a], ids[b]))
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, type=Path)
    ap.add_argument("--layout", action="store_true")
    ap.add_argument("--thumbnails", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.comfyui, Path(tmp))
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run"])
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(server.url, wait_until="networkidle")
                page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
                page.wait_for_timeout(1500)
                for _ in range(3):  # the templates dialog (and any other) opens over the canvas at start-up
                    page.keyboard.press("Escape")
                    page.wait_for_timeout(300)
                for path in sorted(WORKFLOWS.glob("*.json")):
                    wf = json.loads(path.read_text())
                    sizes = measure(page, wf)
                    missing = [n["type"] for n in sizes.values() if n["type"] is None]
                    if args.layout:
                        wf = layout(wf, sizes)
                        path.write_text(json.dumps(wf, indent=1, ensure_ascii=False) + "\n")
                        sizes = measure(page, wf)
                    bad = overlaps(sizes)
                    print(f"{path.stem}: {len(sizes)} nodes, overlapping pairs {bad}, missing {missing}")
                    failures += bool(bad) and args.check
                    if args.thumbnails:
                        page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1; "
                                      "window.app.graph.setDirtyCanvas(true, true); }")
                        _fit(page)
                        page.mouse.click(800, 600)
                        page.keyboard.press(".")  # the frontend's own "fit view"
                        page.wait_for_timeout(800)
                        shot = Path(tmp) / "shot.png"
                        page.locator("canvas#graph-canvas").screenshot(path=str(shot))
                        _thumbnail(shot, path.with_suffix(".jpg"))
                browser.close()
        finally:
            server.stop()
    return 1 if failures else 0


def _fit(page) -> None:
    """Zoom and pan the canvas so the whole graph is visible."""
    page.evaluate("""() => {
        const c = window.app.canvas, g = window.app.graph;
        let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
        for (const n of g._nodes) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
            x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); }
        const W = c.canvas.width, H = c.canvas.height;
        const s = Math.min(W / (x1 - x0 + 80), H / (y1 - y0 + 80), 1.2);
        c.ds.scale = s; c.ds.offset[0] = -x0 + 40 / s; c.ds.offset[1] = -y0 + 40 / s;
        c.setDirty(true, true); c.draw(true, true);
    }""")
    page.wait_for_timeout(500)


def _thumbnail(shot: Path, out: Path) -> None:
    from PIL import Image

    with Image.open(shot) as im:
        im = im.convert("RGB")
        w, h = im.size
        im = im.crop((int(w * 0.05), int(h * 0.09), int(w * 0.97), int(h * 0.74)))  # no side bar, tabs or minimap
        im.thumbnail((800, 500))
        im.save(out, "JPEG", quality=85)


if __name__ == "__main__":
    raise SystemExit(main())
