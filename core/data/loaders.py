"""Loading a dataset from a folder or a zip into an :class:`~core.data.dataset.ImageSet`.

:func:`load_mvtec`, :func:`load_folder`, :func:`load_zip` and the dispatcher :func:`load_dataset` return a
lazy :class:`ImageSet`. With ``validate=True`` every file is opened and fully decoded once at load time (a
thread pool keeps it quick), duplicates are found by SHA-1 of the bytes, and masks are checked against their
image's size. One bad file never spoils a whole load: it is reported in the :class:`LoadReport`.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .dataset import _SPLIT_ORDER, EmptyDatasetError, ImageSet, LoadReport, Sample, _sort_key, _workers
from .images import IMAGE_SUFFIXES, ImageError, _decode, _to_rgb, read_mask
from .zips import extract_zip

MAX_FOLDER_FILES = 200_000          # a dataset folder holding more is someone's disk, not a dataset


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
