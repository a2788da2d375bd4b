"""Every widget of every node at its minimum and maximum, every dropdown choice plus an unknown one (what a
hand-edited or API-submitted workflow can send), and awkward strings (empty, 300 KB, NUL, emoji, templates).
Each case: a finite result, or a ValueError naming the widget or its value; inputs unchanged."""
from __future__ import annotations

import pytest

from .fuzz import FULL, call, case, input_specs, node, numeric_limits, outcome, picture, widget_defaults

# Widget values the widgets allow but a 2-core CI machine cannot afford on every push (minutes each on a CPU);
# PHOTORESTORE_FUZZ_FULL=1 runs them too.
COSTLY = {("SupirSampler", "steps", "max"), ("SupirRestore", "steps", "max"),
          ("SupirRestore", "min_short_side", "max"), ("SupirTiles", "min_short_side", "max"),
          ("SupirRestore", "steps", "min"),  # 0 = the preset's 50 steps
          ("LlavaCaption", "max_new_tokens", "max"), ("LlavaCaption", "short_side", "max"),
          ("LlavaCaption", "question", "300KB"), ("LlavaCaption", "template", "300KB")}  # ~300k prompt tokens
HUGE = "restore this photo, " * 15_000  # 300 KB
STRINGS = {"empty": "", "300KB": HUGE, "nul": "a\x00b", "emoji": "a cat \U0001F431 \u00e9\u4e2d\u6587",
           "braces": "{question} {0} {} %s", "newlines": "\n\n\n"}
UNKNOWN = "Ultra"


def _base(short: str, fx: dict) -> dict:
    """Inputs that make each node cheap: tiny pictures, one step, faces skipped."""
    image = picture(1, 32, 48, seed=2)
    base = {
        "SupirFirstStage": {"supir": fx["supir"], "image": image},
        "SupirEncode": {"supir": fx["supir"], "image": image},
        "SupirDecode": {"supir": fx["supir"], "latent": fx["control_latent"]},
        "SupirConditioner": {"supir": fx["supir"]},
        "SupirSampler": {"supir": fx["supir"], "positive": fx["conditioning"][0], "negative": fx["conditioning"][1],
                         "control_latent": fx["control_latent"], "steps": 1, "tiled": True, "tile_size": 256,
                         "tile_stride": 128},
        "SupirColorFix": {"image": image, "reference": image.flip(1)},
        "SupirTiles": {"image": image},
        "SupirRestore": {"supir": fx["supir"], "image": picture(2, 16, 24, seed=3), "steps": 1, "min_short_side": 0,
                         "upscale_by": 1.0, "tiled_vae": False},
        "CodeFormerRestore": {"image": picture(1, 64, 64, seed=4), "codeformer": fx["codeformer"],
                              "face_detector": fx["face_detector"], "face_index": "99", "min_face_size": 8192},
        # no face 99, and faces under 8192 px skipped: all but the 512 px face network runs (~5 s a face)
        "LlavaCaption": {"llava": fx["llava"], "image": image, "max_new_tokens": 3, "short_side": 32},
    }[short]
    return {**widget_defaults(node(short)), **base}


NODES = ["SupirFirstStage", "SupirEncode", "SupirDecode", "SupirConditioner", "SupirSampler", "SupirColorFix",
         "SupirTiles", "SupirRestore", "CodeFormerRestore", "LlavaCaption"]


@pytest.fixture(scope="module")
def fx(supir, conditioning, control_latent, codeformer, face_detector, llava):
    return {"supir": supir, "conditioning": conditioning, "control_latent": control_latent,
            "codeformer": codeformer, "face_detector": face_detector, "llava": llava}


def _short(short: str) -> str:
    return short.removeprefix("Supir") if short.startswith("Supir") else short


def _numeric_cases():
    for short in NODES:
        for name, end, value in numeric_limits(node(short)):
            marks = []
            if (short, name, end) in COSTLY and not FULL:
                marks.append(pytest.mark.skip(reason="costly on a CPU; PHOTORESTORE_FUZZ_FULL=1 runs it"))
            yield case(f"{_short(short)}-{name}-{end}", short, name, value, marks=marks)


def _choice_cases():
    for short in NODES:
        for name, (kind, _opts) in input_specs(node(short)).items():
            if isinstance(kind, (list, tuple)) and kind:
                for choice in kind:
                    yield case(f"{_short(short)}-{name}-{choice}", short, name, choice)
                yield case(f"{_short(short)}-{name}-unknown", short, name, UNKNOWN)


def _string_cases():
    for short in NODES:
        for name, (kind, opts) in input_specs(node(short)).items():
            if kind == "STRING" and not opts.get("forceInput"):
                for label in STRINGS:
                    marks = []
                    if (short, name, label) in COSTLY and not FULL:
                        marks.append(pytest.mark.skip(reason="costly on a CPU; PHOTORESTORE_FUZZ_FULL=1 runs it"))
                    yield case(f"{_short(short)}-{name}-{label}", short, name, STRINGS[label], marks=marks)


def _run(fx, short, name, value, words=()):
    inputs = {**_base(short, fx), name: value}
    cls = node(short)
    words = (name, str(value)[:40], *words)
    outcome(lambda: call(cls, inputs), inputs, words)


@pytest.mark.parametrize("short, name, value", list(_numeric_cases()))
def test_numeric_widget_at_its_limit(fx, short, name, value):
    _run(fx, short, name, value)


@pytest.mark.parametrize("short, name, value", list(_choice_cases()))
def test_every_choice_and_an_unknown_one(fx, short, name, value):
    _run(fx, short, name, value)


@pytest.mark.parametrize("short, name, value", list(_string_cases()))
def test_awkward_strings(fx, short, name, value):
    _run(fx, short, name, value)


# ---- combinations the issue names --------------------------------------------------------------------------

MAX_SEED = 0xFFFFFFFFFFFFFFFF


@pytest.mark.parametrize("short, overrides", [
    case("Restore-seed-max-batch2", "SupirRestore", {"seed": MAX_SEED}),
    case("Sampler-seed-max-batch3", "SupirSampler", {"seed": MAX_SEED, "tiled": False}),
    case("Restore-stride-over-tile", "SupirRestore", {"tiling": "on", "tile_size": 256, "tile_stride": 512}),
    case("Sampler-tiled-stride-over-tile", "SupirSampler", {"tile_size": 256, "tile_stride": 512}),
    case("LlavaCaption-tile-stride-over-tile", "LlavaCaption", {"tile_size": 16, "tile_stride": 64}),
    case("Tiles-stride-over-tile", "SupirTiles", {"tile_size": 256, "tile_stride": 512}),
])
def test_combinations(fx, short, overrides):
    inputs = {**_base(short, fx), **overrides}
    if short == "SupirSampler" and "seed" in overrides:
        lat = fx["control_latent"]
        inputs["control_latent"] = {**lat, "samples": lat["samples"].repeat(3, 1, 1, 1)}
    outcome(lambda: call(node(short), inputs), inputs, list(overrides) + [str(v) for v in overrides.values()])


FACE_INDEX = {"abc": "abc", "open-range": "1-", "huge-range": "0-99999999999", "long-range": "0-2000000",
              "negative": "-1", "spaces": " 0 , 1 ", "all": "all", "reversed-range": "3-1",
              "300KB-list": "0," * 150_000}


@pytest.mark.parametrize("value", [case(f"CodeFormerRestore-face_index-{k}", v) for k, v in FACE_INDEX.items()])
def test_face_index_text(fx, value):
    inputs = {**_base("CodeFormerRestore", fx), "face_index": value, "min_face_size": 8192}
    outcome(lambda: call(node("CodeFormerRestore"), inputs), inputs, ["face_index", value[:20]])


# ---- loader dropdowns ------------------------------------------------------------------------------------

def _loader_choice_cases():
    for short, widgets in {"SupirLoader": ("weight_dtype", "vae_dtype"), "LoadCodeFormer": ("dtype",),
                           "LoadFaceModel": ("dtype",), "LoadFaceDetector": ("parser",),
                           "LoadLlava": ("dtype", "quantization")}.items():
        specs = input_specs(node(short))
        for widget in widgets:
            for choice in [*specs[widget][0], UNKNOWN]:
                label = "unknown" if choice == UNKNOWN else choice
                yield case(f"{short}-{widget}-{label}", short, widget, choice)


@pytest.mark.parametrize("short, widget, value", list(_loader_choice_cases()))
def test_loader_choices(loader_inputs, short, widget, value):
    inputs = {**loader_inputs[short], widget: value}
    # 8bit/4bit LLaVA on a machine without bitsandbytes or CUDA: an environment limit, reported as RuntimeError
    # (a choice whose file is not in the folder, e.g. bisenet here: FileNotFoundError naming the file)
    errors = (ValueError, FileNotFoundError)
    if widget == "quantization" and value != UNKNOWN:
        errors += (RuntimeError,)
    outcome(lambda: call(node(short), inputs), inputs, [widget, str(value), "bitsandbytes"], errors=errors)
