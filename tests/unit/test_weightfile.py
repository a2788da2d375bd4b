"""The pack's one weight-file reader (``weightfile.py``): what it accepts, how it unwraps, and that every
damaged, foreign or hostile file is a ValueError naming the file -- never a deep trace, never code run."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from photo_restoration.weightfile import (
    DictSource,
    SafetensorsSource,
    file_format,
    open_weights,
    read_safetensors_header,
    read_weights,
    unwrap_state_dict,
)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.arange(5, dtype=torch.int64),
            "c.half": torch.randn(2, 2, generator=g).half(), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def write_raw_safetensors(path, header: object, data: bytes = b"", length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


class Hostile:
    """Unpickling this would create ``marker``: the reader must refuse it before that happens."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ---- what loads ---------------------------------------------------------------------------------

def test_safetensors_are_read_lazily_tensor_by_tensor_with_metadata(tmp_path):
    save_file(tensors(), str(tmp_path / "w.safetensors"), metadata={"n_head": "4"})
    src = open_weights(tmp_path / "w.safetensors")
    assert isinstance(src, SafetensorsSource) and src.metadata == {"n_head": "4"}
    assert src.shape("a.weight") == (3, 4)
    with src:
        assert_same({k: src.get(k) for k in src.keys()}, load_file(str(tmp_path / "w.safetensors")))
    sd, meta = read_weights(tmp_path / "w.safetensors")
    assert_same(sd, tensors()) and meta == {"n_head": "4"}


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_pickles_load_weights_only_zip_and_legacy(tmp_path, zipfile_format):
    torch.save(tensors(), tmp_path / "w.pth", _use_new_zipfile_serialization=zipfile_format)
    sd, meta = read_weights(tmp_path / "w.pth")
    assert_same(sd, tensors()) and meta == {}
    assert isinstance(open_weights(tmp_path / "w.pth"), DictSource)


def test_the_format_comes_from_the_content_not_the_name(tmp_path):
    save_file(tensors(), str(tmp_path / "really_safetensors.ckpt"))
    torch.save(tensors(), tmp_path / "really_pickle.safetensors")
    assert file_format(tmp_path / "really_safetensors.ckpt") == "safetensors"
    assert file_format(tmp_path / "really_pickle.safetensors") == "torch-zip"
    assert_same(read_weights(tmp_path / "really_safetensors.ckpt")[0], tensors())
    assert_same(read_weights(tmp_path / "really_pickle.safetensors")[0], tensors())


# ---- wrappers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [
    pytest.param(lambda sd: {"params_ema": sd, "params": {"x": torch.zeros(1)}}, id="codeformer.pth params_ema"),
    pytest.param(lambda sd: {"params": sd}, id="basicsr params"),
    pytest.param(lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 10}, id="lightning ckpt state_dict"),
    pytest.param(lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}, id="training model"),
    pytest.param(lambda sd: {"state_dict": {"model": sd}}, id="nested"),
    pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="DataParallel module. prefix"),
    pytest.param(lambda sd: {**sd, "version": "1.0", "step": 7}, id="non-tensor entries dropped"),
])
def test_wrappers_of_the_official_files_are_removed(tmp_path, wrap):
    assert_same(unwrap_state_dict(wrap(tensors())), tensors())
    torch.save(wrap(tensors()), tmp_path / "w.pth")
    assert_same(read_weights(tmp_path / "w.pth")[0], tensors())


@pytest.mark.parametrize("obj, message", [
    ([torch.zeros(1)], "does not hold a state dict"),
    ({}, "holds no tensors"),
    ({"params_ema": {"epoch": 1}}, "holds no tensors"),
    ({"x": torch.zeros(1), "module.x": torch.zeros(1)}, "with and without the 'module.' prefix"),
], ids=["list", "empty", "no tensors", "module collision"])
def test_no_state_dict_is_an_error_naming_the_file(tmp_path, obj, message):
    torch.save(obj, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=rf"odd\.pth.*{message}"):
        read_weights(tmp_path / "odd.pth")


# ---- damaged, foreign and hostile files ----------------------------------------------------------

def _valid_entry(**change):
    return {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **change}


HEADERS = {
    "list not object": ([1, 2], 8, "not an object"),
    "string": ("hello", 8, "not an object"),
    "entry not object": ({"t": [0, 8]}, 8, "'t' is a list"),
    "unknown dtype": ({"t": _valid_entry(dtype="F128")}, 8, "unknown or unsupported dtype 'F128'"),
    "missing dtype": ({"t": {"shape": [2], "data_offsets": [0, 8]}}, 8, "dtype None"),
    "negative shape": ({"t": _valid_entry(shape=[-2])}, 8, "invalid shape"),
    "float shape": ({"t": _valid_entry(shape=[2.0])}, 8, "invalid shape"),
    "bool shape": ({"t": _valid_entry(shape=[True, 2])}, 8, "invalid shape"),
    "shape not list": ({"t": _valid_entry(shape="2")}, 8, "invalid shape"),
    "offsets reversed": ({"t": _valid_entry(data_offsets=[8, 0])}, 8, "invalid data_offsets"),
    "offsets negative": ({"t": _valid_entry(data_offsets=[-8, 0])}, 8, "invalid data_offsets"),
    "offsets three": ({"t": _valid_entry(data_offsets=[0, 4, 8])}, 8, "invalid data_offsets"),
    "bytes shorter than shape": ({"t": _valid_entry(shape=[4])}, 8, "has 8 bytes, but shape \\[4\\] in F32 needs 16"),
    "bytes longer than shape": ({"t": _valid_entry(shape=[1])}, 8, "needs 4"),
    "beyond the data": ({"t": _valid_entry(data_offsets=[8, 16])}, 8, "truncated"),
    "overlap": ({"t": _valid_entry(), "u": _valid_entry(data_offsets=[4, 12])}, 16, "share bytes"),
    "metadata not object": ({"__metadata__": [1], "t": _valid_entry()}, 8, "__metadata__ is not an object"),
}


@pytest.mark.parametrize("header, data_len, message", list(HEADERS.values()), ids=list(HEADERS))
def test_every_header_violation_is_refused_before_reading(tmp_path, header, data_len, message):
    path = tmp_path / "crafted.safetensors"
    write_raw_safetensors(path, header, b"\0" * data_len)
    with pytest.raises(ValueError, match=rf"crafted\.safetensors.*{message}"):
        read_safetensors_header(path)
    with pytest.raises(ValueError, match=r"crafted\.safetensors"):
        read_weights(path)


@pytest.mark.parametrize("length", [0, 1, 2 ** 63, 10 ** 9], ids=["zero", "one", "huge", "past the end"])
def test_insane_header_lengths_are_refused(tmp_path, length):
    path = tmp_path / "len.safetensors"
    write_raw_safetensors(path, {}, b"", length=length)
    with pytest.raises(ValueError, match=r"len\.safetensors.*(not a safetensors|corrupt)"):
        read_weights(path)


def test_empty_headers_and_zero_sized_tensors_are_fine(tmp_path):
    write_raw_safetensors(tmp_path / "e.safetensors", {"t": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                                                       "u": _valid_entry()}, b"\0" * 8)
    sd, _ = read_weights(tmp_path / "e.safetensors")
    assert sd["t"].shape == (0, 3) and sd["u"].tolist() == [0.0, 0.0]


def _files(tmp_path) -> dict[str, object]:
    """Broken files by kind: name -> path."""
    save_file(tensors(), str(tmp_path / "good.safetensors"))
    torch.save(tensors(), tmp_path / "good.pth")
    st, pt = (tmp_path / "good.safetensors").read_bytes(), (tmp_path / "good.pth").read_bytes()
    out = {}
    for name, data in {
        "empty.safetensors": b"", "empty.ckpt": b"",
        "text.safetensors": b"hello, I am a text file, not weights\n" * 10, "text.pth": b"not weights at all\n" * 10,
        "cut.safetensors": st[: len(st) // 2], "cut_header.safetensors": st[:20],
        "cut.pth": pt[: len(pt) // 2], "cut_start.pth": pt[:100],
    }.items():
        (tmp_path / name).write_bytes(data)
        out[name] = tmp_path / name
    return out


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.ckpt", "text.safetensors", "text.pth",
                                  "cut.safetensors", "cut_header.safetensors", "cut.pth", "cut_start.pth"])
def test_empty_text_and_truncated_files_are_errors_naming_the_file(tmp_path, name):
    path = _files(tmp_path)[name]
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}") as info:
        open_weights(path, "SUPIR checkpoint")
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize("name, protocol", [("hostile.ckpt", 2), ("hostile.pth", 0), ("hostile.bin", 4),
                                            ("hostile.safetensors", 2), ("hostile_legacy.pt", None)])
def test_a_hostile_pickle_never_runs_and_the_error_names_the_file(tmp_path, name, protocol):
    marker = tmp_path / "code_ran"
    path = tmp_path / name
    payload = {"weight": torch.zeros(2), "evil": Hostile(marker)}
    if protocol is None:
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif name.endswith(".pth"):
        path.write_bytes(pickle.dumps(payload, protocol=protocol))  # a raw pickle, not torch.save
    else:
        torch.save(payload, path, pickle_protocol=protocol)
    with pytest.raises(ValueError) as info:
        read_weights(path, "SUPIR checkpoint")
    text = str(info.value)
    assert name in text and "weights_only" not in text and "trust" not in text
    assert not marker.exists()
