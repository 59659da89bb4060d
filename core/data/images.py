"""Reading one image or mask: any Pillow mode in, ``HxWx3 uint8 RGB`` (or ``HxW bool``) out.

:func:`read_image` applies the EXIF orientation. Transparency is composited on **white** (an RGBA product
photo on a transparent background shows as on a light table, not on whatever colour the hidden pixels hold).
16-bit and 32-bit integer images are scaled by their bit depth, found from the largest value (<= 255: kept;
then 10, 12, 14 or 16 bits; a 16-bit full-range image is divided by 257). Float images in [0, 1] are scaled
by 255, in [0, 255] kept, otherwise min-max scaled. Images above :data:`MAX_PIXELS` are refused from their
header, before any pixel is decoded. :func:`read_mask` returns ``HxW bool``, nonzero = defect.
"""
from __future__ import annotations

import io
import os
import re
import stat
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# The only Pillow decoders ever tried (JPEG's also opens the multi-picture JPEGs some cameras write): a file
# that is really EPS, PDF or another format never reaches its plugin (EPS would be handed to Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
MAX_PIXELS = 80_000_000            # images above this many pixels are refused (read at call time: patchable)

_OPEN_LOCK = threading.Lock()       # warnings.catch_warnings is not thread-safe; Image.open only reads the header


class ImageError(ValueError):
    """An image (or archive) that cannot be used; the message names the file and the reason."""

    def __init__(self, file, reason: str):
        self.file = str(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")


class ImageTooLargeError(ImageError):
    """An image refused for its pixel count, read from its header before any pixel was decoded (a service
    answers it differently from a file that is not an image)."""


def _source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", None) or "<stream>")


def _as_stream(source):
    """(context manager yielding a binary stream, name)."""
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            mode = os.stat(source).st_mode
        except FileNotFoundError:
            raise ImageError(name, "file not found") from None
        except OSError as e:
            raise ImageError(name, f"cannot open file ({e.strerror or e})") from None
        if stat.S_ISDIR(mode):
            raise ImageError(name, "is a folder, not an image file")
        if not stat.S_ISREG(mode):
            # Opening a named pipe or a device would block or read for ever.
            raise ImageError(name, "is not a regular file (a pipe, socket or device)")
        try:
            return open(source, "rb"), name
        except FileNotFoundError:
            raise ImageError(name, "file not found") from None
        except IsADirectoryError:
            raise ImageError(name, "is a folder, not an image file") from None
        except PermissionError:
            raise ImageError(name, "permission denied") from None
        except OSError as e:
            raise ImageError(name, f"cannot open file ({e.strerror or e})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), name
    if hasattr(source, "read"):
        if hasattr(source, "seek"):
            try:
                source.seek(0)
            except Exception:  # noqa: BLE001 - non-seekable streams are read as they are
                pass
        return io.BytesIO(source.read()), name
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(source).__name__}")


def _mp(n: float) -> str:
    return f"{n / 1e6:.3g}"


def _open_header(stream, name: str, check_limit: int | None) -> Image.Image:
    """Image.open (header only), turning Pillow's bomb guard and format errors into ImageError."""
    limit = MAX_PIXELS if check_limit is None else check_limit
    try:
        # Pillow warns above Image.MAX_IMAGE_PIXELS: swallow it here (our own limit below decides) ...
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # ... and refuses outright above twice that.
        found = re.search(r"\((\d+) pixels\)", str(e))
        n = int(found.group(1)) if found else None
        size = f"{_mp(n)} megapixels" if n else "too many pixels"
        if n is not None and n <= limit:
            raise ImageTooLargeError(name, f"image has {size}: Pillow refuses it as a possible decompression bomb (raise "
                                   "PIL.Image.MAX_IMAGE_PIXELS to allow it); it was not decoded") from None
        raise ImageTooLargeError(name, f"image has {size}, above the limit of {_mp(limit)} megapixels (Pillow refuses it "
                               "as a possible decompression bomb); it was not decoded") from None
    except UnidentifiedImageError:
        empty = False
        try:
            stream.seek(0, os.SEEK_END)
            empty = stream.tell() == 0
        except Exception:  # noqa: BLE001
            pass
        raise ImageError(name, "empty file (0 bytes)" if empty
                         else "not a recognised image format (PNG, JPEG, BMP, TIFF or WebP are read; the file "
                              "is in another format, is not an image, or is damaged)") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file, not a crash
        raise ImageError(name, f"cannot read image header ({type(e).__name__}: {e})") from None
    if check_limit is not None:
        w, h = img.size
        if w * h > check_limit:
            raise ImageTooLargeError(name, f"image is {w}x{h} pixels ({_mp(w * h)} megapixels), above the limit of "
                                   f"{_mp(check_limit)} megapixels; it was not decoded")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF: treat as upright
        return 1


def _decode(source, max_pixels: int | None) -> tuple[Image.Image, str, str]:
    """Fully decoded, upright PIL image, its original mode and the source name."""
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    stream, name = _as_stream(source)
    with stream:
        img = _open_header(stream, name, limit)
        mode = img.mode
        try:
            img.load()
        except MemoryError:
            raise ImageError(name, "not enough memory to decode this image") from None
        except Exception as e:  # noqa: BLE001
            raise ImageError(name, f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    if _orientation(img) in (2, 3, 4, 5, 6, 7, 8):
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - keep the stored orientation rather than lose the image
            pass
    return img, mode, name


def _scale_int(arr: np.ndarray) -> np.ndarray:
    """Integer image of any depth -> uint8, scaled by its bit depth (found from its largest value)."""
    arr = np.clip(arr.astype(np.float64), 0, None)
    top = float(arr.max()) if arr.size else 0.0
    if top <= 255:
        return arr.astype(np.uint8)
    for bits in (10, 12, 14, 16):
        if top <= 2**bits - 1:
            full = 2**bits - 1
            break
    else:
        full = top
    return np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)


def _scale_float(arr: np.ndarray) -> np.ndarray:
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
        arr = arr * 255.0
    elif not (lo >= 0 and hi <= 255):
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_rgb(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        out = np.asarray(img)
    elif mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        grey = _scale_float(arr) if mode == "F" else _scale_int(arr)
        out = np.repeat(grey[:, :, None], 3, axis=2)
    elif mode in ("RGBA", "RGBa", "LA", "La", "PA") or ("transparency" in img.info and mode in ("P", "L", "RGB")):
        out = np.asarray(_on_white(img))
    else:  # 1, L, P, CMYK, YCbCr, LAB, HSV, ...
        try:
            out = np.asarray(img.convert("RGB"))
        except Exception as e:  # noqa: BLE001
            raise ImageError(name, f"unsupported colour mode {mode!r} ({e})") from None
    return np.ascontiguousarray(out, dtype=np.uint8)


def read_image(source, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image into an ``HxWx3 uint8`` RGB array.

    ``source`` is a path, ``bytes`` or a binary file object (e.g. an upload). The EXIF orientation is applied,
    transparency is composited on white, 16/32-bit and float images are scaled as the module docstring says.
    Raises :class:`ImageError` (message: file and reason) for unreadable, truncated or non-image files and for
    images above ``max_pixels`` (default :data:`MAX_PIXELS`), checked from the header before decoding.
    """
    img, _, name = _decode(source, max_pixels)
    return _to_rgb(img, name)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _mask_from_image(img: Image.Image, notes: list[str] | None = None) -> np.ndarray:
    mode = img.mode
    if mode == "1" or mode == "L" or mode.startswith("I") or mode == "F":
        a = np.asarray(img)
        levels = np.unique(a)
        if len(levels) > 2 and notes is not None:
            # A JPEG or antialiased mask: "nonzero" would swell every defect by its compression noise.
            notes.append(f"mask is not binary ({len(levels)} grey levels{', a JPEG' if img.format == 'JPEG' else ''}):"
                         f" pixels at or above half its maximum count as defect")
        return a >= levels[-1] / 2 if len(levels) > 2 else a != 0
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        alpha = rgba[:, :, 3]
        if alpha.size and alpha.min() != alpha.max():   # drawn on a transparent background: opacity is the mask
            return alpha > 0
        return (rgba[:, :, :3] != 0).any(axis=2) & (alpha > 0)
    return (np.asarray(img.convert("RGB")) != 0).any(axis=2)


def read_mask(source, max_pixels: int | None = None, notes: list[str] | None = None) -> np.ndarray:
    """Decode a ground-truth mask into an ``HxW bool`` array: nonzero = defect.

    Colour masks count a pixel as defect when any channel is nonzero. Masks with a varying alpha channel (drawn on
    a transparent background) use opacity: alpha > 0 = defect. Grey masks with more than two levels (JPEG,
    antialiased) are thresholded at half their maximum, and say so in `notes`. Errors as :func:`read_image`.
    """
    img, _, name = _decode(source, max_pixels)
    try:
        return np.ascontiguousarray(_mask_from_image(img, notes), dtype=bool)
    except Exception as e:  # noqa: BLE001
        raise ImageError(name, f"cannot interpret as a mask (mode {img.mode!r}: {e})") from None


def _probe(path) -> tuple[int, int, str]:
    """(height, width, mode) from the header alone, after EXIF orientation."""
    stream, name = _as_stream(path)
    with stream:
        img = _open_header(stream, name, None)
        w, h = img.size
        if _orientation(img) in (5, 6, 7, 8):
            w, h = h, w
        return h, w, img.mode


def image_size(source) -> tuple[int, int]:
    """``(height, width)`` as :func:`read_image` would return it, read from the header only."""
    h, w, _ = _probe(source)
    return h, w
