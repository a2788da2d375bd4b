"""Packaging rules: how the pack presents itself to ComfyUI, the registry and users' installs."""
import ast
import re
import tomllib
from pathlib import Path

import photo_restoration
from photo_restoration import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from photo_restoration.nodes import IMPORT_ERRORS

ROOT = Path(__file__).resolve().parents[2]
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def test_every_node_module_imports():
    assert not IMPORT_ERRORS, IMPORT_ERRORS


def test_node_ids_are_prefixed_and_classic_api_is_complete():
    assert NODE_CLASS_MAPPINGS
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("PhotoRestore"), node_id
        assert node_id in NODE_DISPLAY_NAME_MAPPINGS
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        assert hasattr(cls, cls.FUNCTION), f"{node_id}.{cls.FUNCTION} missing"
        assert cls.DESCRIPTION and cls.CATEGORY
        assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        for t in cls.RETURN_TYPES:
            builtin = t in {"IMAGE", "MASK", "LATENT", "STRING", "INT", "FLOAT", "BOOLEAN", "MODEL",
                            "CLIP", "VAE", "CONDITIONING", "UPSCALE_MODEL"}
            assert builtin or t.startswith("PHOTORESTORE_"), f"{node_id}: custom type {t} must be prefixed"


def python_files(*dirs):
    for d in dirs:
        yield from (ROOT / d).rglob("*.py")


SHARED_MODULES = {"weightfile", "subpixel", "winograd", "scratch", "groupnorm", "layout", "gemm"}  # pack-root modules every model family uses (no ComfyUI, no nodes)


def test_model_code_never_imports_comfyui_or_nodes():
    banned = {"comfy", "folder_paths", "comfy_api", "nodes", "server", "latent_preview", "execution"}
    for path in python_files("supir", "codeformer"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative imports stay inside the package (supir/ or codeformer/)
                    depth = len(path.relative_to(ROOT).parts) - 1
                    imported = {node.module} if node.module else {a.name for a in node.names}  # from .. import x
                    shared = node.level == depth + 1 and imported <= SHARED_MODULES
                    assert node.level <= depth or shared, f"{path.relative_to(ROOT)} reaches outside its package"
                    continue
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not set(names) & banned, f"{path.relative_to(ROOT)} imports {names}"


def test_only_the_adapter_touches_comfyui():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|folder_paths|comfy_api|server|latent_preview)\b", re.M)
    for path in python_files("nodes", "supir", "codeformer", "testing"):
        if path.name == "comfy.py" and path.parent.name == "nodes":
            continue
        assert not pattern.search(path.read_text()), f"{path.relative_to(ROOT)} imports ComfyUI"


def test_no_sys_path_edits_and_no_absolute_imports_of_the_pack():
    edits = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=")
    for path in [*ROOT.glob("*.py"), *python_files("nodes", "supir", "codeformer", "testing")]:
        text = path.read_text()
        assert not edits.search(text), f"{path.relative_to(ROOT)} edits sys.path"
        assert not re.search(r"^\s*(from|import)\s+(supir|codeformer|nodes|testing)\b", text, re.M), path


def test_requirements_and_pyproject_never_pin_torch():
    reqs = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    names = {re.split(r"[<>=!~\[ ;]", r)[0].lower() for r in reqs if r}
    assert not names & TORCH_FAMILY
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in meta["project"]["dependencies"]}
    assert not deps & TORCH_FAMILY
    assert names == deps, "requirements.txt and pyproject dependencies differ"
    for dep in ("safetensors", "einops", "open-clip-torch", "omegaconf", "facexlib", "kornia", "transformers"):
        assert dep in deps
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["project"]["version"])
    assert meta["project"]["version"] == photo_restoration.__version__
    assert "Repository" in meta["project"]["urls"]


def test_no_registry_banned_patterns():
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if rel[0].startswith(".venv") or rel[0] == "tests":
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(eval|exec)\(", text, re.M), path
        # no run-time package installation (registry rule); mentioning "pip install" in a message is fine
        assert not re.search(r"subprocess[^\n]*pip|['\"]pip['\"]\s*,\s*['\"]install", text), path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"


def test_example_workflows_are_ui_format_with_known_nodes():
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        import json

        wf = json.loads(path.read_text())
        for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
            assert key in wf, f"{path.name}: missing {key}"
        for node in wf["nodes"]:
            t = node["type"]
            assert not t.startswith("PhotoRestore") or t in NODE_CLASS_MAPPINGS, f"{path.name}: unknown node {t}"
