"""Any face restoration network, behind CodeFormer's call ``net(x, w=, adain=)`` on RGB [-1, 1] 512 crops,
so :func:`.pipeline.restore_faces` detects, aligns, restores and pastes with it unchanged.

* CodeFormer files load with the pack's own loader (:func:`.loader.load_codeformer`): fidelity works and no
  extra package is needed.
* Everything else goes through spandrel (shipped with ComfyUI; imported only here, only when needed):
  GFPGAN v1.3 / v1.4 (``GFPGANv1.4.pth``, the "clean" architecture) and RestoreFormer (``RestoreFormer.pth``)
  in spandrel itself (MIT); CodeFormer is also in spandrel_extra_arches (non-commercial licence), which this
  module never needs.
* RestoreFormer++ (``RestoreFormer++.ckpt``, keys ``vqvae.*`` under ``state_dict``), which spandrel 0.4 does not
  detect, is built here from spandrel's RestoreFormer parts as the official ``VQVAEGANMultiHeadTransformer(
  head_size=4, ex_multi_scale_num=1)``: the decoder also attends at 32 px, to the encoder's features of that
  level. The head count is not in the shapes: 4 when the decoder has the extra scale (RestoreFormer++), else 8.

The networks are called as their official inference scripts call them, not through spandrel's
``descriptor(image)`` (which feeds GFPGAN 0..1 instead of its -1..1 and samples StyleGAN noise):

* GFPGAN: ``net(x, return_rgb=False)[0]`` as ``GFPGANer.enhance``; deliberately different: the trained
  constant noise buffers (``randomize_noise=False``) instead of fresh random noise, so a face restores the
  same on every run and at every batch position.
* RestoreFormer: ``net(x)[0]``. Neither uses ``w`` or ``adain``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .loader import SIGNATURE_KEYS as CODEFORMER_KEYS, load_codeformer
from .weights import load_state_dict

FOLDER = "facerestore_models"
PUBLISHED = ("https://github.com/sczhou/CodeFormer/releases (codeformer.pth), "
             "https://github.com/TencentARC/GFPGAN/releases (GFPGANv1.3.pth, GFPGANv1.4.pth, RestoreFormer.pth), "
             "https://github.com/wzhouxiff/RestoreFormerPlusPlus (RestoreFormer++.ckpt)")
KNOWN_FILES = ("codeformer.pth", "GFPGANv1.3.pth", "GFPGANv1.4.pth", "RestoreFormer.pth", "RestoreFormer++.ckpt")
SPANDREL_MISSING = ("{name} is a {arch} model, which is loaded with spandrel; spandrel is not installed. It ships "
                    "with ComfyUI (requirements.txt); outside ComfyUI install it with 'pip install spandrel'.")


class SpandrelFace(torch.nn.Module):
    """A spandrel face network (GFPGAN, RestoreFormer, ...) with CodeFormer's call on [-1, 1] crops."""

    def __init__(self, net: torch.nn.Module, arch: str, descriptor: Any = None):
        super().__init__()
        self.net = net
        self.arch = arch
        self._descriptor = descriptor  # only for architectures without a known official call

    def forward(self, x: torch.Tensor, w: Any = None, adain: Any = None) -> torch.Tensor:
        x = x.contiguous()  # GFPGAN views its features (crops arrive as a permuted NHWC array)
        if self.arch == "GFPGAN":
            return self.net(x, return_rgb=False, randomize_noise=False)[0]
        if self.arch in ("RestoreFormer", "RestoreFormer++"):
            return self.net(x)[0]
        if self.arch == "CodeFormer":  # spandrel_extra_arches' copy
            return self.net(x, w=float(w) if not torch.is_tensor(w) else float(w.flatten()[0]), adain=bool(adain))[0]
        return self._descriptor((x + 1) / 2) * 2 - 1  # spandrel's own call on 0..1


def is_codeformer(state_dict: dict) -> bool:
    return all(k in state_dict for k in CODEFORMER_KEYS)


def _spandrel():
    try:
        import spandrel
    except ImportError:
        return None
    return spandrel


RFPP_PREFIX = "vqvae."
RFPP_HEAD_SIZE = 4  # RestoreFormer++ (official); the original RestoreFormer uses 8
RF_HEAD_SIZE = 8
RF_RESOLUTION = 512


def _looks_like_restoreformer_pp(state_dict: dict) -> bool:
    return any(k.startswith(RFPP_PREFIX) for k in state_dict)


def _count(state_dict: dict, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in state_dict):
        n += 1
    return n


def restoreformer_pp_config(state_dict: dict) -> dict:
    """The RestoreFormer(++) hyper-parameters read from a state dict without the ``vqvae.`` prefix."""
    sd = state_dict
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    n_embed, embed_dim = sd["quantize.embedding.weight"].shape
    z_channels = sd["quant_conv.weight"].shape[1]
    levels = _count(sd, "encoder.down.")
    res = [RF_RESOLUTION // 2 ** i for i in range(levels)]
    enc_attn = tuple(sorted(r for i, r in enumerate(res) if f"encoder.down.{i}.attn.0.q.weight" in sd))
    dec_attn = tuple(sorted(r for i, r in enumerate(res) if f"decoder.up.{i}.attn.0.q.weight" in sd))
    return {
        "n_embed": int(n_embed), "embed_dim": int(embed_dim), "ch": int(ch), "in_channels": int(in_channels),
        "out_ch": int(sd["decoder.conv_out.weight"].shape[0]), "z_channels": int(z_channels),
        "ch_mult": tuple(int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // int(ch) for i in range(levels)),
        "num_res_blocks": _count(sd, "encoder.down.0.block."),
        "double_z": sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
        "enable_mid": "encoder.mid.block_1.norm1.weight" in sd, "attn_resolutions": enc_attn,
        "decoder_attn_resolutions": dec_attn,
        "head_size": RFPP_HEAD_SIZE if set(dec_attn) - set(enc_attn) else RF_HEAD_SIZE,
    }


class RestoreFormerPP(torch.nn.Module):
    """RestoreFormer++: spandrel's RestoreFormer with the official multi-scale decoder (see the module text)."""

    def __init__(self, config: dict):
        super().__init__()
        from spandrel.architectures.RestoreFormer import RestoreFormer

        cfg = dict(config)
        dec_attn = cfg.pop("decoder_attn_resolutions")
        net = RestoreFormer(**cfg, resolution=RF_RESOLUTION, dropout=0.0)
        if tuple(dec_attn) != tuple(cfg["attn_resolutions"]):
            net.decoder = type(net.decoder)(
                ch=cfg["ch"], out_ch=cfg["out_ch"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["num_res_blocks"],
                attn_resolutions=tuple(dec_attn), dropout=0.0, in_channels=cfg["in_channels"],
                resolution=RF_RESOLUTION, z_channels=cfg["z_channels"], enable_mid=cfg["enable_mid"],
                head_size=cfg["head_size"])
        self.encoder, self.decoder, self.quantize = net.encoder, net.decoder, net.quantize
        self.quant_conv, self.post_quant_conv = net.quant_conv, net.post_quant_conv
        self.levels = len(cfg["ch_mult"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        hs = self.encoder(x)
        for i in range(self.levels):  # official: a level without "_atten" features attends to its own output
            if f"block_{i}" in hs:
                hs.setdefault(f"block_{i}_atten", hs[f"block_{i}"])
        quant = self.quantize(self.quant_conv(hs["out"]))[0]
        return self.decoder(self.post_quant_conv(quant), hs), None


def load_restoreformer_pp(state_dict: dict, label: str) -> RestoreFormerPP:
    sd = {k[len(RFPP_PREFIX):]: v for k, v in state_dict.items() if k.startswith(RFPP_PREFIX)}
    try:
        config = restoreformer_pp_config(sd)
    except KeyError as exc:
        raise ValueError(f"{label}: incomplete RestoreFormer++ state dict (missing {exc})") from None
    with torch.random.fork_rng(devices=[]):  # the parts initialise at random: keep the global RNG
        net = RestoreFormerPP(config)
    try:
        net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as exc:  # missing / unexpected keys, wrong shapes
        raise ValueError(f"{label}: not a RestoreFormer++ state dict ({str(exc)[:400]})") from None
    return net.eval().requires_grad_(False)


def load_face_model(source: str | os.PathLike | dict, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ready face network (eval, no grad) on ``device``/``dtype`` from a file or a state dict.

    CodeFormer -> :class:`.arch.CodeFormer`; any other face model spandrel detects -> :class:`SpandrelFace`.
    Errors name the file: unreadable, not a face model (e.g. an upscaler), dtype unsupported, spandrel missing.
    """
    sd, label = load_state_dict(source, kind="face restoration", files=KNOWN_FILES, folder=FOLDER,
                                published=PUBLISHED)
    if is_codeformer(sd):
        return load_codeformer(sd, device=device, dtype=dtype)
    spandrel = _spandrel()
    if _looks_like_restoreformer_pp(sd):
        if spandrel is None:
            raise ImportError(SPANDREL_MISSING.format(name=label, arch="RestoreFormer++"))
        if dtype == torch.float16:
            raise ValueError("dtype: RestoreFormer++ does not run in fp16 (as spandrel's RestoreFormer); "
                             "choose fp32 or bf16")
        net = load_restoreformer_pp(sd, label)
        return SpandrelFace(net, "RestoreFormer++").to(device=device, dtype=dtype).eval().requires_grad_(False)
    if spandrel is None:
        raise ImportError(SPANDREL_MISSING.format(name=label, arch="non-CodeFormer face"))
    try:
        with torch.random.fork_rng(devices=[]):  # spandrel builds with random init: keep the global RNG
            descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(sd)
    except Exception as exc:  # spandrel's UnsupportedModelError and shape errors
        raise ValueError(f"{label} is not a face restoration model spandrel {spandrel.__version__} knows "
                         f"({type(exc).__name__}: {str(exc)[:200]}); supported: CodeFormer, GFPGAN v1.3/v1.4, "
                         f"RestoreFormer, RestoreFormer++") from None
    arch = descriptor.architecture.id if hasattr(descriptor.architecture, "id") else str(descriptor.architecture)
    if getattr(descriptor, "purpose", None) != "FaceSR":
        raise ValueError(f"{label} is a {arch} model for '{getattr(descriptor, 'purpose', '?')}', not a face "
                         f"restoration model; load upscalers with ComfyUI's Load Upscale Model")
    if dtype == torch.float16 and not descriptor.supports_half:
        raise ValueError(f"dtype: {arch} does not run in fp16 (spandrel: supports_half=False); choose fp32 or bf16")
    if dtype == torch.bfloat16 and not descriptor.supports_bfloat16:
        raise ValueError(f"dtype: {arch} does not run in bf16; choose fp32")
    net = descriptor.model.eval().requires_grad_(False)
    model = SpandrelFace(net, arch, descriptor)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def architecture_of(model: torch.nn.Module) -> str:
    """"CodeFormer", "GFPGAN", "RestoreFormer", ... for a model from :func:`load_face_model`."""
    return getattr(model, "arch", type(model).__name__)
