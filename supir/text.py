"""SDXL text conditioning as SUPIR uses it: both text encoders, offline tokenisation, size embeddings.

* Tokeniser: CLIP's byte-pair vocabulary bundled with ``open_clip`` (no download). Every prompt becomes
  ``[SOT] tokens [EOT]``, truncated to 77 by keeping the first 75 tokens and ending with EOT. CLIP-L
  pads with EOT (49407), OpenCLIP bigG pads with 0 (as the official embedders).
* CLIP ViT-L/14 text model (``conditioner.embedders.0.transformer.text_model.*``): transformers'
  ``CLIPTextModel`` from a config read off the weight shapes; context = hidden state after the
  penultimate layer (layer 11 of 12), without the final layer norm.
* OpenCLIP ViT-bigG/14 text tower (``conditioner.embedders.1.model.*``): pre-LN transformer with GELU
  and a causal mask; context = output of the penultimate block (no ``ln_final``); pooled =
  ``ln_final(last block)[EOT position] @ text_projection`` (EOT = the highest token id).
* ``crossattn`` = [CLIP-L | bigG] on the channel axis; ``vector`` = [pooled, E(orig h), E(orig w),
  E(crop top), E(crop left), E(target h), E(target w)] with E the sinusoidal embedding.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import timestep_embedding

CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407
SIZE_EMBED_DIM = 256  # official ConcatTimestepEmbedderND outdim


# ---- tokenisation ---------------------------------------------------------------------------------

def _open_clip_tokenizer_module():
    """``open_clip.tokenizer`` without running ``open_clip/__init__`` (which imports timm, torchvision and
    the model zoo: seconds of start-up for a text tokeniser). The module has no package-relative imports."""
    import importlib.util
    import sys

    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the SDXL tokeniser needs the open-clip-torch package (see requirements.txt)")
    path = next(iter(spec.submodule_search_locations)) + "/tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_photo_restoration_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception:  # an open_clip version whose tokenizer needs its package: import it normally
        import open_clip.tokenizer as module
    return module


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    """open_clip's SimpleTokenizer over its bundled ``bpe_simple_vocab_16e6.txt.gz`` (offline)."""
    return _open_clip_tokenizer_module().SimpleTokenizer()


def encode_text(text: str) -> list[int]:
    """BPE ids of a text, without start/end tokens (lower-cased and cleaned like CLIP)."""
    return bpe_tokenizer().encode(text)


def tokenize(texts: Sequence[str] | str, pad_token: int, context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """[B, 77] int64: SOT, the text's tokens, EOT; too long -> first 75 tokens then EOT; padded with ``pad_token``."""
    if isinstance(texts, str):
        texts = [texts]
    out = torch.full((len(texts), context_length), pad_token, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT_TOKEN] + encode_text(text)[: context_length - 2] + [EOT_TOKEN]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def tokenize_clip_l(texts: Sequence[str] | str) -> torch.Tensor:
    return tokenize(texts, EOT_TOKEN)


def tokenize_clip_g(texts: Sequence[str] | str) -> torch.Tensor:
    return tokenize(texts, 0)


def count_tokens(text: str) -> int:
    """Number of BPE tokens of a text (start/end tokens excluded)."""
    return len(encode_text(text))


PROMPT_MODES = ("official", "keep_positive")


def assemble_prompt(caption: str, positive: str, mode: str = "official", separator: str = "") -> str:
    """The positive text SUPIR conditions on.

    ``official``: ``caption + separator + positive`` (the official joins with no separator); the
    tokeniser later cuts everything after 75 tokens, so a long caption pushes the positive prompt out.
    ``keep_positive``: the positive prompt is always kept whole; the caption is shortened, word by
    word, to the tokens that remain (nothing of it if the positive prompt alone fills the context).
    """
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, not {mode!r}")
    caption, positive = caption or "", positive or ""
    if mode == "official" or not caption:
        return caption + separator + positive if caption else positive
    budget = CONTEXT_LENGTH - 2

    def fits(words: list[str]) -> bool:
        return count_tokens(" ".join(words) + separator + positive) <= budget

    words = caption.split()
    if fits(words):
        return caption + separator + positive
    lo, hi = 0, len(words)  # largest prefix that fits: fits(words[:lo]) holds, words[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(words[:mid]) else (lo, mid)
    kept = " ".join(words[:lo])
    return kept + separator + positive if kept else positive


# ---- size conditioning ----------------------------------------------------------------------------

def _pairs(v, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(v, device=device)
    if t.ndim == 1:
        t = t[None].expand(batch, 2)
    return t


def vector_conditioning(pooled: torch.Tensor, original_size, crop, target_size, embed_dim: int) -> torch.Tensor:
    """[B, P + 6 * embed_dim]: pooled bigG embedding, then E(h), E(w) of the original size, the crop's
    (top, left) and the target size; each of the three may be [B, 2] or one (a, b) pair for all."""
    b = pooled.shape[0]
    parts = [pooled.float()]
    for v in (original_size, crop, target_size):
        t = _pairs(v, b, pooled.device)
        parts.append(timestep_embedding(t.reshape(-1), embed_dim).reshape(b, 2 * embed_dim))
    return torch.cat(parts, dim=1)


def assemble_conditioning(clip_l_hidden: torch.Tensor, clip_g_penultimate: torch.Tensor, pooled: torch.Tensor,
                          original_size=(1024, 1024), crop=(0, 0), target_size=(1024, 1024),
                          embed_dim: int = SIZE_EMBED_DIM) -> dict[str, torch.Tensor]:
    """The SGM conditioning dict ``{"crossattn": [B, 77, Cl + Cg], "vector": [B, P + 6E]}``."""
    crossattn = torch.cat([clip_l_hidden.float(), clip_g_penultimate.float()], dim=-1)
    return {"crossattn": crossattn, "vector": vector_conditioning(pooled, original_size, crop, target_size, embed_dim)}


# ---- CLIP-L (transformers) -------------------------------------------------------------------------

def _heads(width: int) -> int:
    """Attention heads are not visible in the weights: CLIP text towers use 64-wide heads (one head below 64)."""
    return width // 64 if width % 64 == 0 and width >= 64 else 1


def _layers(sd: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if not found or found != set(range(len(found))):
        raise ValueError(f"text encoder weights: no contiguous layers matching {pattern}")
    return len(found)


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"text encoder weights: missing key '{key}'")
    return sd[key]


class ClipL(nn.Module):
    """CLIP ViT-L/14 text model; ``forward(ids)`` -> penultimate-layer hidden states [B, 77, width]."""

    def __init__(self, vocab: int, width: int, layers: int, intermediate: int, positions: int = CONTEXT_LENGTH):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=_heads(width),
                             max_position_embeddings=positions, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                             bos_token_id=SOT_TOKEN, eos_token_id=EOT_TOKEN, pad_token_id=EOT_TOKEN,
                             projection_dim=width, attn_implementation="sdpa")
        hf = CLIPTextModel(cfg)
        if hasattr(hf, "text_model"):  # transformers 4: the module already sits under .text_model
            self.transformer = hf
        else:  # transformers 5 dropped the wrapper level: restore the official key names
            self.transformer = nn.Module()
            self.transformer.text_model = hf
        self.layers = layers

    def hf_model(self) -> nn.Module:
        """The transformers ``CLIPTextModel`` (wherever this transformers version nests it)."""
        return self.transformer if hasattr(self.transformer, "config") else self.transformer.text_model

    def reset_buffers(self) -> None:
        """Recreate the non-persistent ``position_ids`` (lost when built on the meta device)."""
        emb = self.transformer.text_model.embeddings
        device = emb.position_embedding.weight.device
        n = emb.position_embedding.weight.shape[0]
        emb.position_ids = torch.arange(n, device=device).expand(1, -1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.hf_model()(input_ids=ids, output_hidden_states=True)
        return out.hidden_states[self.layers - 1]


# ---- OpenCLIP bigG text tower -------------------------------------------------------------------------

class _MHA(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names (in_proj_weight/bias, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact GELU (ViT-bigG-14 is not a quick-GELU model)


class _ResBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _MHA(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _Mlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, hidden: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_ResBlock(width, heads, hidden) for _ in range(layers)])


class OpenClipText(nn.Module):
    """OpenCLIP text tower; ``forward(ids)`` -> (penultimate block output [B, 77, W], pooled [B, P])."""

    def __init__(self, vocab: int, width: int, layers: int, hidden: int, proj: int, positions: int = CONTEXT_LENGTH):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(positions, width))
        self.transformer = _Transformer(width, layers, _heads(width), hidden)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, proj))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(ids) + self.positional_embedding
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x
        last = self.ln_final(blocks[-1](x))
        pooled = last[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)] @ self.text_projection
        return penultimate, pooled


class _ClipGEmbedder(nn.Module):
    def __init__(self, model: OpenClipText):
        super().__init__()
        self.model = model


# ---- the conditioner ----------------------------------------------------------------------------------

class SDXLTextConditioner(nn.Module):
    """Both SDXL text encoders; ``state_dict()`` keys equal the official ones after ``conditioner.``."""

    def __init__(self, clip_l: ClipL, clip_g: OpenClipText, size_embed_dim: int | None = None):
        super().__init__()
        self.embedders = nn.ModuleList([clip_l, _ClipGEmbedder(clip_g)])
        self.size_embed_dim = size_embed_dim or default_size_embed_dim(clip_g.text_projection.shape[1])

    @property
    def pooled_dim(self) -> int:
        return self.clip_g.text_projection.shape[1]

    def match_adm(self, adm_in_channels: int) -> None:
        """Set the size-embedding width from the UNet's ADM input width (= pooled + 6 * E)."""
        e, rest = divmod(adm_in_channels - self.pooled_dim, 6)
        if rest or e <= 0:
            raise ValueError(f"UNet ADM width {adm_in_channels} does not fit pooled {self.pooled_dim} + 6 x E")
        self.size_embed_dim = e

    @property
    def clip_l(self) -> ClipL:
        return self.embedders[0]

    @property
    def clip_g(self) -> OpenClipText:
        return self.embedders[1].model

    @property
    def device(self) -> torch.device:
        return self.clip_g.positional_embedding.device

    @torch.no_grad()
    def embed(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CLIP-L hidden [B, 77, Cl], bigG penultimate [B, 77, Cg], bigG pooled [B, P]) as float32."""
        hidden_l = self.clip_l(tokenize_clip_l(prompts).to(self.device))
        hidden_g, pooled = self.clip_g(tokenize_clip_g(prompts).to(self.device))
        return hidden_l.float(), hidden_g.float(), pooled.float()

    def encode(self, prompts: Sequence[str] | str, original_size=(1024, 1024), crop=(0, 0),
               target_size=(1024, 1024)) -> dict[str, torch.Tensor]:
        """``{"crossattn": [B, 77, Cl + Cg], "vector": [B, P + 6E]}`` (float32). SUPIR always uses the
        defaults (1024, 1024) / (0, 0) / (1024, 1024), whatever the image size."""
        hidden_l, hidden_g, pooled = self.embed(prompts)
        return assemble_conditioning(hidden_l, hidden_g, pooled, original_size, crop, target_size, self.size_embed_dim)


CLIP_L_PREFIX = "0.transformer.text_model."
CLIP_G_PREFIX = "1.model."
OPTIONAL_KEYS = (CLIP_L_PREFIX + "embeddings.position_ids",)


def default_size_embed_dim(pooled_dim: int) -> int:
    """Width of each size embedding when nothing says otherwise: 256 for SDXL (pooled 1280); tiny test
    models follow ``pooled // 2`` (the public tiny config: pooled 32, E 16). Prefer ``match_adm``."""
    return SIZE_EMBED_DIM if pooled_dim == 1280 else max(pooled_dim // 2, 1)


def build_text_conditioner(sd: dict, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                           size_embed_dim: int | None = None,
                           adm_in_channels: int | None = None) -> SDXLTextConditioner | None:
    """Build both text encoders from a ``conditioner.embedders.``-relative state dict (None when it has
    no text-encoder keys at all). Shapes decide widths, depths and vocabulary; built on the meta device
    and loaded straight into ``dtype`` on ``device``. The width of each size embedding is not in the text
    weights: pass ``size_embed_dim`` (official 256) or the UNet's ``adm_in_channels`` (= pooled + 6 E);
    otherwise :func:`default_size_embed_dim`."""
    if not any(k.startswith(("0.", "1.")) for k in sd):
        return None
    tok_l = _need(sd, CLIP_L_PREFIX + "embeddings.token_embedding.weight")
    fc1 = _need(sd, CLIP_L_PREFIX + "encoder.layers.0.mlp.fc1.weight")
    pos_l = _need(sd, CLIP_L_PREFIX + "embeddings.position_embedding.weight")
    n_l = _layers(sd, re.escape(CLIP_L_PREFIX) + r"encoder\.layers\.(\d+)\.")
    tok_g = _need(sd, CLIP_G_PREFIX + "token_embedding.weight")
    c_fc = _need(sd, CLIP_G_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight")
    proj = _need(sd, CLIP_G_PREFIX + "text_projection")
    pos_g = _need(sd, CLIP_G_PREFIX + "positional_embedding")
    n_g = _layers(sd, re.escape(CLIP_G_PREFIX) + r"transformer\.resblocks\.(\d+)\.")
    if n_l < 2 or n_g < 2:
        raise ValueError("text encoder weights: each text encoder needs at least 2 layers")
    with torch.device("meta"):
        cond = SDXLTextConditioner(
            ClipL(tok_l.shape[0], tok_l.shape[1], n_l, fc1.shape[0], pos_l.shape[0]),
            OpenClipText(tok_g.shape[0], tok_g.shape[1], n_g, c_fc.shape[0], proj.shape[1], pos_g.shape[0]),
            size_embed_dim,
        )
    expected = cond.state_dict()
    rel = {k[len("embedders."):]: k for k in expected}
    missing = [k for k in rel if k not in sd and not k.endswith("logit_scale")]
    if missing:
        raise ValueError(f"text encoder weights: {len(missing)} missing keys, e.g. {missing[:3]}")
    unexpected = [k for k in sd if k not in rel and k not in OPTIONAL_KEYS]
    if unexpected:
        raise ValueError(f"text encoder weights: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    weights = {}
    for r, full in rel.items():
        v = sd.get(r, torch.full([], 4.6052))  # logit_scale is unused here; some exports drop it
        if tuple(v.shape) != tuple(expected[full].shape):
            raise ValueError(f"text encoder weights: '{r}' has shape {tuple(v.shape)}, expected {tuple(expected[full].shape)}")
        weights[full] = v.to(device=device, dtype=dtype)
    cond.load_state_dict(weights, assign=True)
    cond.clip_l.reset_buffers()
    if adm_in_channels is not None:
        cond.match_adm(adm_in_channels)
    return cond.eval().requires_grad_(False)
