"""Safe extraction of an uploaded zip: hostile members (paths out of the destination, links, zip bombs,
encrypted or damaged members) and junk are refused and reported, never written."""
from __future__ import annotations

import io
import os
import re
import stat
import zipfile
from pathlib import Path

from .dataset import EmptyDatasetError, LoadReport
from .images import IMAGE_SUFFIXES, ImageError, _source_name

MAX_ZIP_MEMBER_BYTES = 256 * 2**20  # one member of an uploaded zip
MAX_ZIP_TOTAL_BYTES = 2 * 2**30     # all extracted members together (zip-bomb guard)

_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


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
