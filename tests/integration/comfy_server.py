"""Start a real ComfyUI headless on loopback, talk to its HTTP API, and turn UI-format workflows
into the API format that ``/prompt`` takes.

Used with every ComfyUI tree the tests run against (``trees.py``); the Python that runs it is
``COMFYUI_PYTHON`` or the one running the tests.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI process with its own base directory; the pack is linked into its custom_nodes."""

    def __init__(self, comfy_path: Path, base_dir: Path, pack_name: str = "photo_restoration_under_test",
                 extra_args: tuple[str, ...] = ()):
        self.comfy_path = Path(comfy_path)
        self.base_dir = Path(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "comfyui.log"
        self.pack_name = pack_name
        self.proc: subprocess.Popen | None = None
        self.extra_args = tuple(extra_args)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> "ComfyServer":
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / self.pack_name
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PHOTO_RESTORE_MODELS", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early (code {self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self._log.close()
        self.proc = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def queue(self, prompt: dict, client_id: str = "photo-restoration-tests") -> str:
        """Queue an API-format prompt; returns its id."""
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a queued prompt's history entry (success, error or interrupted) and return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                hist = self.get(f"/history/{prompt_id}", timeout=60)
            except (TimeoutError, urllib.error.URLError, ConnectionError):  # busy loading a big model: ask again
                hist = {}
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log()[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f}s")

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for its history entry; returns that entry."""
        return self.wait(self.queue(prompt), timeout)

    @contextlib.contextmanager
    def websocket(self, events: list):
        """Listen on ComfyUI's websocket (as the frontend does) in a background thread; every JSON
        message is appended to ``events``. Yields an object whose ``client_id`` is to be queued with."""
        import asyncio
        import threading
        import uuid

        import aiohttp

        client_id = uuid.uuid4().hex
        stop, ready = threading.Event(), threading.Event()
        url = self.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"

        async def listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(url) as ws:
                    ready.set()
                    while not stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            events.append(json.loads(msg.data))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break

        thread = threading.Thread(target=lambda: asyncio.run(listen()), daemon=True)
        thread.start()
        if not ready.wait(30):
            raise TimeoutError("could not connect to ComfyUI's websocket")
        try:
            yield types.SimpleNamespace(client_id=client_id)
        finally:
            stop.set()
            thread.join(10)


# ---- UI format -> API format -----------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_values(name: str, spec: list) -> int:
    """Widgets that the frontend follows with a hidden companion value in ``widgets_values``."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 1
    if opts.get("image_upload"):
        return 1
    return 0


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (what the frontend saves and templates use) to API format.

    Linked inputs become ``[origin_node_id, origin_slot]``; widget values are matched, in order,
    to the node's widget inputs from ``/object_info`` (a seed widget carries one extra
    control value, an image-upload combo one extra upload value). Muted/bypassed nodes and
    frontend-only nodes (notes) are dropped.
    """
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] not in object_info:
            continue
        info = object_info[node["type"]]
        specs: dict[str, list] = {}
        for section in ("required", "optional"):
            specs.update(info["input"].get(section, {}))
        order = info.get("input_order", {})
        names = list(order.get("required", [])) + list(order.get("optional", [])) or list(specs)
        inputs: dict[str, Any] = {}
        linked = {}
        for inp in node.get("inputs", []) or []:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                linked[inp["name"]] = [str(link[1]), link[2]]
        values = list(node.get("widgets_values", []) or [])
        if isinstance(node.get("widgets_values"), dict):
            values = []
            inputs.update({k: v for k, v in node["widgets_values"].items() if k in specs})
        i = 0
        for name in names:
            spec = specs[name]
            if not _is_widget(spec):
                continue
            if i < len(values):
                inputs[name] = values[i]
            i += 1 + _extra_values(name, spec)
        inputs.update(linked)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
