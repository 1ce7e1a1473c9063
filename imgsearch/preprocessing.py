"""Preprocessing declared as data.

An encoder does not preprocess images in code of its own: it declares a
:class:`Preprocessing` and the core applies it.  That keeps the decode step,
a faster runtime or a distributed job able to prepare pixels exactly as the
encoder expects without calling back into the plugin, and lets the manifest
record the settings an index was built with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESIZE_POLICIES = ("shorter-side", "stretch")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class Preprocessing:
    """How decoded RGB pixels become an encoder's input tensor.

    ``resize``:
      ``"shorter-side"``: scale so the shorter side is ``resize_to``, then take
      the centre ``input_size`` square (the ImageNet evaluation protocol).
      ``"stretch"``: scale straight to ``input_size`` square, ignoring aspect.
    ``channel_order``: ``"RGB"`` or ``"BGR"`` order of the output channels.
    ``mean`` / ``std``: per output channel, on the 0..255 pixel scale:
      ``out = (pixel - mean) / std``.
    """

    input_size: int = 224
    resize: str = "shorter-side"
    resize_to: int = 256
    interpolation: str = "bilinear"
    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, not {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError("channel_order must be 'RGB' or 'BGR'")
        if self.resize == "shorter-side" and self.resize_to < self.input_size:
            raise ValueError("resize_to must be at least input_size")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @property
    def draft_size(self) -> tuple[int, int]:
        """The smallest size a JPEG may be decoded at without losing detail
        the resize step would keep (Pillow's draft mode never goes below it)."""
        side = self.resize_to if self.resize == "shorter-side" else self.input_size
        return (side, side)

    def resize_image(self, image):
        """Geometry only: a PIL RGB image to a ``(input_size, input_size, 3)``
        uint8 array."""
        from PIL import Image

        resample = {
            "nearest": Image.Resampling.NEAREST,
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
            "lanczos": Image.Resampling.LANCZOS,
        }[self.interpolation]
        size = self.input_size
        if self.resize == "stretch":
            out = image.resize((size, size), resample)
        else:
            width, height = image.size
            scale = self.resize_to / min(width, height)
            new_w = max(size, round(width * scale))
            new_h = max(size, round(height * scale))
            left = (new_w - size) // 2
            top = (new_h - size) // 2
            # Resample only the source region that survives the crop: a
            # 1x400000 strip would otherwise be scaled to gigapixels first.
            sx, sy = new_w / width, new_h / height
            box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
            out = image.resize((size, size), resample, box=box)
        return np.asarray(out, dtype=np.uint8)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """RGB uint8 pixels ``(..., 3)`` to the float32 tensor the encoder takes."""
        x = np.asarray(pixels, dtype=np.float32)
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        if np.any(std != 1.0):
            return (x - mean) / std
        return x - mean
