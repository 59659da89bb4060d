"""Creating datasets from uploads and server folders: good uploads load, bad ones leave nothing behind."""
import io
import zipfile

import pytest

from core.data import EmptyDatasetError
from core.runs import RunStore
from core.app.uploads import create_from_uploads, register_folder
from core.pipeline import open_dataset
from core.workspace import datasets_dir
from core.workspace import DEMO_DIR

DEMO = DEMO_DIR / "hazelnut_toy"


def files(folder, pattern="*"):
    return [(p.name, p.read_bytes()) for p in sorted(folder.glob(pattern)) if p.is_file()]


def zipped(root, parts=("train", "test", "ground_truth"), prefix="hazelnut_toy/"):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for part in parts:
            for p in sorted((root / part).rglob("*")):
                if p.is_file():
                    zf.write(p, prefix + p.relative_to(root).as_posix())
    return buffer.getvalue()


def test_normal_files_plus_a_test_zip_make_an_mvtec_dataset():
    store = RunStore()
    bad = [("notes.txt", b"hello"), ("broken.png", b"\x89PNG\r\n\x1a\n garbage")]
    dataset_id, ds = create_from_uploads(store, "nuts", files(DEMO / "train" / "good") + bad,
                                         [("test.zip", zipped(DEMO, ("test", "ground_truth")))])
    assert ds.counts() == {"train": {"good": 28}, "test": {"good": 6, "colour": 17}}
    assert sum(s.mask_path is not None for s in ds.samples) == 17
    reasons = dict(ds.report.skipped)
    assert "not an image file" in reasons["notes.txt"] and "broken.png" in " ".join(reasons)
    assert store.get_dataset(dataset_id)["kind"] == "upload"
    assert open_dataset(store.get_dataset(dataset_id)).counts() == ds.counts()


def test_one_mvtec_zip_brings_its_test_split_and_folder_uploads_work():
    store = RunStore()
    _, ds = create_from_uploads(store, "from zip", [("hazelnut_toy.zip", zipped(DEMO))])
    assert ds.counts()["test"] == {"good": 6, "colour": 17}
    folder_upload = [(f"mytest/{p.relative_to(DEMO).as_posix()}", p.read_bytes())
                     for p in sorted((DEMO / "test").rglob("*.jpg"))]
    _, ds = create_from_uploads(store, "from folder", files(DEMO / "train" / "good"), folder_upload)
    assert ds.counts()["test"] == {"good": 6, "colour": 17}
    assert sum(s.mask_path is not None for s in ds.samples) == 0


def test_bad_uploads_raise_and_keep_what_was_stored():
    store = RunStore()
    create_from_uploads(store, "nuts", files(DEMO / "train" / "good")[:3])
    before = sorted(p.name for p in datasets_dir().iterdir())
    with pytest.raises(ValueError, match="already exists"):
        create_from_uploads(store, "nuts", files(DEMO / "train" / "good")[:3])
    with pytest.raises(EmptyDatasetError):
        create_from_uploads(store, "junk", [("a.png", b"not an image"), ("b.txt", b"")])
    with pytest.raises(ValueError, match="MVTec layout"):
        create_from_uploads(store, "bad test", files(DEMO / "train" / "good")[:3],
                            [("t.zip", zipped(DEMO, ("train",), prefix=""))])
    with pytest.raises(ValueError, match="not a zip|cannot be used"):
        create_from_uploads(store, "bad zip", files(DEMO / "train" / "good")[:3], [("t.zip", b"PK\x03\x04 no")])
    assert sorted(p.name for p in datasets_dir().iterdir()) == before
    assert [d["name"] for d in store.list_datasets()] == ["nuts"]


def test_server_folder_is_registered_in_place_once(tmp_path):
    store = RunStore()
    first, ds = register_folder(store, DEMO, "demo")
    again, _ = register_folder(store, DEMO, "demo")
    assert first == again and store.get_dataset(first)["kind"] == "mvtec" and len(ds) == 51
    with pytest.raises(FileNotFoundError):
        register_folder(store, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="already exists"):
        register_folder(store, DEMO / "train", "demo")


def test_a_refused_zip_upload_keeps_its_real_reason_and_copies_no_junk():
    store = RunStore()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(200):                           # many members that look like images and are not
            zf.writestr(f"parts/p{i}.png", b"\0" * 20_000)
    with pytest.raises(EmptyDatasetError, match="parts.zip") as caught:
        create_from_uploads(store, "junk zip", [("parts.zip", buffer.getvalue())])
    assert "cannot identify image" in str(caught.value) or "not a" in str(caught.value)
    assert not (datasets_dir() / "junk-zip").exists()
    # A usable zip with junk beside its images: only the images reach the workspace.
    with zipfile.ZipFile(buffer, "a") as zf:
        for p in sorted((DEMO / "train" / "good").iterdir())[:3]:
            zf.write(p, f"parts/{p.name}")
    _, ds = create_from_uploads(store, "mixed zip", [("parts.zip", buffer.getvalue())])
    stored = [p for p in datasets_dir().rglob("*") if p.is_file()]
    assert len(ds) == 3 and len(stored) == 3
    # The same for a labelled test set uploaded beside: junk in it does not stay in the workspace.
    test_zip = io.BytesIO()
    with zipfile.ZipFile(test_zip, "w") as zf:
        zf.writestr(zipfile.ZipInfo("test/good/junk.png"), b"\0" * 50_000)
        for p in sorted((DEMO / "test" / "good").iterdir())[:2]:
            zf.write(p, f"test/good/{p.name}")
    _, ds = create_from_uploads(store, "with test", files(DEMO / "train" / "good")[:3], [("t.zip", test_zip.getvalue())])
    stored = [p for p in (datasets_dir() / "with-test").rglob("*") if p.is_file()]
    assert len(ds) == 5 and len(stored) == 5 and any("junk.png" in f for f, _ in ds.report.skipped)


def test_a_zip_that_only_looks_like_an_mvtec_set_is_refused_not_trained_on_as_good():
    """Two MVTec sets in one zip, or one whose train/good is a file: read as a plain folder, their test anomalies
    and masks would become "good" training images. The zip is refused with the reason, the good files kept."""
    store = RunStore()
    two_roots = io.BytesIO()
    with zipfile.ZipFile(two_roots, "w") as zf:
        for prefix in ("lineA/", "lineB/"):
            zf.writestr(prefix + "x", b"")
        with zipfile.ZipFile(io.BytesIO(zipped(DEMO, prefix="lineA/"))) as a:
            for info in a.infolist():
                zf.writestr(info.filename, a.read(info))
                zf.writestr(info.filename.replace("lineA/", "lineB/"), a.read(info))
    good_is_file = io.BytesIO()
    with zipfile.ZipFile(good_is_file, "w") as zf:
        with zipfile.ZipFile(io.BytesIO(zipped(DEMO, ("test", "ground_truth"), prefix="part/"))) as a:
            for info in a.infolist():
                zf.writestr(info.filename, a.read(info))
        zf.writestr("part/train/good", b"a file, not a folder")
    loose = files(DEMO / "train" / "good")[:2]
    for name, data, reason in [("two.zip", two_roots.getvalue(), "holds 2 MVTec-layout datasets"),
                               ("file.zip", good_is_file.getvalue(), "train/good/ is missing or not a folder")]:
        _, ds = create_from_uploads(store, name, [(name, data), *loose])
        assert len(ds) == 2 and {s.split for s in ds.samples} == {"train"}      # only the two loose images
        assert any(f == name and reason in why for f, why in ds.report.skipped), ds.report.skipped


def test_names_too_long_for_the_file_system_are_refused_or_shortened(tmp_path):
    store = RunStore()
    with pytest.raises(ValueError, match="at most 100 characters"):
        create_from_uploads(store, "D" * 400, files(DEMO / "train" / "good")[:2])
    good = files(DEMO / "train" / "good")[:3]
    long_name = "é" * 300 + ".png"                         # 600 bytes: past any file system's 255
    _, ds = create_from_uploads(store, "long names", [*good[:2], (long_name, good[2][1])])
    assert len(ds) == 3 and any(f == long_name and "stored as" in why for f, why in ds.report.warnings)
    for blank in ("", "   "):
        with pytest.raises(ValueError, match="type the path"):
            register_folder(store, blank)
    assert store.list_datasets()[-1]["name"] == "long names"


def test_a_test_zip_says_what_it_refused_and_which_masks_it_thresholded():
    from PIL import Image
    store = RunStore()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("../escape.png", b"x")
        for p in [*sorted((DEMO / "test" / "good").iterdir())[:2], *sorted((DEMO / "test" / "colour").iterdir())[:3]]:
            zf.write(p, p.relative_to(DEMO).as_posix())
        for p in sorted((DEMO / "ground_truth").rglob("*.png"))[:3]:
            jpeg = io.BytesIO()
            Image.open(p).convert("L").save(jpeg, "JPEG", quality=70)
            zf.writestr(p.relative_to(DEMO).with_suffix(".jpg").as_posix(), jpeg.getvalue())
    _, ds = create_from_uploads(store, "jpeg masks", files(DEMO / "train" / "good")[:3], [("t.zip", buffer.getvalue())])
    assert any(f.startswith("t.zip: ") and "escape" in f for f, _ in ds.report.skipped), ds.report.skipped
    thresholded = [f for f, why in ds.report.warnings if "not binary" in why and "JPEG" in why]
    assert thresholded == [f"t.zip: test/colour/0{i}.jpg" for i in range(3)], ds.report.warnings   # by their image
