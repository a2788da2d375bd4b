"""LLaVA captions in groups (``batch_size`` > 1) are per-picture: a picture's sampled caption is the one
it gets when captioned alone, whatever its neighbours are. Scale-out (ComfyUI-Distributed) and any batch
split rely on it: a worker that captions one photo must say what a single-instance batch run says.

Each picture of a group draws its sampling noise from its own generator seeded with the caption seed
(Gumbel-max over transformers' own temperature / top-k / top-p warpers), so no draw is shared.
Tiny random LLaVA-1.5 / LLaVA-NeXT folders from testing/tiny_llava.py; a high temperature so that the
samples really depend on the noise.
"""
import pytest
import torch
from PIL import Image

from photo_restoration.supir import caption as cap
from photo_restoration.testing.tiny_llava import PUBLISHED_LLAVA, write_tiny_llava


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_tiny_llava(root, seed=0)
    return root / "LLM"


@pytest.fixture(scope="module")
def llava(folders):
    return cap.load_llava(folders / PUBLISHED_LLAVA, torch.float32)


@pytest.fixture(scope="module")
def llava_next(folders):
    return cap.load_llava(folders / "llava-next-tiny", torch.float32)


def pictures(n, seed=0, h=48, w=64):
    return list(torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)).unbind(0))


def captions(model, images, batch_size, **overrides):
    settings = cap.CaptionSettings(**{**dict(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=11,
                                             short_side=0, batch_size=batch_size), **overrides})
    with torch.inference_mode():
        return cap.caption_images(model, images, settings)


def test_a_group_gives_each_picture_its_caption_alone(llava):
    x = pictures(4)
    alone = [captions(llava, [p], 1)[0] for p in x]
    assert captions(llava, x, 4) == alone
    assert captions(llava, x, 3) == alone  # a group of 3 and a group of 1
    assert len(set(alone)) > 1  # the pictures really get different samples


def test_a_caption_does_not_depend_on_its_neighbours(llava):
    x = pictures(3)
    other = pictures(3, seed=5)
    mixed = [other[0], x[1], other[2]]
    assert captions(llava, x, 3)[1] == captions(llava, mixed, 3)[1]


def test_the_same_picture_twice_in_a_group_gets_the_same_caption(llava):
    p = pictures(1)[0]
    first, second = captions(llava, [p, p], 2)
    assert first == second == captions(llava, [p], 1)[0]


def test_the_seed_still_changes_the_samples(llava):
    x = pictures(3)
    assert captions(llava, x, 3, seed=1) != captions(llava, x, 3, seed=2)


def test_llava_next_left_padded_groups_are_per_picture(llava_next):
    # other shapes give prompts of other lengths: the group is left-padded
    x = [Image.new("RGB", (64, 32), (200, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 200)),
         Image.new("RGB", (20, 60), (30, 200, 30))]
    alone = [captions(llava_next, [p], 1)[0] for p in x]
    assert captions(llava_next, x, 3) == alone


def test_sampling_leaves_the_global_rng_alone(llava):
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    captions(llava, pictures(2), 2)
    assert torch.equal(torch.rand(2), expected)
