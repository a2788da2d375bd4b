"""Every case of the parity fixture folders runs through the production code.

One test item per case file: ``test_parity[supir-<case>]`` / ``test_parity[codeformer-<case>]``,
so ``pytest -k supir`` selects exactly the SUPIR cases and a failure names its case.

``test_parity_winograd[...]`` runs every case again, once per Winograd variant (F(2x2, 3x3) and F(4x4, 3x3),
:mod:`photo_restoration.winograd`) taking every float32 3x3 / stride 1 convolution, however small the map or few
the channels: the tiny fixture networks stay below its production thresholds, full-size ones do not, and the
same tolerance must hold either way.
"""
import pytest

from .harness import case_params, run_case


@pytest.mark.parametrize("case", case_params("supir") + case_params("codeformer"))
def test_parity(case):
    run_case(case)


# the kinds whose networks have 3x3 convolutions
CONV_KINDS = {"codeformer_forward", "first_stage", "first_stage_tiled", "pipeline", "restore_edm_sampler",
              "tiled_restore_edm_sampler", "unet_control_forward"}


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("case", case_params("supir") + case_params("codeformer"))
def test_parity_winograd(case, tile, monkeypatch):
    from photo_restoration import winograd

    monkeypatch.setattr(winograd, "tile_size", lambda x, weight: tile)
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(1) or real(*a))
    run_case(case)
    if case.__class__.__name__ == "Case" and case.kind in CONV_KINDS:
        assert calls, f"{case.name}: no convolution took the Winograd path"
