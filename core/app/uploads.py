"""New datasets from what users upload or name: normal images (files or a zip), an optional labelled test set
(a zip or folders in MVTec layout, masks optional), or a folder on the server.

An upload is assembled into a new folder ``workspace/datasets/<name>/`` in MVTec layout, loaded with the
usual checks, and only then registered. Any failure removes that folder again, so a bad upload leaves
nothing half-made behind and never touches a dataset that already exists.
"""
from __future__ import annotations

import io
import logging
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from ..data import (IMAGE_SUFFIXES, EmptyDatasetError, ImageSet, LoadReport, extract_zip, load_dataset, load_mvtec,
                   load_zip)
from ..pipeline import dataset_kind, report_dict
from ..runs import RunStore
from ..workspace import datasets_dir

# An upload as the browser hands it over: (file name, possibly with folders, and its bytes).
UploadedFile = tuple[str, bytes]
# Each stored file's path under the new dataset folder -> the name the user knows it by ("a.png", "set.zip: x/a.png").
Origins = dict[str, str]
PACKED_FOLDER = "uploaded folder"   # _one_zip's name for the files of an uploaded folder, never shown as a prefix

log = logging.getLogger(__name__)
# Longest dataset name, and longest stored file name stem (file systems stop at 255 bytes).
MAX_NAME_CHARS, MAX_STEM_BYTES = 100, 150


def folder_name(name: str) -> str:
    """A safe folder name for a dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "dataset"


def _checked_name(name: str) -> str:
    """The dataset name without surrounding spaces, refused when longer than MAX_NAME_CHARS."""
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"a dataset name has at most {MAX_NAME_CHARS} characters ({len(name)} given): choose a "
                         "shorter one")
    return name


def is_zip(upload: UploadedFile) -> bool:
    return upload[0].lower().endswith(".zip") or zipfile.is_zipfile(io.BytesIO(upload[1]))


def create_from_uploads(store: RunStore, name: str, normal: Sequence[UploadedFile],
                        test: Sequence[UploadedFile] = ()) -> tuple[int, ImageSet]:
    """Register a dataset made of uploaded files; returns (dataset id, loaded set).

    ``normal``: image files and/or zips of normal images. A zip in MVTec layout also brings its test
    split when no ``test`` upload is given. ``test``: one zip, or the files of an uploaded folder (names
    with their relative paths), in MVTec layout: ``test/good/``, ``test/<defect>/`` and optionally
    ``ground_truth/<defect>/<name>_mask.png``. What cannot be used is listed in the set's load report.
    """
    name = _checked_name(name)
    if not name:
        raise ValueError("give the dataset a name")
    if store.find_dataset(name) is not None:
        raise ValueError(f"a dataset named {name!r} already exists: choose another name")
    if not normal:
        raise ValueError("upload at least one normal image (or a zip of them)")
    root = datasets_dir() / folder_name(name)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        root.mkdir()
    except FileExistsError:
        log.warning("upload %r refused: its folder %s already exists", name, root)
        raise ValueError(f"a folder for the name {name!r} already exists in the workspace: choose another "
                         "name") from None
    try:
        extraction, origins = LoadReport(source=name), Origins()
        with tempfile.TemporaryDirectory(dir=root.parent, prefix=".upload-") as scratch:
            mvtec_from_zip = _place_normal(normal, root, Path(scratch), extraction, origins)
            if test:
                _place_test(_one_zip(test), root, Path(scratch) / "test", extraction, origins)
            elif mvtec_from_zip is not None:
                _copy_test_split(*mvtec_from_zip, root, origins)
        try:
            dataset = load_mvtec(root)
        except EmptyDatasetError as exc:   # say why every upload was refused, not only what reached the folder
            log.warning("upload %r refused (assembled in %s): %s", name, root, exc)
            raise EmptyDatasetError(_users_names(exc.report, name, extraction, origins)) from None
        log.info("upload %r stored in %s: %s", name, root, dataset.report.summary())
        dataset.report = _users_names(dataset.report, name, extraction, origins)
        _keep_only(root, dataset)
        if not len(dataset.subset(split="train")):
            raise EmptyDatasetError(dataset.report)
        dataset.name = name
        dataset_id = store.add_dataset(name=name, source=str(root), kind="upload", summary=dataset.summary(),
                                       report=report_dict(dataset))
        return dataset_id, dataset
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def describe_normal_zip(upload: UploadedFile, test_upload: bool) -> str | None:
    """What a zip dropped among the normal images holds and what creating the dataset will take from it, read from
    its list of names before anything is unpacked (the load checks the images themselves); None for a file that
    is not a zip. ``test_upload``: a labelled test set is uploaded beside it."""
    if not is_zip(upload):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(upload[1])) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{upload[0]} cannot be read as a zip: creating the dataset will say why."
    images = [PurePosixPath(n) for n in names if PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES]
    prefixes = {p.parts[:p.parts.index("train")] for p in images
                if "train" in p.parts[:-1] and p.parts[p.parts.index("train") + 1:][:1] == ("good",)}
    if len(prefixes) != 1:
        return f"{upload[0]}: {len(images)} image files, all used as normal (good) training images."
    top = len(next(iter(prefixes)))
    within = [p.parts[top:] for p in images if p.parts[:top] == next(iter(prefixes))]
    train = sum(1 for p in within if p[:2] == ("train", "good"))
    tests = [p[1] for p in within if len(p) >= 3 and p[0] == "test"]
    masks = sum(1 for p in within if p[:1] == ("ground_truth",))
    found = f"{upload[0]} is a set in MVTec layout: {train} training images in train/good/"
    if not tests:
        return found + ", used as the normal images; it has no test/ folder."
    types = sorted(set(tests) - {"good"})
    found += (f" and a labelled test set of {len(tests)} images in test/ ({tests.count('good')} good, "
              f"{len(tests) - tests.count('good')} defective in {len(types)} type{'s' if len(types) != 1 else ''}"
              f"{': ' + ', '.join(types[:6]) if types else ''}{', …' if len(types) > 6 else ''}; {masks} masks).")
    if test_upload:
        return found + " Only its training images are used: the test set you upload below is the test set."
    return found + " Both are used: its training images as the normal images, its test/ as the labelled test set."


def register_folder(store: RunStore, path: str | Path, name: str | None = None) -> tuple[int, ImageSet]:
    """Register a dataset folder on the server (MVTec layout, or a plain folder of normal images) in place."""
    if not str(path).strip():
        raise ValueError("type the path of a folder on the server")   # Path("") would be the working directory
    name = _checked_name(name or "")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}" if not folder.exists() else f"not a folder: {folder}")
    dataset = load_dataset(folder)
    name = name or dataset.name
    found = store.find_dataset(name)
    if found is not None:
        if Path(found["source"]).resolve() == folder.resolve():
            return found["id"], dataset
        raise ValueError(f"a dataset named {name!r} already exists: choose another name")
    return store.add_dataset(name=name, source=str(folder.resolve()), kind=dataset_kind(dataset), summary=dataset.summary(),
                             report=report_dict(dataset)), dataset


def _users_names(report: LoadReport, name: str, extraction: LoadReport, origins: Origins) -> LoadReport:
    """The load report of the assembled folder as the user knows it: the dataset's name, not the server path, and
    each file by the name it was uploaded under (the full paths are in the log)."""
    def named(entries):
        return [(origins.get(f, f), why) for f, why in entries]
    return LoadReport(source=name, skipped=[*extraction.skipped, *named(report.skipped)],
                      warnings=[*extraction.warnings, *named(report.warnings)], n_loaded=report.n_loaded)


def _member(upload_name: str, path: Path, unpacked: Path) -> str:
    """How the user names a file unpacked from their upload: 'set.zip: folder/a.png' (a folder's files by their
    own relative path)."""
    inner = path.relative_to(unpacked).as_posix()
    return inner if upload_name == PACKED_FOLDER else f"{upload_name}: {inner}"


def _one_zip(files: Sequence[UploadedFile]) -> UploadedFile:
    """A zip upload as it is, or the files of an uploaded folder packed into one (to share its safe unpacking)."""
    if len(files) == 1 and is_zip(files[0]):
        return files[0]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for file_name, data in files:
            zf.writestr(file_name, data)
    return PACKED_FOLDER, buffer.getvalue()


def _place_normal(normal: Sequence[UploadedFile], root: Path, scratch: Path, report: LoadReport,
                  origins: Origins) -> tuple[Path, Path, str] | None:
    """Copy normal images into root/train/good; returns an uploaded MVTec set's root if one came as a zip (with
    the folder it was unpacked in and the zip's name, to name its files)."""
    good = root / "train" / "good"
    good.mkdir(parents=True)
    mvtec_root = None
    for k, upload in enumerate(normal):
        if is_zip(upload):
            try:
                # Validated in the scratch folder: only usable training images are copied, and a refusal names
                # the upload. A test split is copied whole and pruned after the dataset load (_keep_only).
                unpacked = load_zip(upload[1], scratch / f"normal-{k}", validate=True)
            except (EmptyDatasetError, ValueError) as exc:   # ImageError is a ValueError
                report.skipped.append((upload[0], str(exc)))
                continue
            report.skipped += [(f"{upload[0]}: {f}", why) for f, why in unpacked.report.skipped]
            for sample in unpacked.subset(split="train", label=0).samples:
                stored = _copy_unique(sample.path, good)
                origins[f"train/good/{stored}"] = _member(upload[0], Path(sample.path), scratch / f"normal-{k}")
            if any(s.split == "test" for s in unpacked.samples):
                mvtec_root = (Path(unpacked.samples[0].path).parents[2],   # <root>/train/good/<file>
                              scratch / f"normal-{k}", upload[0])
        elif Path(upload[0]).suffix.lower() in IMAGE_SUFFIXES:
            stored = _write_unique(good, Path(upload[0]).name, upload[1])
            origins[f"train/good/{stored}"] = upload[0]
            if stored != Path(upload[0]).name:
                report.warnings.append((upload[0], f"stored as {stored}"))
        else:
            report.skipped.append((upload[0], f"not an image file (suffix {Path(upload[0]).suffix or 'none'!r})"))
    return mvtec_root


def _place_test(upload: UploadedFile, root: Path, scratch: Path, report: LoadReport, origins: Origins) -> None:
    """Unpack a test set and copy its test/ and ground_truth/ folders under root."""
    try:
        _, extracted = extract_zip(upload[1], scratch)   # the layout is found below; the dataset load checks images
        report.skipped += [(f"{upload[0]}: {f}", why) for f, why in extracted.skipped]
    except EmptyDatasetError as exc:
        raise ValueError(f"the test set {upload[0]!r} holds no images: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"the test set {upload[0]!r} cannot be used: {exc}") from None
    test_dir = next((p for p in sorted(scratch.rglob("test")) if p.is_dir()), None)
    if test_dir is not None:
        _copy_test_split(test_dir.parent, scratch, upload[0], root, origins)
        return
    good = next((p for p in sorted(scratch.rglob("good")) if p.is_dir() and p.parent.name != "train"), None)
    if good is None:
        raise ValueError("the test set must be in MVTec layout: test/good/ and test/<defect type>/ folders, "
                         "masks optionally in ground_truth/<defect type>/")
    shutil.copytree(good.parent, root / "test")
    origins.update({f"test/{f.relative_to(good.parent).as_posix()}": _member(upload[0], f, scratch)
                    for f in good.parent.rglob("*") if f.is_file()})
    report.warnings.append((upload[0], "no test/ folder: the folder holding good/ was used as the test split"))


def _keep_only(root: Path, dataset: ImageSet) -> None:
    """Delete what the load refused (junk, broken images, duplicates, unusable masks): the workspace keeps only
    the dataset, whose report names what was left out."""
    keep = {Path(p).resolve() for s in dataset.samples for p in (s.path, s.mask_path) if p is not None}
    for f in root.rglob("*"):
        if (f.is_file() or f.is_symlink()) and f.resolve() not in keep:
            f.unlink()


def _copy_test_split(source_root: Path, unpacked: Path, upload_name: str, root: Path, origins: Origins) -> None:
    for part in ("test", "ground_truth"):
        if (source_root / part).is_dir():
            shutil.copytree(source_root / part, root / part, dirs_exist_ok=True)
            origins.update({f.relative_to(source_root).as_posix(): _member(upload_name, f, unpacked)
                            for f in (source_root / part).rglob("*") if f.is_file()})


def _copy_unique(path: Path, folder: Path) -> str:
    return _write_unique(folder, path.name, path.read_bytes())


def _write_unique(folder: Path, file_name: str, data: bytes) -> str:
    """Write under file_name (its stem cut to MAX_STEM_BYTES of UTF-8), with a counter when an upload already
    used it; returns the name written."""
    stem = Path(file_name).stem.encode("utf-8", "surrogateescape")[:MAX_STEM_BYTES].decode("utf-8", "ignore")
    suffix = Path(file_name).suffix
    target, n = folder / f"{stem}{suffix}", 1
    while target.exists():
        target, n = folder / f"{stem}-{n}{suffix}", n + 1
    target.write_bytes(data)
    return target.name
