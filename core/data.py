"""Images in, arrays out: reading, validating and loading datasets, plus the one preprocessing every detector uses.

Design rule: bad input gets a clear message and loses nothing. One bad file never spoils a whole load; it is
reported in the :class:`LoadReport` (``skipped`` or ``warnings``) and the rest loads.

Reading
    :func:`read_image` returns ``HxWx3 uint8 RGB`` for any Pillow mode and applies the EXIF orientation.
    Transparency is composited on **white** (an RGBA product photo on a transparent background shows as on a
    light table, not on whatever colour the hidden pixels hold). 16-bit and 32-bit integer images are scaled by
    their bit depth, found from the largest value (<= 255: kept; then 10, 12, 14 or 16 bits; a 16-bit full-range
    image is divided by 257). Float images in [0, 1] are scaled by 255, in [0, 255] kept, otherwise min-max
    scaled. Images above :data:`MAX_PIXELS` are refused from their header, before any pixel is decoded.
    :func:`read_mask` returns ``HxW bool``, nonzero = defect.

Loading
    :func:`load_mvtec`, :func:`load_folder`, :func:`load_zip` and the dispatcher :func:`load_dataset` return a
    lazy :class:`ImageSet`: it holds :class:`Sample` records and decodes an image only when indexed. With
    ``validate=True`` every file is opened and fully decoded once at load time (a thread pool keeps it quick),
    duplicates are found by SHA-1 of the bytes, and masks are checked against their image's size.

Preprocessing
    :class:`Preprocess`: squash-resize to ``resize x resize`` (Pillow bilinear, antialiased when shrinking),
    center crop to ``crop x crop``, ImageNet normalisation. Images, masks and float maps all go through
    Pillow's bilinear filter (uint8 for images, mode ``"F"`` for masks and maps), so their geometry agrees
    exactly; masks are resized as 0/1 floats and thresholded at 0.5. :meth:`Preprocess.map_to_input` is the
    inverse geometry, from the model frame back to the original image size.

Example::

    ds = load_dataset("../shared/datasets/bottle")
    print(ds.report.summary())                  # "292 images loaded, 0 skipped, 0 warnings"
    train = ds.subset(split="train")
    x = Preprocess().images_to_tensor([train[0], train[1]])   # (2, 3, 224, 224) float32
"""
from __future__ import annotations

import collections.abc
import hashlib
import io
import os
import re
import stat
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES", "MAX_PIXELS", "ImageError", "EmptyDatasetError", "read_image", "read_mask", "image_size",
    "Sample", "LoadReport", "ImageSet", "load_mvtec", "load_folder", "load_zip", "load_dataset", "Preprocess",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# The only Pillow decoders ever tried (JPEG's also opens the multi-picture JPEGs some cameras write): a file
# that is really EPS, PDF or another format never reaches its plugin (EPS would be handed to Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
MAX_PIXELS = 80_000_000            # images above this many pixels are refused (read at call time: patchable)
MAX_ZIP_MEMBER_BYTES = 256 * 2**20  # one member of an uploaded zip
MAX_ZIP_TOTAL_BYTES = 2 * 2**30     # all extracted members together (zip-bomb guard)
MAX_FOLDER_FILES = 200_000          # a dataset folder holding more is someone's disk, not a dataset

_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
_SPLIT_ORDER = {"train": 0, "test": 1}
_OPEN_LOCK = threading.Lock()       # warnings.catch_warnings is not thread-safe; Image.open only reads the header


class ImageError(ValueError):
    """An image (or archive) that cannot be used; the message names the file and the reason."""

    def __init__(self, file, reason: str):
        self.file = str(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")


class EmptyDatasetError(ValueError):
    """A load that found no usable image; ``report`` says what was skipped and why."""

    def __init__(self, report: "LoadReport"):
        self.report = report
        first = "; ".join(f"{f}: {r}" for f, r in report.skipped[:3]) or "none (no image files found)"
        super().__init__(f"no usable images in {report.source}: {len(report.skipped)} files skipped, "
                         f"first reasons: {first}")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

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
            raise ImageError(name, f"image has {size}: Pillow refuses it as a possible decompression bomb (raise "
                                   "PIL.Image.MAX_IMAGE_PIXELS to allow it); it was not decoded") from None
        raise ImageError(name, f"image has {size}, above the limit of {_mp(limit)} megapixels (Pillow refuses it "
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
            raise ImageError(name, f"image is {w}x{h} pixels ({_mp(w * h)} megapixels), above the limit of "
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


# ----------------------------------------------------------------------------------------------------------------
# Samples, reports and the lazy image set
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    path: Path
    split: str              # "train" or "test"
    label: int              # 0 normal, 1 anomalous
    defect: str             # "good" for normal, else the defect type (folder name)
    mask_path: Path | None  # None for normal images and for anomalous images without a usable mask


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class LoadReport:
    """What a load left out (``skipped``) and what it kept with a caveat (``warnings``), as (file, reason)."""
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    n_loaded: int = 0

    def summary(self) -> str:
        return (f"{_plural(self.n_loaded, 'image')} loaded, {self.skipped_count} skipped, "
                f"{_plural(len(self.warnings), 'warning')}")

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict:
        return {"source": self.source, "n_loaded": self.n_loaded,
                "skipped": [list(t) for t in self.skipped], "warnings": [list(t) for t in self.warnings]}


def _sort_key(s: Sample, root: Path | None = None):
    try:
        rel = s.path.relative_to(root).as_posix() if root else s.path.as_posix()
    except ValueError:
        rel = s.path.as_posix()
    return (_SPLIT_ORDER.get(s.split, 2), s.split, s.defect != "good", s.defect, rel)


class ImageSet(collections.abc.Sequence):
    """A lazy, ordered set of :class:`Sample`; ``ds[i]`` decodes image ``i`` (``HxWx3 uint8``).

    A slice, a list/array of ints or a boolean array returns a subset :class:`ImageSet` (same report).
    """

    def __init__(self, name: str, samples: Iterable[Sample], report: LoadReport | None = None,
                 _info: dict | None = None):
        self.name = str(name)
        self.samples = list(samples)
        self.report = report if report is not None else LoadReport(source=self.name, n_loaded=len(self.samples))
        self._info = _info if _info is not None else {}   # path -> (h, w, mode), filled by validation or probing

    # -- sequence protocol
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return read_image(self.samples[int(index)].path)
        if isinstance(index, slice):
            return self._derived(self.samples[index])
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for an ImageSet of length {len(self)}")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise TypeError(f"ImageSet indices must be an int, a slice, or a 1-D list of ints/bools, not {index!r}")
        return self._derived([self.samples[int(i)] for i in idx])

    def __iter__(self):
        for s in self.samples:
            yield read_image(s.path)

    def __repr__(self) -> str:
        parts = ", ".join(f"{sp} {sum(c.values())}" for sp, c in self.counts().items())
        return f"ImageSet({self.name!r}, {len(self)} images: {parts})"

    def _derived(self, samples) -> "ImageSet":
        return ImageSet(self.name, samples, self.report, self._info)

    # -- masks
    def _hw(self, path: Path) -> tuple[int, int]:
        info = self._info.get(path)
        if info is None:
            info = self._info[path] = _probe(path)
        return info[0], info[1]

    def mask(self, i) -> np.ndarray | None:
        """``HxW bool`` at the image's own size; zeros for normal images; None if anomalous without a usable mask."""
        s = self.samples[int(i)]
        if s.label == 0:
            return np.zeros(self._hw(s.path), dtype=bool)
        if s.mask_path is None:
            return None
        notes: list[str] = []
        try:
            m = read_mask(s.mask_path, notes=notes)
        except ImageError as e:
            self._warn_once(s, f"mask unreadable ({e.reason}): image kept for image-level metrics only")
            return None
        hw = self._hw(s.path)
        if m.shape != hw:
            self._warn_once(s, f"mask is {m.shape[1]}x{m.shape[0]} but the image is {hw[1]}x{hw[0]} (WxH): "
                               "mask ignored, image kept for image-level metrics only")
            return None
        for note in notes:
            self._warn_once(s, note)
        return m

    def _warn_once(self, s: Sample, message: str) -> None:
        entry = (str(s.path), message)
        if entry not in self.report.warnings:
            self.report.warnings.append(entry)

    # -- selection and description
    def subset(self, split: str | None = None, label: int | None = None, defect: str | None = None) -> "ImageSet":
        return self._derived([s for s in self.samples
                              if (split is None or s.split == split) and (label is None or s.label == label)
                              and (defect is None or s.defect == defect)])

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)

    @property
    def defects(self) -> list[str]:
        return [s.defect for s in self.samples]

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, from validation or headers (nothing is decoded)."""
        return [self._hw(s.path) for s in self.samples]

    def counts(self) -> dict:
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            per = out.setdefault(s.split, {})
            per[s.defect] = per.get(s.defect, 0) + 1
        return out

    def summary(self) -> dict:
        """Counts, sizes and modes; JSON-serialisable (for the model card). Unvalidated sets read headers."""
        missing = [s.path for s in self.samples if s.path not in self._info]
        if missing:
            def probe(p):
                try:
                    return p, _probe(p)
                except ImageError:
                    return p, None
            with ThreadPoolExecutor(_workers()) as pool:
                for p, info in pool.map(probe, missing):
                    if info is not None:
                        self._info[p] = info
        infos = [self._info[s.path] for s in self.samples if s.path in self._info]
        modes: dict[str, int] = {}
        for _, _, m in infos:
            modes[m] = modes.get(m, 0) + 1
        hs, ws = [i[0] for i in infos], [i[1] for i in infos]
        return {
            "name": self.name,
            "source": self.report.source,
            "n_images": len(self),
            "n_anomalous": int(sum(s.label for s in self.samples)),
            "n_masks": sum(1 for s in self.samples if s.mask_path is not None),
            "counts": self.counts(),
            "size_min_hw": [min(hs), min(ws)] if infos else None,
            "size_max_hw": [max(hs), max(ws)] if infos else None,
            "n_sizes": len({(h, w) for h, w, _ in infos}),
            "modes": dict(sorted(modes.items())),
            "n_skipped": len(self.report.skipped),
            "n_warnings": len(self.report.warnings),
        }


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def _workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _hidden(rel_parts: Sequence[str]) -> bool:
    return any(p.startswith(".") for p in rel_parts)


def _walk_files(root: Path, report: "LoadReport | None" = None) -> list[Path]:
    """All regular files under root (not following folder links), hidden files and folders left out; other
    entries (named pipes, sockets, devices, broken links) are reported as skipped: a pipe would block a reader."""
    out, seen = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        seen += len(filenames)
        if seen > MAX_FOLDER_FILES:
            raise ValueError(f"{root} holds more than {MAX_FOLDER_FILES:,} files: point at the dataset's own folder")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for p in (Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")):
            try:
                regular, folder = p.is_file(), p.is_dir()
            except OSError as exc:     # e.g. a link into /proc that this user may not follow
                if report is not None:
                    report.skipped.append((_escaped(_rel(p, root)), f"cannot be read ({exc.strerror or exc}): skipped"))
                continue
            if regular:
                out.append(p)
            elif report is not None and not folder:
                report.skipped.append((_escaped(_rel(p, root)), "not a regular file (a named pipe, socket, device "
                                                                "or broken link): skipped"))
    return out


def _valid_text(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(name: str) -> str:
    """The name with its undecodable bytes written as \\xNN, printable and storable."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(sample: Sample, validate: bool) -> dict:
    """Validation work for one sample (runs in a worker thread)."""
    res: dict = {"error": None, "sha1": None, "info": None, "mask_error": None}
    if validate:
        try:
            img, mode, name = _decode(sample.path, None)
            _to_rgb(img, name)              # the conversion must work too
            res["info"] = (img.height, img.width, mode)
            del img
            res["sha1"] = _sha1(sample.path)
        except ImageError as e:
            res["error"] = e.reason
            return res
        except OSError as e:
            res["error"] = f"cannot read file ({e.strerror or e})"
            return res
    if sample.mask_path is not None and validate:
        notes: list[str] = []
        try:
            m = read_mask(sample.mask_path, notes=notes)
            res["mask_notes"] = notes        # e.g. a JPEG mask thresholded: loaded, and said so
        except ImageError as e:
            res["mask_error"] = f"mask unreadable ({e.reason}): image kept for image-level metrics only"
        else:
            h, w = res["info"][:2]
            if m.shape != (h, w):
                res["mask_error"] = (f"mask is {m.shape[1]}x{m.shape[0]} but the image is {w}x{h} (WxH): "
                                     "mask ignored, image kept for image-level metrics only")
    return res


def _finish(name: str, root: Path, candidates: list[Sample], report: LoadReport, validate: bool,
            progress: Callable[[int, int], None] | None) -> ImageSet:
    """Validate candidates (in parallel), drop bad files and duplicates, sort, and build the ImageSet."""
    candidates = sorted(candidates, key=lambda s: _sort_key(s, root))
    total = len(candidates)
    results: list[dict] = []
    if validate and total:
        with ThreadPoolExecutor(_workers()) as pool:
            futures = [pool.submit(_check, s, True) for s in candidates]
            try:
                for k, fut in enumerate(futures, 1):
                    results.append(fut.result())
                    if progress is not None:
                        progress(k, total)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        results = [{"error": None, "sha1": None, "info": None, "mask_error": None}] * total
        if progress is not None and total:
            progress(total, total)

    kept: list[Sample] = []
    info: dict = {}
    seen: dict[str, str] = {}
    for s, r in zip(candidates, results):
        rel = _rel(s.path, root)
        if not _valid_text(rel):
            # Such a name cannot be stored, shown or sent anywhere as text: report it (escaped) and go on.
            report.skipped.append((_escaped(rel), "the file name is not valid UTF-8 text: rename the file"))
            continue
        if r["error"] is not None:
            report.skipped.append((rel, r["error"]))
            continue
        if r["sha1"] is not None:
            if r["sha1"] in seen:
                report.skipped.append((rel, f"duplicate of {seen[r['sha1']]}"))
                continue
            seen[r["sha1"]] = rel
        if r["mask_error"] is not None:
            report.warnings.append((rel, r["mask_error"]))
            s = Sample(s.path, s.split, s.label, s.defect, None)
        report.warnings += [(rel, note) for note in r.get("mask_notes", [])]
        if r["info"] is not None:
            info[s.path] = r["info"]
        kept.append(s)
    report.n_loaded = len(kept)
    if not kept:
        raise EmptyDatasetError(report)
    return ImageSet(name, kept, report, info)


def _existing_dir(root) -> Path:
    p = Path(root).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset folder not found: {p}")
    if not p.is_dir():
        raise NotADirectoryError(f"not a folder: {p}")
    return p.resolve()


def _is_folder(path: Path) -> bool:
    """Path.is_dir, False for an entry this user may not inspect (a link into /proc raises instead)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _find_mvtec_root(root: Path) -> Path | None:
    """root itself if it has train/good, or its single visible subfolder if that has (e.g. an unzipped archive)."""
    if _is_folder(root / "train" / "good"):
        return root
    subs = [d for d in root.iterdir() if _is_folder(d) and not d.name.startswith(".") and d.name != "__MACOSX"]
    if len(subs) == 1 and _is_folder(subs[0] / "train" / "good"):
        return subs[0]
    return None


def _suffix_ok(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_mvtec(root, validate: bool = True, *, progress: Callable[[int, int], None] | None = None,
               _report: LoadReport | None = None) -> ImageSet:
    """Load an MVTec-AD-style folder: ``train/good/*``, ``test/<type>/*`` and masks in
    ``ground_truth/<type>/<stem>_mask.<ext>`` or ``ground_truth/<type>/<stem>.<ext>`` (both tried).

    ``root`` may also be a folder holding exactly one such dataset folder. Files in ``train/<not good>/`` and
    directly in ``test/`` are skipped with a reason; masks for missing images and unreadable or mis-sized masks
    are reported; an anomalous image without a usable mask is kept (``mask_path=None``) with a warning.
    ``progress(done, total)`` is called during validation; raising from it (e.g. ``core.Cancelled``) stops the load.
    """
    given = _existing_dir(root)
    base = _find_mvtec_root(given)
    if base is None:
        raise ValueError(f"not an MVTec-style dataset folder: {given} has no train/good/ folder "
                         "(use load_folder for a plain folder of normal images)")
    report = _report if _report is not None else LoadReport(source=str(given))
    candidates: list[Sample] = []
    wanted_masks: set[Path] = set()

    gt_root = base / "ground_truth"
    gt_index: dict[tuple[str, str], list[Path]] = {}   # (defect, rel path w/o suffix, lowercase) -> files
    if _is_folder(gt_root):
        for f in _walk_files(gt_root):
            rel = f.relative_to(gt_root)
            if len(rel.parts) < 2:
                continue
            if not _suffix_ok(f):
                report.skipped.append((_rel(f, base), f"not an image file (suffix {f.suffix or 'none'!r})"))
                continue
            key = (rel.parts[0], Path(*rel.parts[1:]).with_suffix("").as_posix().lower())
            gt_index.setdefault(key, []).append(f)

    def find_mask(defect: str, rel_in_defect: Path) -> Path | None:
        stem = rel_in_defect.with_suffix("").as_posix().lower()
        for key in ((defect, stem + "_mask"), (defect, stem)):
            hits = gt_index.get(key)
            if hits:
                return sorted(hits, key=lambda p: (p.suffix.lower() != ".png", p.name))[0]
        return None

    for top in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
        if not _is_folder(top) or top.name == "ground_truth":
            continue                                    # readme.txt, license.txt, ... at the root
        for f in _walk_files(top, report):
            rel = f.relative_to(base)
            relname = rel.as_posix()
            if not _suffix_ok(f):
                report.skipped.append((relname, f"not an image file (suffix {f.suffix or 'none'!r})"))
                continue
            if top.name not in ("train", "test"):
                report.skipped.append((relname, f"folder {top.name!r} is not part of the MVTec layout "
                                                "(train/, test/, ground_truth/)"))
                continue
            if len(rel.parts) < 3:
                report.skipped.append((relname, f"not inside a {top.name}/<type>/ folder"))
                continue
            defect = rel.parts[1]
            if top.name == "train" and defect != "good":
                report.skipped.append((relname, "only train/good/ is used for training (unsupervised)"))
                continue
            if defect == "good":
                candidates.append(Sample(f, top.name, 0, "good", None))
                continue
            mask = find_mask(defect, Path(*rel.parts[2:]))
            if mask is None:
                report.warnings.append((relname, "mask missing: image kept for image-level metrics only"))
            else:
                wanted_masks.add(mask)
            candidates.append(Sample(f, "test", 1, defect, mask))

    for files in gt_index.values():
        for f in files:
            if f not in wanted_masks and f.relative_to(gt_root).parts[0] != "good":
                report.skipped.append((_rel(f, base), "mask without a matching test image"))
    return _finish(base.name, base, candidates, report, validate, progress)


def load_folder(root, split: str = "train", label: int = 0, validate: bool = True, *,
                progress: Callable[[int, int], None] | None = None,
                _report: LoadReport | None = None) -> ImageSet:
    """Load every image under a plain folder (recursive) as one split and label (default: normal training images).

    With ``label=1`` the defect type is the first subfolder's name ("anomalous" for files at the top); such images
    have no masks (one warning says so).
    """
    if split not in _SPLIT_ORDER:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (normal) or 1 (anomalous), not {label!r}")
    base = _existing_dir(root)
    report = _report if _report is not None else LoadReport(source=str(base))
    candidates = []
    for f in _walk_files(base, report):
        rel = f.relative_to(base)
        if not _suffix_ok(f):
            report.skipped.append((rel.as_posix(), f"not an image file (suffix {f.suffix or 'none'!r})"))
            continue
        defect = "good" if label == 0 else (rel.parts[0] if len(rel.parts) > 1 else "anomalous")
        candidates.append(Sample(f, split, label, defect, None))
    ds = _finish(base.name, base, candidates, report, validate, progress)
    if label == 1:
        report.warnings.append((str(base), f"no masks in a plain folder: {len(ds)} anomalous images kept for "
                                           "image-level metrics only"))
    return ds


def _member_problem(info: zipfile.ZipInfo, max_member_bytes: int) -> tuple[str, str] | None:
    """(display name, reason) if the member must not be extracted; None if it is a wanted image file."""
    raw = info.orig_filename
    shown = raw.replace("\x00", "\\x00")
    if "\x00" in raw:
        return shown, "name contains a NUL byte (a trick to disguise the file type)"
    norm = raw.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return shown, "absolute path: refused (it would be written outside the destination)"
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        return shown, "path contains '..': refused (it would be written outside the destination)"
    if not parts:
        return shown, "empty name"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return shown, "symbolic link: refused"
    if kind not in (0, stat.S_IFREG):
        return shown, "not a regular file: refused"
    if "__MACOSX" in parts or parts[-1].lower() in _JUNK_NAMES or any(p.startswith(".") for p in parts):
        return shown, "system metadata or hidden file (junk), not an image"
    if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return shown, f"not an image file (suffix {Path(parts[-1]).suffix or 'none'!r})"
    if info.flag_bits & 0x1:
        return shown, "encrypted (password-protected) member: cannot be read"
    if info.file_size > max_member_bytes:
        return shown, (f"member is {info.file_size / 2**20:.0f} MB uncompressed, above the limit of "
                       f"{max_member_bytes / 2**20:.0f} MB")
    return None


def load_zip(zip_path, dest_dir, validate: bool = True, *, max_member_bytes: int | None = None,
             max_total_bytes: int | None = None, progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """Safely extract the image files of a zip into ``dest_dir`` (:func:`extract_zip`) and load them.

    Loads as MVTec layout when there is a ``train/good/`` (at the top or under one top-level folder), else as a
    plain folder of normal training images; a zip that looks like an MVTec set but is not one (two sets, no
    ``train/good/`` folder) is refused.
    """
    root, report = extract_zip(zip_path, dest_dir, max_member_bytes=max_member_bytes, max_total_bytes=max_total_bytes)
    ds = _load_laid_out(root, "the zip", validate=validate, progress=progress, _report=report)
    ds.name = Path(report.source).stem if report.source not in ("<bytes>", "<stream>") else ds.name
    return ds


def extract_zip(zip_path, dest_dir, *, max_member_bytes: int | None = None, max_total_bytes: int | None = None
                ) -> tuple[Path, "LoadReport"]:
    """Safely extract a zip into ``dest_dir`` (created; must be empty): the folder and the report of what was
    skipped.

    Hostile members are refused and reported (absolute paths, '..', symbolic links, NUL in names, encrypted
    members, members over ``max_member_bytes`` and anything past a total of ``max_total_bytes`` uncompressed,
    the zip-bomb guard); junk (__MACOSX/, .DS_Store, Thumbs.db, hidden and non-image files) is reported as
    skipped. ``zip_path`` may be a path, bytes or a binary file object. A file that is not a zip raises
    :class:`ImageError`; a zip with nothing extracted raises :class:`EmptyDatasetError`.
    """
    max_member = MAX_ZIP_MEMBER_BYTES if max_member_bytes is None else int(max_member_bytes)
    max_total = MAX_ZIP_TOTAL_BYTES if max_total_bytes is None else int(max_total_bytes)
    name = _source_name(zip_path)
    if isinstance(zip_path, (bytes, bytearray, memoryview)):
        zip_path = io.BytesIO(bytes(zip_path))
    try:
        if isinstance(zip_path, (str, os.PathLike)) and not Path(zip_path).is_file():
            raise ImageError(name, "file not found" if not Path(zip_path).exists() else "not a file")
        if not zipfile.is_zipfile(zip_path):
            raise ImageError(name, "not a zip archive (upload a .zip of images, or choose a folder)")
        zf = zipfile.ZipFile(zip_path)
    except ImageError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise ImageError(name, f"damaged or unsupported zip archive ({e})") from None

    dest = Path(dest_dir).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        zf.close()
        raise ValueError(f"dest_dir must be a new or empty folder: {dest}")
    report = LoadReport(source=name)
    dest.mkdir(parents=True, exist_ok=True)
    dest_real = os.path.realpath(dest)
    total = 0
    extracted = 0
    with zf:
        for info in zf.infolist():
            if info.is_dir() or info.orig_filename.replace("\\", "/").endswith("/"):
                continue
            problem = _member_problem(info, max_member)
            if problem is not None:
                report.skipped.append(problem)
                continue
            shown = info.orig_filename
            if total + info.file_size > max_total:
                report.skipped.append((shown, f"extracting it would pass the total limit of "
                                              f"{max_total / 2**30:.3g} GB uncompressed (possible zip bomb)"))
                continue
            parts = [p for p in info.orig_filename.replace("\\", "/").split("/") if p not in ("", ".")]
            target = Path(dest_real).joinpath(*parts)
            reason = _extract_member(zf, info, target, dest_real, min(max_member, max_total - total))
            if reason is not None:
                report.skipped.append((shown, reason))
                continue
            total += info.file_size
            extracted += 1
    if not extracted:
        raise EmptyDatasetError(report)
    return Path(dest_real), report


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, dest_real: str,
                    limit: int) -> str | None:
    """Write one member to target, never following links or overwriting; returns a reason on failure."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create its folder ({e.strerror or e})"
    parent_real = os.path.realpath(target.parent)
    if os.path.commonpath([parent_real, dest_real]) != dest_real:
        return "resolves outside the destination: refused"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(target, flags, 0o644)
    except FileExistsError:
        return "duplicate member name (already extracted)"
    except OSError as e:
        return f"cannot write it ({e.strerror or e})"
    written = 0
    ok = False
    reason = None
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                written += len(chunk)
                if written > info.file_size or written > limit:
                    reason = "member larger than its declared size: refused (possible zip bomb)"
                    break
                out.write(chunk)
        ok = reason is None
    except RuntimeError as e:  # zipfile raises RuntimeError for encrypted members without a password
        reason = f"cannot be read ({e})"
    except NotImplementedError as e:
        reason = f"unsupported compression method ({e})"
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        reason = f"damaged member ({type(e).__name__}: {e})"
    except Exception as e:  # noqa: BLE001 - e.g. zlib.error
        reason = f"damaged member ({type(e).__name__}: {e})"
    if not ok:
        try:
            target.unlink()
        except OSError:
            pass
    return reason


def load_dataset(path, **kw) -> ImageSet:
    """Dispatch: a zip file -> :func:`load_zip` (requires ``dest_dir=``), a folder with ``train/good/`` (or one
    subfolder with it) -> :func:`load_mvtec`, any other folder -> :func:`load_folder`. Keywords pass through."""
    if isinstance(path, (bytes, bytearray, memoryview)) or hasattr(path, "read"):
        if "dest_dir" not in kw:
            raise TypeError("load_dataset(zip data) needs dest_dir=<an empty folder to extract into>")
        return load_zip(path, **kw)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset not found: {p}")
    if not p.is_file() and not p.is_dir():
        raise ValueError(f"{p}: not a folder or a file (a named pipe, socket or device)")
    if p.is_file():
        if p.suffix.lower() == ".zip" or zipfile.is_zipfile(p):
            if "dest_dir" not in kw:
                raise TypeError(f"load_dataset({p.name}) is a zip: pass dest_dir=<an empty folder to extract into>")
            return load_zip(p, **kw)
        raise ValueError(f"{p}: expected a folder of images or a .zip archive")
    kw.pop("dest_dir", None)
    return _load_laid_out(p, p.name, **kw)


def _load_laid_out(root: Path, shown: str, **kw) -> ImageSet:
    """An MVTec-layout set (at root or in its one subfolder) or a plain folder of normal images; a folder that
    looks like an MVTec set but is not one is refused: read as a plain folder, its test anomalies and masks
    would be trained on as "good" images."""
    if _find_mvtec_root(root.resolve()) is not None:
        return load_mvtec(root, **kw)
    problem = _broken_mvtec_layout(root.resolve())
    if problem:
        raise ValueError(f"{shown}: {problem}")
    return load_folder(root, **kw)


def _broken_mvtec_layout(root: Path) -> str | None:
    """Why a folder that looks like an MVTec-layout set is not one (None when it does not look like one)."""
    candidates = [root] + [d for d in sorted(root.iterdir()) if _is_folder(d) and not d.name.startswith(".")]
    roots = [d for d in candidates if _is_folder(d / "train" / "good")]
    if len(roots) > 1:
        return (f"holds {len(roots)} MVTec-layout datasets ({', '.join(d.name + '/' for d in roots)}): "
                "choose one of them")
    for d in candidates:
        has_split = any(_is_folder(d / part) for part in ("test", "ground_truth", "train"))
        if has_split and not _is_folder(d / "train" / "good"):
            where = "" if d == root else f"{d.name}/"
            return (f"looks like an MVTec-layout set ({where}test/, ground_truth/ or train/) but "
                    f"{where}train/good/ is missing or not a folder: fix the layout, or point at a plain folder "
                    "of normal images")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------

def _resize_float(arr: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float map with Pillow mode "F" (same filter as the uint8 image path)."""
    if (arr.shape[1], arr.shape[0]) == tuple(size_wh):
        return arr.astype(np.float32, copy=True)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
    return np.asarray(img.resize(size_wh, Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float32).copy()


def _pair(value, name: str) -> tuple[int, int]:
    """An int n as (n, n), or a (height, width) pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, not {value!r}")
    return int(value[0]), int(value[1])


def fit_frame(sizes_hw: Sequence[tuple[int, int]], long_side: int, multiple: int = 32) -> tuple[int, int]:
    """The model frame (height, width) for images of these sizes: their median aspect ratio kept, the
    longer side ``long_side``, the shorter rounded to a multiple of ``multiple`` (the backbone's stride).

    A camera on a line gives one image shape, so one frame per model keeps every batch rectangular with
    no padding; an image of another aspect is stretched into it (the model card reports by how much).
    """
    if not len(sizes_hw):
        raise ValueError("no image sizes to choose a frame from")
    aspect = float(np.median([w / h for h, w in sizes_hw]))
    short = max(multiple, int(round(long_side / max(aspect, 1 / aspect) / multiple)) * multiple)
    return (long_side, short) if aspect < 1 else (short, long_side)


@dataclass(frozen=True)
class Preprocess:
    """Resize (to ``resize``: an int n for n x n, or a (height, width) frame), centre-crop to ``crop x crop``
    (None: no crop), normalise.

    Images use antialiased bilinear resizing (torch, uint8); masks are resized the same way as 0/1 floats
    (Pillow mode "F") and thresholded at 0.5; float maps use Pillow mode "F" with the same filter.
    """
    resize: int | tuple[int, int] = 256
    crop: int | None = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        frame = _pair(self.resize, "resize")
        object.__setattr__(self, "resize", frame[0] if frame[0] == frame[1] else frame)
        if self.crop is not None and (not isinstance(self.crop, (int, np.integer)) or not 1 <= self.crop <= min(frame)):
            raise ValueError(f"crop must be None or an int in 1..{min(frame)} (the shorter side of the resized "
                             f"frame), not {self.crop!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values (R, G, B)")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, not {self.std}")

    @property
    def frame(self) -> tuple[int, int]:
        """(height, width) after resizing, before the crop."""
        return _pair(self.resize, "resize")

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the model input: the maps' frame."""
        return (self.crop, self.crop) if self.crop is not None else self.frame

    @property
    def input_size(self) -> int:
        """The side of a square model input (networks that need one, e.g. the reconstruction family)."""
        h, w = self.input_hw
        if h != w:
            raise ValueError(f"this preprocessing gives a {h}x{w} (HxW) input, not a square one")
        return h

    @property
    def _offset(self) -> tuple[int, int]:
        (fh, fw), (ih, iw) = self.frame, self.input_hw
        return (fh - ih) // 2, (fw - iw) // 2

    def _crop(self, arr: np.ndarray) -> np.ndarray:
        (oh, ow), (ih, iw) = self._offset, self.input_hw
        return arr[oh:oh + ih, ow:ow + iw]

    @staticmethod
    def _check_image(image) -> np.ndarray:
        a = np.asarray(image)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {a.shape} dtype {a.dtype}")
        return a

    def image_to_frame(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> input_hw x 3 uint8 (resize + crop, no normalisation), for display and overlays."""
        a = self._check_image(image)
        if a.shape[:2] != self.frame:
            # torch's uint8 antialiased bilinear is several times faster than Pillow's and samples the same
            # half-pixel grid, so masks (resized by Pillow in float) stay aligned with images.
            import torch
            import torch.nn.functional as F
            t = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None]
            a = F.interpolate(t, size=self.frame, mode="bilinear", antialias=True, align_corners=False)[0]
            a = a.permute(1, 2, 0).numpy()
        return np.ascontiguousarray(self._crop(a))

    def mask_to_frame(self, mask: np.ndarray) -> np.ndarray:
        """HxW bool -> input_hw bool: bilinear on 0/1 then > 0.5, the same geometry as :meth:`image_to_frame`."""
        m = np.asarray(mask)
        if m.ndim != 2:
            raise ValueError(f"expected an HxW mask, got shape {m.shape}")
        fh, fw = self.frame
        f = _resize_float(m.astype(np.float32), (fw, fh))
        return np.ascontiguousarray(self._crop(f) > 0.5)

    def images_to_tensor(self, images: Sequence[np.ndarray]):
        """(N, 3, H, W) float32 tensor at :attr:`input_hw`, normalised with mean/std."""
        import torch

        frames = [self.image_to_frame(im) for im in images]
        if not frames:
            return torch.zeros((0, 3, *self.input_hw), dtype=torch.float32)
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()

    def map_to_input(self, amap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
        """A map in the model frame -> an HxW float32 map at the original image size.

        The crop is put back into the resized frame with the border filled by edge replication, then resized
        bilinearly to ``size_hw``. A map of another shape (e.g. a patch grid) is first resized to the input.
        """
        if hasattr(amap, "detach"):  # a torch tensor
            amap = amap.detach().cpu().numpy()
        a = np.asarray(amap, dtype=np.float32)
        if a.ndim != 2:
            raise ValueError(f"expected a 2-D map, got shape {a.shape}")
        h, w = int(size_hw[0]), int(size_hw[1])
        if h < 1 or w < 1:
            raise ValueError(f"size_hw must be positive, not {size_hw}")
        (ih, iw), (fh, fw), (oh, ow) = self.input_hw, self.frame, self._offset
        if a.shape != (ih, iw):
            a = _resize_float(a, (iw, ih))
        if (ih, iw) != (fh, fw):
            a = np.pad(a, ((oh, fh - ih - oh), (ow, fw - iw - ow)), mode="edge")
        return _resize_float(a, (w, h))

    def to_dict(self) -> dict:
        resize = self.resize if isinstance(self.resize, (int, np.integer)) else list(self.resize)
        return {"resize": resize if isinstance(resize, list) else int(resize),
                "crop": None if self.crop is None else int(self.crop),
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        unknown = set(d) - {"resize", "crop", "mean", "std"}
        if unknown:
            raise ValueError(f"unknown Preprocess keys: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("resize"), list):
            d["resize"] = tuple(d["resize"])
        return cls(**d)
