"""Host RAM of the exact tiled VAE stays bounded: SUPIR's First Stage (denoise-encode + decode) on a
1024² image with the tiny weights, tiled (512 px / 64 latent tiles), grows peak RSS by at most 0.6x of
what the untiled network does (measured 0.29x). Each side runs in a fresh process (bench/vae_memory.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


@pytest.mark.slow  # about 90 s of CPU
def test_tiled_first_stage_grows_rss_by_at_most_0_6_of_untiled():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak RSS")
    import vae_memory

    untiled = vae_memory.run_case(1024, "untiled", 512, 64)
    exact = vae_memory.run_case(1024, "exact", 512, 64)
    assert exact["out"] == untiled["out"] == [1, 3, 1024, 1024]
    assert exact["rss_growth_mib"] <= 0.6 * untiled["rss_growth_mib"], (untiled, exact)
