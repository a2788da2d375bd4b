"""The tile grid: the official window rule, and robustness where the reference crashes."""
import pytest

from photo_restoration.supir.tiles import image_windows, tile_windows


def test_grid_follows_the_official_rule_row_major():
    # latent 24x32, tile 16, stride 8: rows {0, 8}, columns {0, 8, 16} -> 6 tiles, rows outer
    assert tile_windows(24, 32, 16, 8) == [
        (0, 16, 0, 16), (0, 16, 8, 24), (0, 16, 16, 32),
        (8, 24, 0, 16), (8, 24, 8, 24), (8, 24, 16, 32),
    ]


def test_last_window_is_flush_with_the_edge_off_the_stride_grid():
    assert [w[:2] for w in tile_windows(20, 16, 16, 8)] == [(0, 16), (4, 20)]


def test_image_smaller_than_a_tile_gets_one_window():
    assert tile_windows(10, 40, 16, 8)[0] == (0, 10, 0, 16)
    assert tile_windows(5, 7, 16, 8) == [(0, 5, 0, 7)]


def test_every_pixel_is_covered_for_any_size():
    for h, w in [(17, 31), (64, 9), (33, 33), (1, 1)]:
        seen = [[0] * w for _ in range(h)]
        for h0, h1, w0, w1 in tile_windows(h, w, 16, 6):
            assert 0 <= h0 < h1 <= h and 0 <= w0 < w1 <= w
            for y in range(h0, h1):
                for x in range(w0, w1):
                    seen[y][x] = 1
        assert all(all(r) for r in seen)


def test_stride_larger_than_the_tile_is_refused_naming_tile_stride():
    with pytest.raises(ValueError, match="tile_stride"):
        tile_windows(64, 64, 16, 24)
    with pytest.raises(ValueError, match="tile_stride"):
        image_windows(1024, 1024, 512, 768)


def test_image_windows_are_latent_windows_times_eight():
    assert image_windows(192, 256, 128, 64) == [(a * 8, b * 8, c * 8, d * 8) for a, b, c, d in tile_windows(24, 32, 16, 8)]
