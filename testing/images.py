"""Generated test pictures (no files shipped, nothing downloaded)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colourful RGB picture with a little noise, like a degraded photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([0.5 + 0.4 * np.sin(6 * x + 1), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * np.sin(4 * (x + y))], -1)
    img = img + rng.normal(0, 0.03, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
