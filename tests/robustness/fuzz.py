"""The rule every robustness case checks, and the pieces to build cases from.

Rule: a node called with an awkward input either returns a sane result (every tensor finite, the shapes the
node promises) or raises a ``ValueError`` (``FileNotFoundError`` for a model that is not there) whose message
names the input -- and it never changes its inputs. Anything else (TypeError, RuntimeError, IndexError, a NaN
picture, a 17 MB string) is a crash-like outcome and fails the case.

Cases whose fix lives on another branch are listed in :data:`FIXED_ELSEWHERE` (one list, so the lead can delete
entries after merging); they run as non-strict xfails.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Sequence

import pytest
import torch

from photo_restoration import NODE_CLASS_MAPPINGS

# PHOTORESTORE_FUZZ_FULL=1 also runs the cases a 2-core CI machine cannot afford on every push.
FULL = os.environ.get("PHOTORESTORE_FUZZ_FULL") == "1"
MAX_MESSAGE = 20_000  # characters: an error or report longer than this is not a clear message
MAX_TEXT_OUTPUT = 1_000_000
UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False", "trust_remote_code=True")

# ---- cases fixed on other branches ----------------------------------------------------------------
# case id -> branch. The lead removes an entry once that branch is merged (strict=False: an entry whose case
# already passes is reported as XPASS, not as a failure).
FIXED_ELSEWHERE: dict[str, str] = {}


def case(case_id: str, *values: Any, marks: Sequence[Any] = ()) -> Any:
    """A ``pytest.param`` with a readable id, xfail-marked when :data:`FIXED_ELSEWHERE` lists it."""
    marks = list(marks)
    branch = FIXED_ELSEWHERE.get(case_id)
    if branch:
        reason = "not fixed on any branch yet" if branch == "none yet" else f"fixed on branch {branch}"
        marks.append(pytest.mark.xfail(reason=reason, strict=False))
    return pytest.param(*values, id=case_id, marks=marks)


# ---- nodes and their widgets ------------------------------------------------------------------------

def node(short: str) -> type:
    """The node class registered as ``PhotoRestore<short>``."""
    return NODE_CLASS_MAPPINGS[f"PhotoRestore{short}"]


def input_specs(cls: type) -> dict[str, tuple[Any, dict]]:
    """name -> (type or choice list, options) over required and optional inputs."""
    spec = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            out[name] = (entry[0], entry[1] if len(entry) > 1 else {})
    return out


def widget_defaults(cls: type) -> dict[str, Any]:
    """Every widget's default value (first choice for a dropdown); connections (IMAGE, MODEL...) are left out."""
    out = {}
    for name, (kind, opts) in input_specs(cls).items():
        if isinstance(kind, (list, tuple)):
            out[name] = opts.get("default", kind[0] if kind else "")
        elif kind in ("INT", "FLOAT", "BOOLEAN", "STRING") and not opts.get("forceInput"):
            out[name] = opts.get("default", {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}[kind])
    return out


def numeric_limits(cls: type) -> list[tuple[str, str, float]]:
    """(widget, "min"|"max", value) for every INT/FLOAT widget with a declared range."""
    out = []
    for name, (kind, opts) in input_specs(cls).items():
        if kind in ("INT", "FLOAT") and not opts.get("forceInput"):
            for end in ("min", "max"):
                if end in opts:
                    out.append((name, end, opts[end]))
    return out


def call(cls: type, inputs: dict, list_inputs: bool | None = None) -> tuple:
    """Run a node as ComfyUI would (INPUT_IS_LIST nodes get every input as a one-element list)."""
    listed = getattr(cls, "INPUT_IS_LIST", False) if list_inputs is None else list_inputs
    args = {k: (v if isinstance(v, list) else [v]) for k, v in inputs.items()} if listed else dict(inputs)
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**args)


# ---- inputs unchanged -------------------------------------------------------------------------------

def snapshot(value: Any) -> Any:
    """A deep copy of every tensor inside dicts / lists / tuples (other values kept as they are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value


def assert_unchanged(value: Any, before: Any, where: str = "input") -> None:
    if isinstance(before, torch.Tensor):
        assert value.shape == before.shape and value.dtype == before.dtype, f"{where} changed shape/dtype"
        assert torch.equal(torch.nan_to_num(value), torch.nan_to_num(before)) and \
            torch.equal(value.isnan(), before.isnan()), f"{where} was modified in place"
    elif isinstance(before, dict):
        assert set(value) == set(before), f"{where} keys changed"
        for k in before:
            assert_unchanged(value[k], before[k], f"{where}[{k!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(value) == len(before), f"{where} length changed"
        for i, (a, b) in enumerate(zip(value, before)):
            assert_unchanged(a, b, f"{where}[{i}]")


# ---- the rule ---------------------------------------------------------------------------------------

def tensors_in(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v)


def texts_in(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from texts_in(v)


def outcome(run: Callable[[], Any], inputs: dict, names: Iterable[str],
            expect: Callable[[Any], None] | None = None,
            errors: tuple[type[BaseException], ...] = (ValueError,)) -> str:
    """Run one case under the rule; returns "result" or "error" (for the caller's extra checks).

    ``names``: words of which the error message must contain at least one (the input's name, its value,
    the file name). ``expect``: checks the result's shapes.
    """
    before = snapshot(inputs)
    try:
        result = run()
    except errors as exc:
        message = str(exc)
        assert len(message) < MAX_MESSAGE, f"error message of {len(message)} characters"
        assert not any(bad in message for bad in UNSAFE_ADVICE), f"the error advises something unsafe: {message}"
        wanted = [str(n).lower() for n in names]
        assert any(n in message.lower() for n in wanted), \
            f"{type(exc).__name__} does not name the input (any of {list(names)}): {message[:2000]}"
        kind = "error"
    else:
        for t in tensors_in(result):
            if t.is_floating_point():
                assert torch.isfinite(t).all(), f"non-finite values in a {tuple(t.shape)} output"
        for s in texts_in(result):
            assert len(s) < MAX_TEXT_OUTPUT, f"a {len(s)}-character text output"
        if expect is not None:
            expect(result)
        kind = "result"
    assert_unchanged(inputs, before)
    return kind


# ---- awkward pictures -------------------------------------------------------------------------------

def picture(b: int, h: int, w: int, c: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g).to(dtype)


def _with(value: float) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        x = picture(1, 32, 48)
        x[:, 4:9, 5:11] = value
        return x
    return make


def _transposed() -> torch.Tensor:
    return picture(1, 48, 32).transpose(1, 2)  # [1,32,48,3], not contiguous


# id -> factory. Sizes stay >= 16 px except where the size itself is the point.
IMAGES: dict[str, Callable[[], torch.Tensor]] = {
    "rgb": lambda: picture(1, 32, 48),
    "rgba": lambda: picture(1, 32, 48, 4),
    "gray": lambda: picture(1, 32, 48, 1),
    "2channel": lambda: picture(1, 32, 48, 2),
    "1x1": lambda: picture(1, 1, 1),
    "15px": lambda: picture(1, 15, 15),
    "16px": lambda: picture(1, 16, 16),
    "odd-size": lambda: picture(1, 17, 33),
    "wide-1to32": lambda: picture(1, 16, 512),
    "tall-32to1": lambda: picture(1, 512, 16),
    "batch0": lambda: picture(0, 32, 48),
    "batch3": lambda: picture(3, 32, 48),
    "nan": _with(float("nan")),
    "posinf": _with(float("inf")),
    "neginf": _with(float("-inf")),
    "out-of-range": lambda: picture(1, 32, 48) * 3 - 1,
    "black": lambda: torch.zeros(1, 32, 48, 3),
    "white": lambda: torch.ones(1, 32, 48, 3),
    "float64": lambda: picture(1, 32, 48, dtype=torch.float64),
    "float16": lambda: picture(1, 32, 48, dtype=torch.float16),
    "non-contiguous": _transposed,
}

IMAGE_WORDS = ("image", "picture", "photo", "pixel", "channel", "batch", "empty", "size", "nan", "inf", "finite",
               "px", "reference")


def expect_images(b: int, h: int, w: int, channels: Sequence[int] = (3,)) -> Callable[[torch.Tensor], None]:
    def check(image: torch.Tensor) -> None:
        assert image.ndim == 4 and image.shape[0] == b and tuple(image.shape[1:3]) == (h, w) \
            and image.shape[3] in channels, f"IMAGE of shape {tuple(image.shape)}, expected [{b},{h},{w},C]"
    return check


def scaled(n: int, factor: float) -> int:
    return math.floor(n * factor + 0.5)
