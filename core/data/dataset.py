"""What a load returns: :class:`Sample` records in a lazy :class:`ImageSet` (an image is decoded only when
indexed) and the :class:`LoadReport` of what was skipped or kept with a caveat."""
from __future__ import annotations

import collections.abc
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .images import ImageError, _probe, read_image, read_mask

_SPLIT_ORDER = {"train": 0, "test": 1}
MARKED_DEFECTIVE = "marked defective"   # the defect type of a good image the user marked defective


def _workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def image_batches(images: Sequence[np.ndarray], batch_size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(index of its first image, the images) for consecutive batches of at most `batch_size` images; a lazy
    :class:`ImageSet` is decoded one batch at a time."""
    for start in range(0, len(images), batch_size):
        yield start, [images[i] for i in range(start, min(start + batch_size, len(images)))]


class EmptyDatasetError(ValueError):
    """A load that found no usable image; ``report`` says what was skipped and why."""

    def __init__(self, report: "LoadReport"):
        self.report = report
        first = "; ".join(f"{f}: {r}" for f, r in report.skipped[:3]) or "none (no image files found)"
        super().__init__(f"no usable images in {report.source}: {len(report.skipped)} files skipped, "
                         f"first reasons: {first}")


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

    def corrected(self, verdicts: dict[str, str]) -> "ImageSet":
        """The set as the user corrected it (image path -> "good" or "defective"): an image marked good becomes a
        normal training image, out of the test set; one marked defective a defective test image, never trained on
        (a good one gets the defect type :data:`MARKED_DEFECTIVE` and no mask)."""
        samples = []
        for s in self.samples:
            verdict = verdicts.get(str(s.path))
            if verdict == "good":
                s = Sample(s.path, "train", 0, "good", None)
            elif verdict == "defective":
                s = Sample(s.path, "test", 1, s.defect if s.label else MARKED_DEFECTIVE, s.mask_path)
            samples.append(s)
        return self._derived(samples)

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
