"""Load SUPIR (from MODEL/CLIP/VAE) on every ComfyUI tree: SUPIR built from ComfyUI's own objects
equals SUPIR loaded from the files, and with ComfyUI's own ``LoraLoader`` applied to the MODEL and
CLIP, the SUPIR UNet and both text encoders hold exactly the base weights plus the LoRA delta.

Runs inside each real ComfyUI tree, in a subprocess. The tiny SDXL checkpoint becomes ComfyUI objects
through ComfyUI's code: the UNet config detected by ``comfy.model_detection``, an SDXL ``BaseModel``
under a ``ModelPatcher``, a ``comfy.sd.VAE``, and a real ``comfy.sd.CLIP`` (SDXL's clip target, its
widths set through ComfyUI's ``clip_{l,g}_model_config`` model options) loaded from the checkpoint's
CLIP weights. (ComfyUI's checkpoint loader recognises SDXL only at full size; the slow full-size test
in ``test_fullsize.py`` goes through it.) The LoRA is a small random one in the kohya layout
(``lora_unet_*`` / ``lora_te1_*`` / ``lora_te2_*``, ``lora_down`` / ``lora_up`` / ``alpha``); one of its
targets is bigG's v projection, which ComfyUI concatenates into ``in_proj_weight`` when saving.

On ComfyUI >= 0.33 the same is checked once more with the UNet's weights left unpatched in place, as the
dynamic-VRAM patcher (comfy-aimdo, CUDA) keeps them: the patcher's lazily patched dict must be used.
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

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import torch
    sys.path.insert(0, os.getcwd())
    from comfy.cli_args import args
    args.cpu = True
    import folder_paths
    base, repo, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    folder_paths.models_dir = os.path.join(base, "models")
    for key in ("checkpoints", "loras"):
        folder_paths.folder_names_and_paths[key] = ([os.path.join(base, "models", key)],
                                                    folder_paths.supported_pt_extensions)
    import comfy.model_detection, comfy.model_management as mm, comfy.model_patcher, comfy.sd
    import comfy.supported_models, comfy.utils
    import nodes as comfy_nodes
    from safetensors.torch import load_file, save_file

    spec = importlib.util.spec_from_file_location("pack_under_test", os.path.join(repo, "__init__.py"),
                                                  submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec); sys.modules["pack_under_test"] = pack
    spec.loader.exec_module(pack)
    N = sys.modules["pack_under_test.nodes.supir_nodes"]
    import pack_under_test.supir.vae as vae_mod

    ckpt = load_file(os.path.join(base, "models", "checkpoints", "sd_xl_base_1.0.safetensors"))
    ckpt = {k: v.float() for k, v in ckpt.items()}

    # MODEL, as ComfyUI builds it from a checkpoint
    unet_config = comfy.model_detection.detect_unet_config(ckpt, "model.diffusion_model.")
    model_config = comfy.supported_models.SDXL(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model(ckpt, "model.diffusion_model.")
    base_model.load_model_weights(ckpt, "model.diffusion_model.")
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))

    # VAE, as comfy.sd.VAE builds it (tiny widths given explicitly, as ComfyUI only guesses full size)
    vae_sd = comfy.utils.state_dict_prefix_replace(ckpt, {"first_stage_model.": ""}, filter_keys=True)
    cfg = vae_mod.detect_vae_config(vae_sd)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    ddconfig = {"double_z": True, "z_channels": get("z_channels"), "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": get("ch"), "ch_mult": list(get("ch_mult")),
                "num_res_blocks": get("num_res_blocks"), "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd=vae_sd, config={"params": {"ddconfig": ddconfig, "embed_dim": get("embed_dim")}})

    # CLIP: a real comfy.sd.CLIP of SDXL's clip target, at the tiny widths
    clip_sd = model_config.process_clip_state_dict(dict(ckpt))
    def te_config(prefix):
        w = clip_sd[prefix + "transformer.text_model.embeddings.token_embedding.weight"].shape[1]
        layers = len({k.split(".")[5] for k in clip_sd if k.startswith(prefix + "transformer.text_model.encoder.layers.")})
        inter = clip_sd[prefix + "transformer.text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        out = {"hidden_size": w, "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4}
        return out
    options = {"clip_l_model_config": te_config("clip_l."), "clip_g_model_config": te_config("clip_g."),
               "dtype": torch.float32}
    # ComfyUI's bigG projection is square (1280 -> 1280 at full size); the tiny one is 40 -> 32, so the tiny
    # CLIP gets a projection layer of that shape (same layer class) holding the checkpoint's weight
    proj = clip_sd.pop("clip_g.transformer.text_projection.weight")
    clip = comfy.sd.CLIP(model_config.clip_target(clip_sd), state_dict=clip_sd, model_options=options)
    tm = clip.cond_stage_model.clip_g.transformer
    tm.text_projection = type(tm.text_projection)(proj.shape[1], proj.shape[0], bias=False)
    tm.text_projection.weight = torch.nn.Parameter(proj.clone(), requires_grad=False)

    # a random kohya LoRA on one UNet cross-attention key, CLIP-L q, bigG v (concatenated on save) and bigG fc1
    unet_keys = [k for k in base_model.diffusion_model.state_dict() if k.endswith("attn2.to_k.weight")]
    targets = {
        "lora_unet_" + unet_keys[0][:-len(".weight")].replace(".", "_"): ("unet", unet_keys[0]),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            ("te1", "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj":
            ("te2", "clip_g.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight"),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1":
            ("te2", "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight"),
    }
    gen = torch.Generator().manual_seed(7)
    clip_now = clip.cond_stage_model.state_dict()
    unet_now = base_model.diffusion_model.state_dict()
    lora, deltas, rank, alpha, strength = {}, {}, 2, 1.0, 0.75
    for name, (part, key) in targets.items():
        out_f, in_f = (unet_now if part == "unet" else clip_now)[key].shape
        down = torch.randn(rank, in_f, generator=gen) * 0.1
        up = torch.randn(out_f, rank, generator=gen) * 0.1
        lora[name + ".lora_down.weight"], lora[name + ".lora_up.weight"] = down, up
        lora[name + ".alpha"] = torch.tensor(alpha)
        deltas[name] = (strength * (alpha / rank) * (up @ down)).tolist()
    os.makedirs(os.path.join(base, "models", "loras"), exist_ok=True)
    save_file(lora, os.path.join(base, "models", "loras", "tiny_kohya.safetensors"))

    out = {"clip_type": type(clip).__name__}
    from_files = N.LoadSupir().load("sd_xl_base_1.0.safetensors", "SUPIR-v0Q.ckpt", "fp32", "fp32")[0]
    if mode == "plain":
        from_objects = N.LoadSupirFromModel().load(model, clip, vae, "SUPIR-v0Q.ckpt", "fp32", "fp32")[0]
        out["plain"] = {}
        for part in ("diffusion", "vae", "text"):
            a = getattr(from_objects.model, part).state_dict()
            b = getattr(from_files.model, part).state_dict()
            out["plain"][part] = {"keys_equal": sorted(a) == sorted(b), "n": len(a),
                                  "max_abs": max((a[k].float() - b[k].float()).abs().max().item() for k in a)}
    else:
        if mode == "lazy":   # UNet weights left unpatched in place, as the dynamic-VRAM patcher keeps them
            load_models_gpu = mm.load_models_gpu
            mm.load_models_gpu = lambda models, *a, **k: load_models_gpu([m for m in models if m is not model_l],
                                                                           *a, **k)
        model_l, clip_l = comfy_nodes.LoraLoader().load_lora(model, clip, "tiny_kohya.safetensors", strength, strength)
        with_lora = N.LoadSupirFromModel().load(model_l, clip_l, vae, "SUPIR-v0Q.ckpt", "fp32", "fp32")[0]
        changed = {}
        for part in ("diffusion", "text"):
            a = getattr(with_lora.model, part).state_dict()
            b = getattr(from_files.model, part).state_dict()
            for k in a:
                d = a[k].float() - b[k].float()
                if d.abs().max().item() > 0:
                    changed[part + ":" + k] = d
        matched = {}
        for name, delta in deltas.items():
            delta = torch.tensor(delta)
            for k, d in changed.items():
                if d.shape == delta.shape and (d - delta).abs().max().item() < 1e-5:
                    matched[name] = (k, (d - delta).abs().max().item(), 0.0)
                elif d.ndim == 2 and d.shape[1] == delta.shape[1] and d.shape[0] == 3 * delta.shape[0]:
                    n = delta.shape[0]
                    for i in range(3):   # bigG's in_proj_weight = [q; k; v]
                        rest = torch.cat([d[:i * n], d[(i + 1) * n:]])
                        if (d[i * n:(i + 1) * n] - delta).abs().max().item() < 1e-5:
                            matched[name] = (k, (d[i * n:(i + 1) * n] - delta).abs().max().item(),
                                             rest.abs().max().item())
        out["lora"] = {"changed": sorted(changed), "matched": matched, "targets": sorted(deltas)}
    print("RESULT" + json.dumps(out))
    """
)


def _run(tree, tmp_path, mode: str) -> dict:
    from photo_restoration.testing.tiny_checkpoints import write_all

    write_all(tmp_path / "models", only=["supir"])
    proc = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", SCRIPT, str(tmp_path),
                           str(REPO_ROOT), mode], cwd=tree.path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, (proc.stdout + proc.stderr)[-5000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_load_supir_from_comfyui_objects_equals_loading_the_files(comfy_tree, tmp_path):
    out = _run(comfy_tree, tmp_path, "plain")
    assert out["clip_type"] == "CLIP"
    for part, d in out["plain"].items():
        assert d["n"] > 0 and d["keys_equal"], (part, d)
        assert d["max_abs"] == 0.0, (part, d)


def _check_lora(out: dict) -> None:
    lora = out["lora"]
    assert sorted(lora["matched"]) == lora["targets"], lora
    # exactly the targeted tensors changed: UNet key, CLIP-L q, bigG in_proj (v rows only) and bigG fc1
    assert len(lora["changed"]) == len(lora["targets"]), lora["changed"]
    for name, (key, err, rest) in lora["matched"].items():
        assert err < 1e-5 and rest == 0.0, (name, key, err, rest)
    parts = {v[0].split(":")[0] for v in lora["matched"].values()}
    assert parts == {"diffusion", "text"}


def test_load_supir_from_model_with_comfyui_lora_equals_base_plus_delta(comfy_tree, tmp_path):
    _check_lora(_run(comfy_tree, tmp_path, "lora"))
    if comfy_tree.version_tuple >= (0, 33):
        # the dynamic-VRAM patcher never patches UNet weights in place: the patcher's own
        # state_dict_for_saving (lazily patched tensors) must be what SUPIR is built from
        _check_lora(_run(comfy_tree, tmp_path, "lazy"))
