"""Finding image files, decoding them to RGB, and the reasons for skipping one."""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError, first_line

# The formats read unless told otherwise (Pillow's names), with the suffixes
# a folder walk takes for each.  Pillow reads dozens more, some through
# outside programs (EPS runs Ghostscript): those only when asked for.
FORMAT_SUFFIXES = {"JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"), "PNG": (".png", ".apng"), "WEBP": (".webp",),
                   "BMP": (".bmp",), "GIF": (".gif",), "TIFF": (".tif", ".tiff")}
DEFAULT_FORMATS = tuple(FORMAT_SUFFIXES)
IMAGE_SUFFIXES = frozenset(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes)
# Pictures Pillow has no reader for, which a folder walk reports rather than
# passes over in silence.
_UNREADABLE_SUFFIXES = {".heic": "HEIC/HEIF", ".heif": "HEIC/HEIF", ".hif": "HEIC/HEIF",
                        ".avif": "AVIF", ".avifs": "AVIF"}
# Formats Pillow reads that hold data or video rather than pictures: a folder
# walk ignores files of these (a Keras .h5 beside the photos is no image).
_NOT_PICTURES = frozenset({"MPEG", "HDF5", "BUFR", "GRIB", "FITS", "IPTC"})
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
    """A file that cannot become an image; the message is the skip reason.
    ``kind``: "too large", "format" (not among the allowed formats) or None."""

    def __init__(self, reason: str, kind: str | None = None):
        super().__init__(reason)
        self.kind = kind


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


def _suffix_reason(suffix: str, formats) -> str | None:
    """Why a file with this suffix, met in a folder walk, is not read: it
    names a picture format outside ``formats`` (None: not a picture's suffix)."""
    from PIL import Image

    if suffix in _UNREADABLE_SUFFIXES:
        return f"unsupported format ({_UNREADABLE_SUFFIXES[suffix]}; convert it to JPEG or PNG)"
    Image.init()
    name = Image.registered_extensions().get(suffix)
    if name is None or name not in Image.OPEN or name in _NOT_PICTURES:
        return None
    return f"unsupported format ({name} is not among the formats read: {', '.join(formats)}; see --image-formats)"


def _folder_identity(folder: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(folder)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def discover(paths, suffixes=IMAGE_SUFFIXES, formats=DEFAULT_FORMATS) -> tuple[list[ImageFile], list[Skipped]]:
    """Every image file named in or below ``paths``, in a stable order.

    A file given by name is taken whatever its suffix (the decoder decides);
    inside folders files with one of ``suffixes`` are taken, and those whose
    suffix names another picture format (HEIC, or one Pillow reads that is
    not among ``formats``) are skipped with a reason.  An image that sits in
    a sub-folder of a given folder is labelled with its parent folder's name
    (``root/<label>/photo.jpg``).  Links to folders are followed, but a
    folder reached again (a link loop, two links to one folder) is walked
    only the first time; broken links and unreadable folders are skipped
    with a reason.
    """
    found: list[ImageFile] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()
    walked: set[tuple[int, int]] = set()
    # Files passed over for their suffix, reported at the end unless they
    # were also named, where the decoder gives the reason from their content.
    by_suffix: dict[Path, str] = {}

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
            for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
                identity = _folder_identity(folder)
                if identity is not None:
                    if identity in walked:
                        dirs.clear()  # reached again through a link: walked already
                        continue
                    walked.add(identity)
                dirs.sort()
                folder_path = Path(folder)
                label = folder_path.name if folder_path != root else None
                for name in sorted(files):
                    path = folder_path / name
                    suffix = path.suffix.lower()
                    if suffix not in suffixes:
                        reason = _suffix_reason(suffix, formats)
                        if reason is not None and path not in seen:
                            by_suffix.setdefault(path, reason)
                        continue
                    if path.is_file():
                        add(path, label)
                    else:  # a broken link, a pipe, a device: never opened
                        skip(path, _not_a_file(path))
        else:
            skip(root, _not_a_file(root))
    for path, reason in by_suffix.items():
        skip(path, reason)
    return found, skipped


def check_some_exist(paths) -> None:
    """:class:`NoImagesError` when none of ``paths`` exists: checked before
    an encoder loads, so a mistyped folder costs no model load."""
    from .errors import NoImagesError

    if paths and not any(os.path.lexists(path) for path in paths):
        shown = ", ".join(str(path) for path in paths)
        raise NoImagesError(f"no image files found in {shown} (no such file or folder)")


# Rows are converted a strip of about a megapixel at a time, so that no
# full-size copy of a large picture is made beside the decoded one.
_STRIP_PIXELS = 1 << 20
# What converting one strip may hold at once (int64 temporaries, RGBA copies).
_STRIP_BYTES = 32 * _STRIP_PIXELS
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# EXIF orientation -> the transpose that shows the picture upright.
_UPRIGHT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _grey_range(image) -> tuple[float, float] | None:
    """(low, span) mapping a 16-bit, 32-bit or float image onto 0..255, from
    the whole image (each strip must be scaled alike); None for other modes."""
    if image.mode.startswith("I;16"):
        return 0, 65535  # scaled, where Pillow's own conversion clips at 255
    if image.mode == "I":
        return 0, max(image.getextrema()[1], 1)
    if image.mode == "F":
        low, high = image.getextrema()
        return low, max(high - low, 1e-12)
    return None


def _grey8(values: np.ndarray, low, span) -> np.ndarray:
    if values.dtype.kind == "f":
        scaled = (values.astype(np.float64) - low) * (255.0 / span)
    else:  # exact integer arithmetic: no float64 copy, no rounding surprises
        scaled = (values.astype(np.int64) - int(low)) * 255 // int(span)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _strip_to_rgb(strip, grey):
    """One strip, in any Pillow mode, to RGB as it would look on screen."""
    from PIL import Image

    if strip.mode == "RGB":
        return strip
    if grey is not None:
        return Image.fromarray(_grey8(np.asarray(strip), *grey), "L").convert("RGB")
    if strip.mode == "P" and "transparency" in strip.info:
        strip = strip.convert("RGBA")
    if strip.mode in _ALPHA_MODES:
        # Transparent areas are shown as white, not as whatever colour hides there.
        rgba = strip.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return strip.convert("RGB")


def _to_rgb(image, factor: int = 1):
    """A decoded image to RGB, shrunk ``factor`` times by averaging.

    Strip by strip: converting or compositing a 16-bit or transparent
    picture whole would take several full-size copies of it.  Each strip is
    converted before it is averaged, so transparency and 16-bit values are
    treated exactly as in a full-size conversion.
    """
    from PIL import Image

    if image.mode == "RGB" and factor == 1:
        return image
    width, height = image.size
    grey = _grey_range(image)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = max(1, _STRIP_PIXELS // (width * factor)) * factor
    for top in range(0, height, rows):
        strip = _strip_to_rgb(image.crop((0, top, width, min(height, top + rows))), grey)
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def _reduce_factor(size, draft_size) -> int:
    """How many times a decoded image may be shrunk with both sides staying
    at least ``draft_size`` (as JPEG's draft mode does while decoding)."""
    if not draft_size:
        return 1
    return max(1, min(size[0] // draft_size[0], size[1] // draft_size[1]))


def _mode_bytes(mode: str) -> int:
    """Bytes a pixel takes in Pillow's memory (several bands take 4)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


# ISO base-media brands of image formats Pillow has no reader for.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


def check_formats(names) -> tuple[str, ...]:
    """Pillow format names (any case) as an allow-list; :class:`UsageError`
    for a name Pillow cannot read."""
    from PIL import Image

    Image.init()
    wanted = tuple(dict.fromkeys(str(name).strip().upper() for name in names if str(name).strip()))
    if not wanted:
        raise UsageError("no image formats given")
    for name in wanted:
        if name not in Image.OPEN:
            raise UsageError(f"unknown image format {name!r}; Pillow here reads {', '.join(sorted(Image.OPEN))}")
    return wanted


def suffixes_for(formats) -> frozenset[str]:
    """File name suffixes a folder walk takes for these formats."""
    from PIL import Image

    extra = {suffix for suffix, name in Image.registered_extensions().items()
             if name in formats and name not in FORMAT_SUFFIXES}
    return frozenset(s for name in formats for s in FORMAT_SUFFIXES.get(name, ())) | extra


def _read_header(data: bytes, formats):
    """The file's header parsed by the first of ``formats`` that takes it, or None.

    Pillow's ``Image.open`` with ``formats=`` would do the same, but it
    also applies its process-wide decompression-bomb limit, which a larger
    ``--max-megapixels`` would have to raise for everyone; each caller's own
    limit is checked from this header instead.  Nothing is decoded here.
    """
    from PIL import Image

    Image.init()
    for name in formats:
        factory, accept = Image.OPEN[name]
        if accept is not None:
            verdict = accept(data[:16])
            if not verdict or isinstance(verdict, str):
                continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format, as Image.open concludes too
    return None


def _other_format(data: bytes, formats, signed: bool) -> str | None:
    """The format Pillow would have read ``data`` as, were it allowed: among
    formats with a signature to check (``signed``), or among the rest,
    which take whatever their header parser does not reject."""
    from PIL import Image

    Image.init()
    others = [name for name in Image.ID
              if name not in formats and (Image.OPEN[name][1] is not None) == signed]
    try:
        image = _read_header(data, others)
    except Exception:  # a header that fools a check is still not allowed
        return None
    return image.format if image is not None else None


def _unidentified_reason(data: bytes, formats=DEFAULT_FORMATS) -> str:
    """Why no allowed format could read ``data``, as specifically as we can tell."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        kind = "AVIF" if data[8:12] in (b"avif", b"avis") else "HEIC/HEIF"
        return f"unsupported format ({kind}; convert it to JPEG or PNG)"
    allowed = f"not among the formats read: {', '.join(formats)}; see --image-formats"
    other = _other_format(data, formats, signed=True)
    if other is not None:
        return f"unsupported format ({other} is {allowed})"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<svg")):
        return "not an image (an HTML/XML/SVG document)"
    try:
        data[:512].decode("utf-8")
        return "not an image (text)"
    except UnicodeDecodeError:
        pass
    other = _other_format(data, formats, signed=False)
    if other is not None:
        return f"unsupported format or not an image (it might be {other}, which is {allowed})"
    return "unsupported format or not an image"


@dataclass
class Opened:
    """An image whose header is read and checked, its pixels not yet decoded."""

    image: object            # a lazy PIL image, set to decode reduced where the format can
    size: tuple[int, int]    # as stored in the file (before EXIF orientation)
    draft_size: tuple[int, int] | None
    estimate: int            # bytes that decoding it takes at most, roughly


def _estimate(image, size, draft_size, encoded: int) -> int:
    """Bytes held while :func:`finish` decodes ``image``: the file, the
    decoded pixels, the reduced copy and a strip's temporaries."""
    width, height = image.size  # after draft(): what is really decoded
    decoded = width * height * _mode_bytes(image.mode)
    if image.format == "WEBP":
        decoded *= 2  # its decoder hands over a full copy of the pixels
    if image.format in ("JPEG", "MPO") and image.info.get("progression"):
        # libjpeg keeps every DCT coefficient of a progressive file, at full size.
        decoded += size[0] * size[1] * 2 * len(image.getbands())
    factor = _reduce_factor(image.size, draft_size)
    reduced = -(-width // factor) * -(-height // factor) * 4
    return encoded + decoded + reduced + _STRIP_BYTES


@contextlib.contextmanager
def _reasons(max_megapixels: float):
    """Pillow's many exceptions as :class:`DecodeError` with a skip reason."""
    from PIL import Image

    try:
        yield
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:  # GIF frames and the like are checked by Pillow itself
        # Pillow's message holds the size it read from the header: say it.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.3g} megapixels; " if found else ""
        raise DecodeError(f"image too large ({size}Pillow reads this format only up to "
                          f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.3g} megapixels)", "too large") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise DecodeError(f"corrupt or truncated image data ({first_line(exc)})") from None
    except MemoryError:
        raise DecodeError("not enough memory to decode this image") from None
    except Exception as exc:  # Pillow's plugins raise more kinds than they document
        raise DecodeError(f"cannot decode ({type(exc).__name__}: {first_line(exc)})") from None


def open_image(data: bytes, *, draft_size=None, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
               formats=DEFAULT_FORMATS) -> Opened:
    """Read and check an image file's header, or :class:`DecodeError`.

    Only ``formats`` (Pillow format names) are tried.  Images over
    ``max_megapixels`` are refused from the header, before any decoding.
    With ``draft_size``, JPEGs are set to decode at a reduced scale
    (Pillow's draft mode) as long as both sides stay at least this large.
    """
    if not data:
        raise DecodeError("empty file")
    with _reasons(max_megapixels):
        image = _read_header(data, formats)
        if image is None:
            reason = _unidentified_reason(data, formats)
            raise DecodeError(reason, "format" if " see --image-formats" in reason else None)
        width, height = image.size
        if width * height > max_megapixels * 1e6:
            raise DecodeError(
                f"image too large ({width}x{height}, {width * height / 1e6:.0f} megapixels; "
                f"limit {max_megapixels:g}, see --max-megapixels)", "too large")
        if draft_size and image.format in ("JPEG", "MPO"):
            image.draft("RGB", draft_size)
        return Opened(image, (width, height), draft_size, _estimate(image, (width, height), draft_size, len(data)))


def finish(opened: Opened, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS):
    """Decode an opened image: (upright RGB image, upright size as stored).

    The RGB image is reduced by averaging while both sides stay at least the
    draft size, so what is held beside the decoded pixels stays small.
    """
    from PIL import Image

    image = opened.image
    with _reasons(max_megapixels):
        image.seek(0)  # the first frame of animations and multi-page files
        image.load()
        orientation = image.getexif().get(0x0112)
        rgb = _to_rgb(image, _reduce_factor(image.size, opened.draft_size))
        if rgb is not image:
            image.close()  # the full-size pixels go now, not when the caller lets go
    width, height = opened.size
    if orientation in _UPRIGHT:
        rgb = rgb.transpose(getattr(Image.Transpose, _UPRIGHT[orientation]))
        if orientation >= 5:  # the four that turn the picture on its side
            width, height = height, width
    return rgb, (width, height)


def decode(data: bytes, *, draft_size=None, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
           formats=DEFAULT_FORMATS):
    """Image file bytes to an upright RGB PIL image, or :class:`DecodeError`.

    ``draft_size``: large images are decoded (JPEG) or shrunk (the rest) to
    a reduced size while both sides stay at least this large, which saves
    time and memory with no loss at the encoder's input size.
    """
    opened = open_image(data, draft_size=draft_size, max_megapixels=max_megapixels, formats=formats)
    return finish(opened, max_megapixels=max_megapixels)[0]


def to_pixels(data: bytes, preprocessing, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
              formats=DEFAULT_FORMATS):
    """File bytes to an encoder's resized uint8 pixels, and the upright
    size of the image as stored in the file.

    The one road from bytes to pixels, shared by indexing, queries,
    evaluation and the vectorizer service, so that their vectors agree.
    """
    opened = open_image(data, draft_size=preprocessing.draft_size, max_megapixels=max_megapixels,
                        formats=formats)
    return pixels_of(opened, preprocessing, max_megapixels=max_megapixels)


def pixels_of(opened: Opened, preprocessing, *, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS):
    """An opened image's resized pixels and upright size (see :func:`to_pixels`)."""
    image, size = finish(opened, max_megapixels=max_megapixels)
    return preprocessing.resize_image(image), size


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
