"""Tests for core.data: reading any image, loading datasets safely, and the preprocessing geometry."""
import io
import json
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import images
from core.data import (EmptyDatasetError, ImageError, ImageSet, ImageTooLargeError, LoadReport, Preprocess, Sample,
                       image_size, load_dataset, load_folder, load_mvtec, load_zip, read_image, read_mask)

DATASETS = Path(os.environ.get("ANOMALYSCOPE_DATASETS",
                               Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------

def save(path: Path, arr_or_img, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, **kw)
    return path


def noise(h=16, w=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (valid IHDR CRC) with a tiny, useless IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------------
# read_image / read_mask
# ---------------------------------------------------------------------------------------------------------------

def check_rgb(a, shape):
    assert isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == shape


def test_read_grey_L(tmp_path):
    g = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    a = read_image(save(tmp_path / "g.png", g))
    check_rgb(a, (4, 6, 3))
    assert (a[:, :, 0] == g).all() and (a[:, :, 1] == g).all() and (a[:, :, 2] == g).all()


def test_read_rgba_composites_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)      # opaque red
    rgba[0, 1] = (0, 0, 0, 0)          # fully transparent (hidden black)
    rgba[0, 2] = (0, 0, 0, 128)        # half-transparent black -> mid grey
    a = read_image(save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")))
    check_rgb(a, (2, 3, 3))
    assert tuple(a[0, 0]) == (255, 0, 0)
    assert tuple(a[0, 1]) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in a[0, 2])


def test_read_LA(tmp_path):
    la = Image.merge("LA", [Image.new("L", (2, 1), 0), Image.frombytes("L", (2, 1), bytes([255, 0]))])
    a = read_image(save(tmp_path / "la.png", la))
    assert tuple(a[0, 0]) == (0, 0, 0) and tuple(a[0, 1]) == (255, 255, 255)


def test_read_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (3, 1))
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.putpixel((2, 0), 1)
    a = read_image(save(tmp_path / "p.png", p))
    assert tuple(a[0, 0]) == (0, 0, 255) and tuple(a[0, 1]) == (0, 255, 0)
    a = read_image(save(tmp_path / "pt.png", p, transparency=0))   # index 0 transparent -> white
    assert tuple(a[0, 0]) == (255, 255, 255) and tuple(a[0, 2]) == (0, 255, 0)


def test_read_16bit_gradient_uses_full_range(tmp_path):
    grad = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    img = Image.fromarray(grad)
    assert img.mode.startswith("I;16")
    path = save(tmp_path / "g16.png", img)
    assert Image.open(path).mode in ("I;16", "I")        # Pillow may reopen 16-bit PNG as "I"
    a = read_image(path)
    check_rgb(a, (16, 16, 3))
    assert a.min() == 0 and a.max() == 255
    assert np.abs(a[:, :, 0].astype(int) - np.arange(256).reshape(16, 16)).max() <= 1   # 65535/257 = 255 steps
    # a 12-bit camera image in a 16-bit container is scaled by its bit depth, not left near black
    a12 = read_image(save(tmp_path / "g12.png", Image.fromarray(np.array([[0, 4095]], np.uint16))))
    assert tuple(a12[0, :, 0]) == (0, 255)


def test_read_int32_and_float_and_bilevel(tmp_path):
    i32 = Image.fromarray(np.array([[0, 65535]], np.int32), mode="I")
    assert tuple(read_image(save(tmp_path / "i.tif", i32))[0, :, 0]) == (0, 255)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    assert tuple(read_image(save(tmp_path / "f.tif", f))[0, :, 1]) == (0, 128, 255)
    b = Image.new("1", (2, 1))
    b.putpixel((1, 0), 1)
    a = read_image(save(tmp_path / "b.png", b))
    assert tuple(a[0, 0]) == (0, 0, 0) and tuple(a[0, 1]) == (255, 255, 255)


def test_read_cmyk(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))          # no cyan, full magenta+yellow = red
    a = read_image(save(tmp_path / "c.tif", cmyk))
    check_rgb(a, (2, 2, 3))
    assert tuple(a[0, 0]) == (255, 0, 0)
    assert read_image(save(tmp_path / "c.jpg", cmyk)).shape == (2, 2, 3)


def test_read_1x1_and_bytes_and_file_object(tmp_path):
    one = np.array([[[10, 20, 30]]], np.uint8)
    check_rgb(read_image(save(tmp_path / "one.png", one)), (1, 1, 3))
    b = png_bytes(one)
    assert tuple(read_image(b)[0, 0]) == (10, 20, 30)
    assert tuple(read_image(io.BytesIO(b))[0, 0]) == (10, 20, 30)


def test_read_applies_exif_orientation(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)        # 20 wide, 10 high; mark the top-left corner
    arr[:3, :3] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6                             # "rotate 90 CW to display"
    path = save(tmp_path / "rot.jpg", img, exif=exif.tobytes(), quality=95)
    a = read_image(path)
    check_rgb(a, (20, 10, 3))
    assert image_size(path) == (20, 10)
    assert a[:3, -3:].mean() > 200 and a[:3, :3].mean() < 50     # top-left moved to top-right


def test_truncated_png_names_the_file(tmp_path):
    good = save(tmp_path / "full.png", noise(64, 64))
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError) as e:
        read_image(bad)
    assert "cut.png" in str(e.value) and "truncated" in str(e.value).lower()
    assert e.value.file == str(bad)


def test_text_file_named_png(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello, this is not an image")
    with pytest.raises(ImageError, match=r"notes\.png: not a recognised image format"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        read_image(empty)
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "missing.png")


def test_huge_header_is_refused_before_decoding(tmp_path):
    huge = tmp_path / "huge.png"
    huge.write_bytes(fake_png_header(20000, 20000))      # 400 MP: Pillow's own bomb guard fires first
    with pytest.raises(ImageError) as e:
        read_image(huge)
    assert "huge.png" in str(e.value) and "80 megapixels" in str(e.value)
    assert isinstance(e.value, ImageTooLargeError)     # the service answers 413 to it, not 415
    big = tmp_path / "big.png"
    big.write_bytes(fake_png_header(10000, 10000))       # 100 MP: between Pillow's warning and error levels
    with pytest.raises(ImageError, match="limit of 80 megapixels"):
        read_image(big)
    mid = tmp_path / "mid.png"
    mid.write_bytes(fake_png_header(9000, 9000))         # 81 MP: under Pillow's levels, over ours
    with pytest.raises(ImageTooLargeError, match=r"9000x9000 pixels .*limit of 80 megapixels.*not decoded"):
        read_image(mid)


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    path = save(tmp_path / "small.png", noise(20, 20))
    with pytest.raises(ImageError, match="limit of 0.0001 megapixels"):
        read_image(path, max_pixels=100)
    monkeypatch.setattr(images, "MAX_PIXELS", 399)
    with pytest.raises(ImageError, match="20x20 pixels"):
        read_image(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 400)
    assert read_image(path).shape == (20, 20, 3)


def test_read_mask(tmp_path):
    m = np.zeros((5, 7), np.uint8)
    m[1:3, 2:5] = 255
    out = read_mask(save(tmp_path / "m.png", m))
    assert out.dtype == bool and out.shape == (5, 7) and out.sum() == 6 and out[1, 2]
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[4, 6] = (200, 0, 0)
    assert read_mask(save(tmp_path / "rgb.png", rgb)).sum() == 1
    rgba = np.zeros((5, 7, 4), np.uint8)          # black paint on a transparent background: opacity is the mask
    rgba[0, 0, 3] = 255
    rgba[1, 1] = (0, 0, 0, 0)
    assert read_mask(save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"))).sum() == 1


# ---------------------------------------------------------------------------------------------------------------
# load_folder
# ---------------------------------------------------------------------------------------------------------------

def make_messy_folder(root: Path) -> None:
    save(root / "a.png", noise(seed=1))
    save(root / "b.jpg", noise(seed=2), quality=90)
    save(root / "sub" / "c.png", noise(20, 12, seed=3))
    (root / "sub" / "copy_of_a.png").write_bytes((root / "a.png").read_bytes())   # duplicate
    full = png_bytes(noise(64, 64, seed=4))
    (root / "broken.png").write_bytes(full[: len(full) // 2])                     # truncated
    (root / "fake.png").write_text("not an image")                                # text renamed
    (root / "notes.txt").write_text("readme")                                     # non-image suffix
    (root / ".hidden.png").write_bytes((root / "a.png").read_bytes())             # ignored silently
    (root / ".cache").mkdir()
    save(root / ".cache" / "x.png", noise(seed=9))                                # hidden folder: ignored


def test_load_folder_reports_bad_files_and_keeps_good_ones(tmp_path):
    make_messy_folder(tmp_path / "imgs")
    ds = load_folder(tmp_path / "imgs")
    assert isinstance(ds, ImageSet) and len(ds) == 3
    assert [p.name for p in ds.paths] == ["a.png", "b.jpg", "c.png"]
    assert all(s.split == "train" and s.label == 0 and s.defect == "good" and s.mask_path is None
               for s in ds.samples)
    reasons = dict(ds.report.skipped)
    assert set(reasons) == {"broken.png", "fake.png", "notes.txt", "sub/copy_of_a.png"}
    assert "truncated" in reasons["broken.png"]
    assert "not a recognised image format" in reasons["fake.png"]
    assert "not an image file" in reasons["notes.txt"]
    assert reasons["sub/copy_of_a.png"] == "duplicate of a.png"
    assert ds.report.summary() == "3 images loaded, 4 skipped, 0 warnings"
    assert ds[2].shape == (20, 12, 3) and ds[-1].shape == (20, 12, 3)
    assert ds.counts() == {"train": {"good": 3}}
    assert ds.mask(0).shape == (16, 16) and not ds.mask(0).any()


def test_load_folder_without_validation_is_lazy(tmp_path):
    make_messy_folder(tmp_path / "imgs")
    ds = load_folder(tmp_path / "imgs", validate=False)
    assert len(ds) == 6                      # no decoding, no hashing: only the suffix filter applies
    assert dict(ds.report.skipped) == {"notes.txt": "not an image file (suffix '.txt')"}
    i = [p.name for p in ds.paths].index("broken.png")
    with pytest.raises(ImageError, match="broken.png"):
        ds[i]


def test_load_folder_as_anomalous_test_images(tmp_path):
    save(tmp_path / "bad" / "scratch" / "1.png", noise(seed=1))
    save(tmp_path / "bad" / "2.png", noise(seed=2))
    ds = load_folder(tmp_path / "bad", split="test", label=1)
    assert ds.counts() == {"test": {"anomalous": 1, "scratch": 1}}
    assert ds.mask(0) is None and len(ds.report.warnings) == 1
    with pytest.raises(ValueError, match="split"):
        load_folder(tmp_path / "bad", split="val")


def test_empty_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyDatasetError, match="no usable images in .*empty: 0 files skipped"):
        load_folder(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("nope")
    (tmp_path / "junk" / "b.csv").write_text("1,2")
    with pytest.raises(EmptyDatasetError) as e:
        load_folder(tmp_path / "junk")
    assert "2 files skipped" in str(e.value) and "a.png: not a recognised image format" in str(e.value)
    assert len(e.value.report.skipped) == 2
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "nowhere")


def test_progress_callback_can_cancel(tmp_path):
    from core import Cancelled
    for k in range(4):
        save(tmp_path / "p" / f"{k}.png", noise(seed=k))
    calls = []
    load_folder(tmp_path / "p", progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (4, 4)

    def stop(done, total):
        raise Cancelled()
    with pytest.raises(Cancelled):
        load_folder(tmp_path / "p", progress=stop)


# ---------------------------------------------------------------------------------------------------------------
# load_mvtec
# ---------------------------------------------------------------------------------------------------------------

def make_mvtec(root: Path) -> Path:
    for k in range(3):
        save(root / "train" / "good" / f"{k:03d}.png", noise(seed=k))
    save(root / "test" / "good" / "000.png", noise(seed=10))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    for k in range(5):
        save(root / "test" / "crack" / f"{k:03d}.png", noise(seed=20 + k))
    save(root / "ground_truth" / "crack" / "000_mask.png", mask)                  # fine
    save(root / "ground_truth" / "crack" / "001_mask.png", np.zeros((16, 20), np.uint8))  # wrong size
    # 002 has no mask
    save(root / "ground_truth" / "crack" / "003.png", mask)                       # named without _mask
    save(root / "ground_truth" / "crack" / "004_mask.png", np.zeros((16, 16), np.uint8))  # empty: fine
    save(root / "ground_truth" / "crack" / "999_mask.png", mask)                  # orphan
    (root / "readme.txt").write_text("licence")
    (root / "test" / "crack" / "notes.txt").write_text("x")
    return root


def test_load_mvtec_masks_and_warnings(tmp_path):
    ds = load_mvtec(make_mvtec(tmp_path / "widget"))
    assert ds.name == "widget"
    assert ds.counts() == {"train": {"good": 3}, "test": {"good": 1, "crack": 5}}
    assert [(s.split, s.defect, s.path.name) for s in ds.samples][:5] == [
        ("train", "good", "000.png"), ("train", "good", "001.png"), ("train", "good", "002.png"),
        ("test", "good", "000.png"), ("test", "crack", "000.png")]
    masks = {s.path.name: s.mask_path for s in ds.subset(label=1).samples}
    assert masks["000.png"].name == "000_mask.png"
    assert masks["001.png"] is None and masks["002.png"] is None
    assert masks["003.png"].name == "003.png"
    assert masks["004.png"].name == "004_mask.png"
    warn = dict(ds.report.warnings)
    assert set(warn) == {"test/crack/001.png", "test/crack/002.png"}
    assert "mask is 20x16 but the image is 16x16" in warn["test/crack/001.png"]
    assert warn["test/crack/002.png"] == "mask missing: image kept for image-level metrics only"
    skipped = dict(ds.report.skipped)
    assert skipped["ground_truth/crack/999_mask.png"] == "mask without a matching test image"
    assert "not an image file" in skipped["test/crack/notes.txt"]
    assert "readme.txt" not in skipped

    i = ds.paths.index(tmp_path / "widget" / "test" / "crack" / "000.png")
    m = ds.mask(i)
    assert m.dtype == bool and m.shape == (16, 16) and m.sum() == 16
    assert ds.mask(ds.paths.index(tmp_path / "widget" / "test" / "crack" / "001.png")) is None
    assert not ds.mask(0).any()
    np.testing.assert_array_equal(ds.labels, [0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert ds.defects[-1] == "crack"

    test = ds.subset(split="test")
    assert len(test) == 6 and test.report is ds.report
    assert len(ds[1:3]) == 2 and isinstance(ds[1:3], ImageSet)
    assert [s.path.name for s in ds[[0, 4]].samples] == ["000.png", "000.png"]
    assert len(ds[ds.labels == 1]) == 5
    assert ds[0].shape == (16, 16, 3) and np.array_equal(ds[0], noise(seed=0))

    summ = ds.summary()
    json.dumps(summ)
    assert summ["n_images"] == 9 and summ["n_anomalous"] == 5 and summ["n_masks"] == 3
    assert summ["size_min_hw"] == [16, 16] and summ["size_max_hw"] == [16, 16] and summ["modes"] == {"RGB": 9}


def test_load_mvtec_unvalidated_checks_masks_on_access(tmp_path):
    ds = load_mvtec(make_mvtec(tmp_path / "w"), validate=False)
    i = ds.paths.index(tmp_path / "w" / "test" / "crack" / "001.png")
    assert ds.samples[i].mask_path is not None         # not checked at load time
    assert ds.mask(i) is None                          # ... but a mis-sized mask is never handed out
    assert any("mask is 20x16" in m for _, m in ds.report.warnings)
    assert ds.summary()["size_max_hw"] == [16, 16]     # from headers


def test_load_mvtec_rejects_other_layouts_and_finds_nested_root(tmp_path):
    save(tmp_path / "plain" / "a.png", noise())
    with pytest.raises(ValueError, match="train/good"):
        load_mvtec(tmp_path / "plain")
    make_mvtec(tmp_path / "outer" / "inner")
    assert len(load_mvtec(tmp_path / "outer")) == 9


def test_load_dataset_dispatch(tmp_path):
    make_mvtec(tmp_path / "mv")
    assert load_dataset(tmp_path / "mv").counts()["test"] == {"good": 1, "crack": 5}
    save(tmp_path / "flat" / "a.png", noise())
    assert load_dataset(tmp_path / "flat").counts() == {"train": {"good": 1}}
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.png", png_bytes(noise()))
    with pytest.raises(TypeError, match="dest_dir"):
        load_dataset(z)
    assert len(load_dataset(z, dest_dir=tmp_path / "out")) == 1
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------
# load_zip
# ---------------------------------------------------------------------------------------------------------------

def hostile_zip(path: Path) -> Path:
    good = {f"cat/train/good/{k}.png": png_bytes(noise(seed=k)) for k in range(3)}
    good["cat/test/good/0.png"] = png_bytes(noise(seed=10))
    good["cat/test/crack/0.png"] = png_bytes(noise(seed=11))
    m = np.zeros((16, 16), np.uint8)
    m[:4] = 255
    good["cat/ground_truth/crack/0_mask.png"] = png_bytes(m)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, b in good.items():
            zf.writestr(name, b)
        zf.writestr("../evil.png", png_bytes(noise(seed=50)))
        zf.writestr("/abs.png", png_bytes(noise(seed=51)))
        zf.writestr("cat\\..\\..\\win.png", png_bytes(noise(seed=52)))
        link = zipfile.ZipInfo("cat/train/good/link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "../../../../etc/passwd")
        zf.writestr("__MACOSX/cat/train/good/._0.png", b"\x00\x05\x16\x07junk")
        zf.writestr("cat/.DS_Store", b"junk")
        zf.writestr("cat/Thumbs.db", b"junk")
        zf.writestr("cat/readme.txt", "hello")
        zf.writestr("cat/train/good/nulZ.png", png_bytes(noise(seed=53)))
        zf.writestr("cat/train/good/locked.png", png_bytes(noise(seed=54)))
        zf.getinfo("cat/train/good/locked.png").flag_bits |= 0x1    # marked encrypted in the central directory
    raw = path.read_bytes().replace(b"nulZ.png", b"nul\x00.png")    # same length: offsets stay valid
    path.write_bytes(raw)
    return path


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_load_zip_skips_hostile_members(tmp_path):
    z = hostile_zip(tmp_path / "upload.zip")
    dest = tmp_path / "box" / "dest"
    ds = load_zip(z, dest)
    assert ds.counts() == {"train": {"good": 3}, "test": {"good": 1, "crack": 1}}
    assert ds.subset(label=1).samples[0].mask_path.name == "0_mask.png"
    assert ds.mask(4).sum() == 64 and ds.report.warnings == []
    assert ds.name == "upload"
    # nothing outside dest_dir, no link anywhere
    assert all_files(tmp_path) - {"upload.zip"} == {f"box/dest/{f}" for f in all_files(dest)}
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    assert all_files(dest) == {"cat/train/good/0.png", "cat/train/good/1.png", "cat/train/good/2.png",
                               "cat/test/good/0.png", "cat/test/crack/0.png", "cat/ground_truth/crack/0_mask.png"}
    reasons = dict(ds.report.skipped)
    assert "outside" in reasons["../evil.png"]
    assert "absolute path" in reasons["/abs.png"]
    assert "'..'" in reasons["cat\\..\\..\\win.png"]
    assert "symbolic link" in reasons["cat/train/good/link.png"]
    assert "junk" in reasons["__MACOSX/cat/train/good/._0.png"]
    assert "junk" in reasons["cat/.DS_Store"] and "junk" in reasons["cat/Thumbs.db"]
    assert "not an image file" in reasons["cat/readme.txt"]
    assert "NUL" in reasons["cat/train/good/nul\\x00.png"]
    assert "encrypted" in reasons["cat/train/good/locked.png"]
    assert len(reasons) == 10 and ds.report.summary() == "5 images loaded, 10 skipped, 0 warnings"


def test_load_zip_limits(tmp_path):
    z = tmp_path / "flat.zip"
    blobs = [png_bytes(noise(32, 32, seed=k)) for k in range(3)]
    with zipfile.ZipFile(z, "w") as zf:
        for k, b in enumerate(blobs):
            zf.writestr(f"img{k}.png", b)
    ds = load_zip(z, tmp_path / "a", max_total_bytes=len(blobs[0]) + len(blobs[1]))
    assert len(ds) == 2 and ds.counts() == {"train": {"good": 2}}       # plain folder layout
    assert "zip bomb" in dict(ds.report.skipped)["img2.png"]
    ds = load_zip(z.read_bytes(), tmp_path / "b", max_member_bytes=max(len(b) for b in blobs[:2]))
    assert len(ds) >= 2 and len(ds) + len(ds.report.skipped) == 3        # bytes input works too


def test_load_zip_limits_all_refused(tmp_path):
    z = tmp_path / "flat.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("img.png", png_bytes(noise(32, 32)))
    with pytest.raises(EmptyDatasetError, match="above the limit"):
        load_zip(z, tmp_path / "a", max_member_bytes=10)
    assert not list((tmp_path / "a").rglob("*.png"))
    with pytest.raises(ValueError, match="empty folder"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        load_zip(z, tmp_path / "full")


def test_not_a_zip(tmp_path):
    f = tmp_path / "photos.zip"
    f.write_text("definitely not a zip")
    with pytest.raises(ImageError, match=r"photos\.zip: not a zip archive"):
        load_zip(f, tmp_path / "dest")
    png = save(tmp_path / "x.png", noise())
    with pytest.raises(ImageError, match="not a zip archive"):
        load_zip(png, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


# ---------------------------------------------------------------------------------------------------------------
# Preprocess
# ---------------------------------------------------------------------------------------------------------------

def test_preprocess_shapes_and_normalisation():
    pp = Preprocess()
    assert pp.input_size == 224 and Preprocess(crop=None).input_size == 256
    imgs = [np.full((300, 200, 3), (255, 128, 0), np.uint8), noise(50, 70)]
    x = pp.images_to_tensor(imgs)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(x[0, c], torch.tensor(expected[c]), atol=1e-5)
    assert Preprocess(resize=64, crop=None).images_to_tensor(imgs).shape == (2, 3, 64, 64)
    assert pp.images_to_tensor([]).shape == (0, 3, 224, 224)
    grey = pp.images_to_tensor([np.zeros((10, 10), np.uint8)])       # HxW grey accepted
    assert grey.shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="uint8"):
        pp.images_to_tensor([np.zeros((10, 10, 3), np.float32)])


def test_preprocess_validation_and_dict_roundtrip():
    pp = Preprocess(resize=128, crop=112, mean=[0.5, 0.5, 0.5], std=(0.5, 0.5, 0.5))
    d = pp.to_dict()
    assert json.loads(json.dumps(d)) == d == {"resize": 128, "crop": 112, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess.from_dict(d) == pp and hash(Preprocess.from_dict(d)) == hash(pp)
    assert Preprocess.from_dict(Preprocess(crop=None).to_dict()).crop is None
    with pytest.raises(ValueError, match="crop"):
        Preprocess(resize=100, crop=200)
    with pytest.raises(ValueError, match="unknown"):
        Preprocess.from_dict({"resize": 10, "interp": "x"})


def test_map_to_input_constant_and_geometry():
    pp = Preprocess()
    out = pp.map_to_input(np.full((224, 224), 3.5, np.float32), (500, 300))
    assert out.shape == (500, 300) and out.dtype == np.float32
    np.testing.assert_allclose(out, 3.5, rtol=1e-5)
    # a coarse patch grid is accepted too
    assert pp.map_to_input(np.ones((28, 28)), (40, 60)).shape == (40, 60)
    assert pp.map_to_input(torch.ones(224, 224), (10, 10)).shape == (10, 10)
    # round trip: an image-sized ramp -> frame -> back is close to the original inside the cropped region
    h, w = 512, 384
    ramp = np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))
    frame = np.asarray(Image.fromarray(ramp, "F").resize((256, 256), Image.Resampling.BILINEAR))[16:240, 16:240]
    back = pp.map_to_input(frame, (h, w))
    inner = slice(int(w * 20 / 256), int(w * 236 / 256))
    assert np.abs(back[:, inner] - ramp[:, inner]).max() < 0.01
    assert np.allclose(back[:, :5], back[:, int(w * 17 / 256)][:, None], atol=0.01)   # edge-replicated border


def test_image_and_mask_frames_agree():
    pp = Preprocess(resize=128, crop=96)
    img = np.zeros((200, 300, 3), np.uint8)
    mask = np.zeros((200, 300), bool)
    img[80:120, 150:210] = 255
    mask[80:120, 150:210] = True
    f_img, f_mask = pp.image_to_frame(img), pp.mask_to_frame(mask)
    assert f_img.shape == (96, 96, 3) and f_img.dtype == np.uint8
    assert f_mask.shape == (96, 96) and f_mask.dtype == bool
    np.testing.assert_array_equal(f_img[:, :, 0] > 127, f_mask)
    ys, xs = np.nonzero(f_mask)
    # expected box: rows 80..120 * 128/200 - 16, cols 150..210 * 128/300 - 16
    assert abs(ys.min() - (80 * 128 / 200 - 16)) <= 1 and abs(ys.max() + 1 - (120 * 128 / 200 - 16)) <= 1
    assert abs(xs.min() - (150 * 128 / 300 - 16)) <= 1 and abs(xs.max() + 1 - (210 * 128 / 300 - 16)) <= 1
    # and map_to_input puts the frame mask back where it came from
    back = pp.map_to_input(f_mask.astype(np.float32), (200, 300)) > 0.5
    assert (back == mask).mean() > 0.99


def test_imageset_and_report_basics(tmp_path):
    p = save(tmp_path / "x.png", noise())
    ds = ImageSet("mine", [Sample(p, "test", 0, "good", None)])
    assert ds.report.summary() == "1 image loaded, 0 skipped, 0 warnings"
    assert LoadReport("s", [("a", "b")], [("c", "d")], 2).summary() == "2 images loaded, 1 skipped, 1 warning"
    assert [a.shape for a in ds] == [(16, 16, 3)]
    with pytest.raises(IndexError):
        ds[1]
    assert "mine" in repr(ds)


# ---------------------------------------------------------------------------------------------------------------
# real benchmark data (skipped when ../shared/datasets is absent)
# ---------------------------------------------------------------------------------------------------------------

def real(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"benchmark dataset not available: {path}")
    return path


def test_real_bottle():
    ds = load_mvtec(real("bottle"))
    assert ds.counts() == {"train": {"good": 209},
                           "test": {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}}
    assert len(ds.subset(split="test")) == 83
    assert sum(s.mask_path is not None for s in ds.samples) == 63
    assert ds.report.skipped == [] and ds.report.warnings == []
    summ = ds.summary()
    assert summ["size_min_hw"] == summ["size_max_hw"] == [900, 900] and summ["modes"] == {"RGB": 292}
    i = int(np.flatnonzero(ds.labels)[0])
    m = ds.mask(i)
    assert m.shape == (900, 900) and m.any()


def test_real_hazelnut_toy_masks_without_suffix():
    ds = load_mvtec(real("hazelnut_toy"))
    assert ds.counts() == {"train": {"good": 28}, "test": {"good": 6, "colour": 17}}
    anomalous = ds.subset(label=1)
    assert all(s.mask_path is not None and s.mask_path.stem == s.path.stem for s in anomalous.samples)
    assert ds.report.warnings == [] and ds.report.skipped == []
    assert ds.summary()["size_max_hw"] == [522, 512]


def test_real_magnetic_tile_grey_as_rgb():
    ds = load_mvtec(real("magnetic_tile"))                      # every image and mask decoded once (~1 s)
    assert ds.report.skipped == [] and ds.report.warnings == []   # the 4 empty 'uneven' masks are kept
    assert ds.summary()["modes"] == {"L": 1344}
    c = ds.counts()
    assert c["train"] == {"good": 635} and sum(c["test"].values()) == 317 + 392
    assert sum(s.mask_path is not None for s in ds.samples) == 392
    sub = ds.subset(split="test", label=1)[::97]
    for k in range(len(sub)):
        img = sub[k]
        m = sub.mask(k)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        assert np.array_equal(img[:, :, 0], img[:, :, 2])
        assert m is not None and m.shape == img.shape[:2]


def test_only_the_supported_formats_are_ever_decoded(tmp_path):
    # An EPS (PostScript) file named .png must never reach Pillow's EPS plugin (and Ghostscript).
    eps = tmp_path / "label.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="not a recognised image format"):
        read_image(eps)
    gif = tmp_path / "anim.png"
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(ImageError, match="PNG, JPEG, BMP, TIFF or WebP"):
        read_image(gif)
    for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP"):
        path = tmp_path / f"ok.{fmt.lower()}"
        Image.new("RGB", (4, 3), (10, 20, 30)).save(path, format=fmt)
        assert read_image(path).shape == (3, 4, 3)


def test_a_broken_mvtec_layout_is_refused_not_read_as_normal_images(tmp_path):
    from core.data import load_dataset
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    # train/good is a file: the test anomalies must not become "normal" training images.
    broken = tmp_path / "broken"
    (broken / "test" / "crack").mkdir(parents=True)
    (broken / "train").mkdir()
    (broken / "train" / "good").write_text("oops")
    (broken / "test" / "crack" / "000.png").write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="train/good/ is missing or not a folder"):
        load_dataset(broken)
    # Two datasets under one folder (a zip with two roots, unpacked): say so.
    two = tmp_path / "two"
    for name in ("a", "b"):
        (two / name / "train" / "good").mkdir(parents=True)
        (two / name / "train" / "good" / "0.png").write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match="holds 2 MVTec-layout datasets"):
        load_dataset(two)
    # A plain folder of normal images, in subfolders, is still a plain folder.
    plain = tmp_path / "plain" / "line1"
    plain.mkdir(parents=True)
    (plain / "0.png").write_bytes(good.read_bytes())
    assert len(load_dataset(tmp_path / "plain")) == 1


def test_a_jpeg_mask_is_thresholded_at_half_and_reported(tmp_path):
    root = tmp_path / "set"
    for d in ("train/good", "test/crack", "ground_truth/crack"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "train/good" / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "test/crack/000.png")
    drawn = np.zeros((64, 64), np.uint8)
    drawn[13:31, 19:37] = 255                            # off the 8 x 8 JPEG blocks: a compression halo
    Image.fromarray(drawn).save(root / "ground_truth/crack/000_mask.png", format="JPEG", quality=50)
    ds = load_mvtec(root)
    mask = ds.mask(len(ds) - 1)
    assert abs(int(mask.sum()) - 18 * 18) <= 18          # the square, not its compression halo
    assert int((np.asarray(Image.open(root / "ground_truth/crack/000_mask.png")) != 0).sum()) > 18 * 18 + 40
    assert any("not binary" in w and "JPEG" in w for _, w in ds.report.warnings)
