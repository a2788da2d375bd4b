"""LLaVA captions: Load LLaVA + LLaVA Caption end to end on tiny random LLaVA-1.5 / LLaVA-NeXT folders
(Hugging Face format, written by testing/tiny_llava.py), and the caption helpers' contracts."""
import json

import pytest
import torch
from PIL import Image

from photo_restoration.nodes import comfy as adapter
from photo_restoration.nodes.caption_nodes import LlavaCaption, LoadLlava
from photo_restoration.supir import caption as cap
from photo_restoration.supir.tiles import image_windows
from photo_restoration.testing.tiny_llava import write_tiny_llava

FAST = dict(question="Describe this image.", temperature=0.2, top_p=0.7, max_new_tokens=6, seed=7,
            preprocess="crop", tile_size=0, tile_stride=512, unload_after=False)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_llava(root, seed=0)
    adapter.set_models_dir(root)
    yield root
    adapter.set_models_dir(None)


@pytest.fixture(scope="module")
def llava(models_dir):
    return LoadLlava().load("llava-1.5-7b-hf", "auto", "none")[0]


@pytest.fixture(scope="module")
def llava_next(models_dir):
    return LoadLlava().load("llava-next-tiny", "fp32", "none")[0]


def run(llava, image, **overrides):
    with torch.inference_mode():
        return LlavaCaption().caption(llava, image, **{**FAST, **overrides})


def images(b=2, h=48, w=64, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_loader_lists_the_folders_and_wraps_the_model(llava):
    assert {"llava-1.5-7b-hf", "llava-next-tiny"} <= set(LoadLlava.INPUT_TYPES()["required"]["model"][0])
    assert isinstance(llava.model, cap.Llava) and llava.model.family == "llava"
    assert llava.model.compute_dtype is torch.float32  # auto on the CPU


def test_one_caption_per_picture_as_a_list_and_as_lines(llava):
    captions, text = run(llava, images(2))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert text == "\n".join(captions)
    assert all("\n" not in c and "<" not in c for c in captions)
    assert LlavaCaption.OUTPUT_IS_LIST == (True, False)


def test_seeded_captions_are_deterministic_and_independent_of_the_batch(llava):
    x = images(2)
    first, _ = run(llava, x)
    again, _ = run(llava, x)
    alone, _ = run(llava, x[1:])
    assert first == again
    assert alone == first[1:]


def test_greedy_decoding_ignores_the_seed(llava):
    x = images(1)
    assert run(llava, x, temperature=0.0, seed=1)[0] == run(llava, x, temperature=0.0, seed=2)[0]


def test_batched_generation_matches_one_by_one_when_greedy(llava, llava_next):
    x = images(3)
    assert run(llava, x, temperature=0.0, batch_size=2)[0] == run(llava, x, temperature=0.0)[0]
    # LLaVA-NeXT: pictures of other shapes give prompts of other lengths, left-padded in the group
    pictures = [Image.new("RGB", (64, 32), (200, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 200)),
                Image.new("RGB", (20, 60), (30, 200, 30))]
    settings = cap.CaptionSettings(max_new_tokens=6, temperature=0.0, short_side=0)
    with torch.inference_mode():
        one_by_one = cap.caption_images(llava_next.model, pictures, settings)
        settings.batch_size = 3
        grouped = cap.caption_images(llava_next.model, pictures, settings)
    assert grouped == one_by_one


def test_the_input_image_is_not_modified(llava):
    x = images(2)
    before = x.clone()
    run(llava, x, tile_size=32, tile_stride=16, preprocess="pad")
    assert torch.equal(x, before)


def test_per_tile_mode_gives_one_caption_per_tile_in_sampler_order(llava):
    x = images(2, h=60, w=128)  # sampled at 64x128 (padded to 64 px): a 1 x 3 grid of 64 px tiles, stride 32
    windows = image_windows(64, 128, 64, 32)
    assert len(windows) == 3
    captions, _ = run(llava, x, tile_size=64, tile_stride=32)
    assert len(captions) == 2 * len(windows)
    padded = torch.nn.functional.pad(x.movedim(-1, 1), (0, 0, 0, 4), mode="replicate")
    with torch.inference_mode():
        expected = [cap.caption_group(llava.model, [padded[i, :, h0:h1, w0:w1]], cap.CaptionSettings(
            question=FAST["question"], max_new_tokens=6, seed=7))[0] for i in range(2) for h0, h1, w0, w1 in windows]
    assert captions == expected


def test_small_pictures_are_one_padded_tile_and_tiny_ones_a_clear_error():
    assert cap.tile_pictures(torch.rand(1, 3, 16, 40), 64, 32).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="at least 16 px"):
        cap.tile_pictures(torch.rand(1, 3, 6, 40), 64, 32)


def test_pad_to_square_keeps_the_whole_picture():
    wide = Image.new("RGB", (100, 50), (255, 0, 0))
    padded = cap.prepare_image(wide, "pad", short_side=50, fill=(0.0, 0.0, 1.0))
    assert padded.size == (100, 100)
    assert padded.getpixel((50, 50)) == (255, 0, 0) and padded.getpixel((50, 5)) == (0, 0, 255)
    cropped = cap.prepare_image(wide, "crop", short_side=512)
    assert cropped.size == (1024, 512)  # short side 512, the square crop is the processor's


def test_pad_mode_runs_end_to_end(llava):
    captions, _ = run(llava, images(1, h=24, w=80), preprocess="pad")
    assert len(captions) == 1


def test_llava_next_folder_uses_its_chat_template(llava_next):
    assert llava_next.model.family == "llava_next"
    assert cap.build_prompt(llava_next.model.processor, "q") == "[INST] <image>\nq [/INST]"
    x = images(2)
    captions, _ = run(llava_next, x)
    assert len(captions) == 2 and captions == run(llava_next, x)[0]


def test_llava_15_uses_the_official_vicuna_v1_conversation(llava):
    """Official SUPIR LLavaAgent: conv_templates["vicuna_v1"] (llava/conversation.py, SeparatorStyle.TWO) with
    one user turn "<image>\\n" + question and an open assistant turn -- system sentence, then USER: / ASSISTANT:."""
    official = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: <image>\nDescribe this image "
                "and its style in a very detailed manner. ASSISTANT:")
    assert cap.build_prompt(llava.model.processor, cap.DEFAULT_QUESTION) == official
    assert cap.build_prompt(llava.model.processor, cap.DEFAULT_QUESTION, family="llava") == official
    assert cap.build_prompt(None, "q", "Q: {question} A:") == "<image>\nQ: q A:"
    assert cap.build_prompt(None, "q", "USER: <image>\\n{question} ASSISTANT:") == "USER: <image>\nq ASSISTANT:"


def test_captions_are_cleaned():
    assert cap.clean_caption("ASSISTANT: A photo\nof a dog.</s>") == "A photo of a dog."
    assert cap.clean_caption("  <s> a  cat <pad>", special_tokens=["<pad>"]) == "a cat"


def test_missing_folder_error_says_where_to_put_it(models_dir):
    with pytest.raises(FileNotFoundError) as err:
        LoadLlava().load("llava-1.5-13b-hf", "auto", "none")
    message = str(err.value)
    assert "llava-1.5-13b-hf" in message and "models/LLM/" in message and "llava-hf/llava-1.5-7b-hf" in message


def test_unsupported_folders_are_refused_clearly(tmp_path):
    (tmp_path / "orig").mkdir()
    (tmp_path / "orig" / "config.json").write_text(json.dumps(
        {"model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "mm_vision_tower": "openai/clip"}))
    with pytest.raises(ValueError, match="original LLaVA"):
        cap.read_family(tmp_path / "orig")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="qwen2_vl"):
        cap.read_family(tmp_path / "qwen")
    with pytest.raises(FileNotFoundError, match="config.json"):
        cap.read_family(tmp_path)


def test_quantization_without_bitsandbytes_is_a_clear_error(models_dir, monkeypatch):
    real = cap.importlib.util.find_spec
    monkeypatch.setattr(cap.importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(RuntimeError, match="bitsandbytes"):
        LoadLlava().load("llava-1.5-7b-hf", "fp16", "8bit")


class Cancel(Exception):
    pass


class Callbacks:
    def __init__(self, cancel_at=None):
        self.steps, self.checks, self.cancel_at = [], 0, cancel_at

    def progress(self, step, total, preview=None):
        self.steps.append((step, total))

    def check_interrupt(self):
        self.checks += 1
        if self.cancel_at is not None and self.checks >= self.cancel_at:
            raise Cancel()


def test_progress_per_picture_and_cancel_during_generation(llava):
    pictures = images(3).movedim(-1, 1)
    cb = Callbacks()
    settings = cap.CaptionSettings(max_new_tokens=4)
    with torch.inference_mode():
        cap.caption_images(llava.model, pictures, settings, cb)
    assert cb.steps == [(1, 3), (2, 3), (3, 3)]
    assert cb.checks > 3  # before each picture and on every generated token
    with pytest.raises(Cancel), torch.inference_mode():
        cap.caption_images(llava.model, pictures, settings, Callbacks(cancel_at=2))


def test_unload_after_moves_the_model_back_and_global_rng_is_untouched(llava):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    run(llava, images(1), unload_after=True)
    assert torch.equal(torch.rand(1), expected)
    assert llava.model.compute_device.type == "cpu"


def test_pil_pictures_are_accepted(llava):
    with torch.inference_mode():
        got = cap.caption_images(llava.model, [Image.new("RGB", (40, 30), (10, 200, 30))],
                                 cap.CaptionSettings(max_new_tokens=4))
    assert len(got) == 1


def test_memory_estimate_grows_with_the_group_and_the_caption_length(llava):
    base = cap.generation_memory(llava.model, cap.CaptionSettings())
    assert cap.generation_memory(llava.model, cap.CaptionSettings(batch_size=4)) > base
    assert cap.generation_memory(llava.model, cap.CaptionSettings(max_new_tokens=2048)) > base


def test_incomplete_folder_is_a_clear_error(models_dir, tmp_path):
    broken = tmp_path / "llava-broken"
    broken.mkdir()
    (broken / "config.json").write_text((models_dir / "LLM" / "llava-1.5-7b-hf" / "config.json").read_text())
    with pytest.raises(ValueError, match="llava-broken"):
        cap.load_llava(broken, torch.float32)
