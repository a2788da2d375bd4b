"""Tiny random LLaVA-1.5 and LLaVA-NeXT folders in the Hugging Face (llava-hf) format.

Everything is built locally: a word-level tokenizer with the ``<image>`` special token (wrapped as a
fast tokenizer), a CLIP / LLaVA-NeXT image processor working at 32 px, and ~60k-parameter models
(CLIP vision tower + Llama text model) saved with ``save_pretrained`` into ``models/LLM/llava-tiny``
and ``models/LLM/llava-next-tiny``. The LLaVA-1.5 folder has no chat template (the pack falls back
to the LLaVA-1.5 conversation); the NeXT folder carries a Mistral-style ``[INST]`` chat template.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32
PATCH = 8
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = ("a an the this its of in on with and is are very photo image picture painting style manner describe "
         "detailed realistic old young man woman child people dog cat bird tree trees flowers grass sky clouds "
         "sun house building street road car window door wall room table chair red blue green yellow black white "
         "brown gray bright dark soft sharp warm cold light shadow face hair eyes smile smiling standing sitting "
         "walking near behind front background foreground colour color texture film vintage portrait landscape "
         "city water river sea beach mountain snow night day evening morning user assistant inst").split()
PUNCTUATION = [".", ",", ":", "!", "?", "[", "]", "/", "'", "-"]
NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% elif message['role'] == 'assistant' %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
)


def tiny_tokenizer():
    """A word-level fast tokenizer (lower-cased words, punctuation split, ``<s>`` prepended)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + PUNCTUATION)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"],
                                   model_input_names=["input_ids", "attention_mask"])


def _configs(vocab_size: int, hidden: int, layers: int, image_size: int, patch: int):
    from transformers import CLIPVisionConfig, LlamaConfig

    heads = max(2, hidden // 128)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch,
                              projection_dim=hidden)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return vision, text


def build_llava(family: str = "llava", seed: int = 0, hidden: int = 32, layers: int = 2,
                image_size: int = IMAGE_SIZE, patch: int = PATCH, vocab_size: int = 0):
    """A random (model, processor) pair of the given family ("llava" or "llava_next") and size.

    The defaults make the ~60k-parameter test models; ``hidden``/``layers``/``image_size``/``patch``/
    ``vocab_size`` (embedding rows beyond the tiny tokenizer's words) scale it up for benchmarks,
    e.g. 4096/32/336/14/32064 for the shapes of LLaVA-1.5-7B's language side.
    """
    import transformers as tf

    tokenizer = tiny_tokenizer()
    vision, text = _configs(max(vocab_size, len(tokenizer)), hidden, layers, image_size, patch)
    common = dict(vision_config=vision, text_config=text, image_token_index=SPECIALS.index("<image>"),
                  vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=3)
    proc_common = dict(tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    pinpoints = [[image_size * a, image_size * b] for a, b in ((1, 1), (1, 2), (2, 1), (2, 2))]
    if family == "llava":
        config = tf.LlavaConfig(**common)
        image_processor = tf.CLIPImageProcessor(size=size, crop_size=crop)
        processor = tf.LlavaProcessor(image_processor=image_processor, **proc_common)
        model_cls = tf.LlavaForConditionalGeneration
    elif family == "llava_next":
        config = tf.LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        image_processor = tf.LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
        processor = tf.LlavaNextProcessor(image_processor=image_processor, chat_template=NEXT_CHAT_TEMPLATE,
                                          **proc_common)
        model_cls = tf.LlavaNextForConditionalGeneration
    else:
        raise ValueError(f"unknown LLaVA family '{family}'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    return model, processor


def save_llava(folder: Path, family: str, seed: int, **size: int) -> list[Path]:
    """Write one folder (sizes as :func:`build_llava`); returns the files written."""
    model, processor = build_llava(family, seed, **size)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return sorted(p for p in folder.iterdir() if p.is_file())


PUBLISHED_LLAVA = "llava-1.5-7b-hf"  # the folder name example workflows use (llava-hf/llava-1.5-7b-hf)


def write_tiny_llava(models_dir: Path, seed: int) -> list[Path]:
    """``models/LLM/llava-1.5-7b-hf`` (a tiny LLaVA-1.5 under the published folder name) and
    ``models/LLM/llava-next-tiny`` (LLaVA-NeXT)."""
    llm = Path(models_dir) / "LLM"
    return save_llava(llm / PUBLISHED_LLAVA, "llava", seed) + save_llava(llm / "llava-next-tiny", "llava_next", seed + 1)


WRITERS = {"llava": write_tiny_llava}
