"""Finding image files, decoding them to RGB, and the reasons for skipping one."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import first_line

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_MEGAPIXELS = 100.0


@dataclass(frozen=True)
class ImageFile:
    """A file to index and the label its location implies (may be None)."""

    path: Path
    label: str | None


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


class DecodeError(Exception):
    """A file that cannot become an image; the message is the skip reason."""


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` (which is not a regular file) cannot be indexed."""
    try:
        path.stat()
    except OSError as exc:
        if path.is_symlink():
            return f"broken symbolic link ({exc.strerror or exc})"
        if isinstance(exc, PermissionError):
            return "permission denied"
        return "no such file or folder"
    return "not a regular file"


def discover(paths) -> tuple[list[ImageFile], list[Skipped]]:
    """Every image file named in or below ``paths``, in a stable order.

    A file given by name is taken whatever its suffix (the decoder decides);
    inside folders only known image suffixes are taken.  An image that sits in
    a sub-folder of a given folder is labelled with its parent folder's name
    (``root/<label>/photo.jpg``).  Links to folders are not followed, so a
    link loop is walked once; broken links and unreadable folders are skipped
    with a reason.
    """
    found: list[ImageFile] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()

    def add(path: Path, label):
        if path in seen:
            return
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            # Undecodable bytes in a name cannot be stored or printed as text.
            shown = Path(str(path).encode("utf-8", "backslashreplace").decode("utf-8"))
            skip(shown, "file name is not valid UTF-8; rename the file")
            seen.add(path)
            return
        seen.add(path)
        found.append(ImageFile(path, label))

    def skip(path: Path, reason: str):
        if path not in seen:
            seen.add(path)
            skipped.append(Skipped(path, reason))

    def unreadable(exc: OSError):
        skip(Path(exc.filename), "permission denied" if isinstance(exc, PermissionError)
             else f"cannot read folder ({exc.strerror or exc})")

    for given in paths:
        # Absolute and without '..', so one file always has one path.
        root = Path(os.path.abspath(given))
        if root.is_file():
            add(root, None)
        elif root.is_dir():
            for folder, dirs, files in os.walk(root, onerror=unreadable):
                dirs.sort()
                folder_path = Path(folder)
                label = folder_path.name if folder_path != root else None
                for name in sorted(files):
                    path = folder_path / name
                    if path.suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    if path.is_file():
                        add(path, label)
                    else:  # a broken link, a pipe, a device: never opened
                        skip(path, _not_a_file(path))
        else:
            skip(root, _not_a_file(root))
    return found, skipped


def _to_rgb(image):
    """Any Pillow mode to RGB, as the picture would look on screen."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own conversion clips 16-bit values at 255 instead of scaling.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        image = Image.fromarray(((array - array.min()) * (255.0 / span)).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas are shown as white, not as whatever colour hides there.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ISO base-media brands of image formats Pillow has no reader for.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


def _unidentified_reason(data: bytes) -> str:
    """Why Pillow could not identify ``data``, as specifically as we can tell."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        kind = "AVIF" if data[8:12] in (b"avif", b"avis") else "HEIC/HEIF"
        return f"unsupported format ({kind}; convert it to JPEG or PNG)"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return "not an image (an HTML/XML/SVG document)"
    try:
        data[:512].decode("utf-8")
        return "not an image (text)"
    except UnicodeDecodeError:
        return "unsupported format or not an image"


def decode(data: bytes, *, draft_size=None, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS):
    """Image file bytes to an upright RGB PIL image, or :class:`DecodeError`.

    ``draft_size``: JPEGs are decoded at a reduced scale (Pillow's draft mode)
    as long as both sides stay at least this large, which makes large photos
    several times faster to decode with no loss at the encoder's input size.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise DecodeError("empty file")
    limit = int(max_megapixels * 1e6)
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        # Pillow's own guard is global; ours is checked below from the header
        # alone, so Pillow's must never be the stricter one.
        Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limit:
                raise DecodeError(
                    f"image too large ({width}x{height}, {width * height / 1e6:.0f} megapixels; "
                    f"limit {max_megapixels:g}, see --max-megapixels)"
                )
            if draft_size and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.seek(0)  # the first frame of animations and multi-page files
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(_unidentified_reason(data)) from None
    except Image.DecompressionBombError:
        raise DecodeError(
            f"image too large (over {2 * max_megapixels:g} megapixels; limit {max_megapixels:g}, "
            "see --max-megapixels)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image data ({first_line(exc)})") from None
    except MemoryError:
        raise DecodeError("not enough memory to decode this image") from None
    except Exception as exc:  # Pillow's plugins raise more kinds than they document
        raise DecodeError(f"cannot decode ({type(exc).__name__}: {first_line(exc)})") from None


def to_pixels(data: bytes, preprocessing, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS):
    """File bytes to an encoder's resized uint8 pixels, and the upright size.

    The one road from bytes to pixels, shared by indexing, queries,
    evaluation and the vectorizer service, so that their vectors agree.
    """
    image = decode(data, draft_size=preprocessing.draft_size, max_megapixels=max_megapixels)
    return preprocessing.resize_image(image), image.size


def read_bytes(path: Path) -> bytes:
    """The file's content, or :class:`DecodeError` with a reason."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except IsADirectoryError:
        raise DecodeError("is a folder") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as exc:
        raise DecodeError(f"cannot read file ({exc.strerror or exc})") from None


def skip_reason(exc: BaseException) -> str:
    """The reason reported for a file that could not be read or decoded."""
    if isinstance(exc, DecodeError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot read file ({exc.strerror or exc})"
    return f"cannot process ({type(exc).__name__}: {first_line(exc)})"
