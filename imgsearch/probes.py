"""Synthetic, natural-looking probe images for checking an exported model.

An export is checked against the model it came from on inputs like those it
will see: pictures with the statistics of photographs (a 1/f amplitude
spectrum, correlated colour channels, flat regions with sharp edges),
made from a fixed seed and put through the encoder's own preprocessing, so
each encoder is probed at its own input scale (ResNet50's inputs span about
+-150, EfficientNet-Lite0's about +-1).  Noise of a fixed range would leave
one of them far outside what it ever sees.
"""

from __future__ import annotations

import numpy as np

PROBE_IMAGES = 8


def probe_pixels(size: int, count: int = PROBE_IMAGES, seed: int = 0) -> np.ndarray:
    """``count`` uint8 RGB images ``(count, size, size, 3)``, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    falloff = np.maximum(np.hypot(fx, fy), 1.0 / size) ** -1.3  # amplitude ~ 1/f^1.3, as in photographs
    y, x = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        # Brightness and two colour-opponent channels, each a 1/f field; colour varies less than brightness.
        fields = []
        for spread in (1.0, 0.35, 0.35):
            spectrum = falloff * np.exp(2j * np.pi * rng.random((size, size)))
            field = np.real(np.fft.ifft2(spectrum))
            fields.append(spread * field / (field.std() + 1e-12))
        lum, red_green, blue_yellow = fields
        image = np.stack([lum + red_green - 0.5 * blue_yellow, lum - red_green - 0.5 * blue_yellow,
                          lum + blue_yellow], axis=-1)
        # A few flat shapes with sharp edges, as objects in front of a background.
        for _ in range(int(rng.integers(2, 6))):
            cy, cx, ry, rx = rng.random(4) * [1, 1, 0.3, 0.3] + [0, 0, 0.05, 0.05]
            inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
            image[inside] = rng.normal(0, 1.2, 3) + 0.2 * image[inside]
        # A random overall tint and contrast, then the 0..255 range of an 8-bit photo.
        image = image * rng.uniform(0.5, 1.0) + rng.normal(0, 0.4, 3)
        image = 128 + 48 * image
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)
