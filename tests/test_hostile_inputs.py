"""A corpus of broken and hostile inputs driven through every door a user has, each case under a deadline.

Every case must end in one of two ways: refused with a message a user can act on (an exception the product
raises on purpose, or the CLI's exit status 2 and an "error:" line), or loaded with the bad part named in
the load report. Never a hang, a traceback, a file outside the destination, or a silently wrong verdict.
The last test prints the count table.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import zipfile
from collections import Counter
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from PIL import Image

from core.cli import main
from core.data import load_dataset, load_zip
from core.detectors import create_detector

from conftest import DEMO

DEADLINE_S = 60
OUTCOMES: Counter = Counter()
# What the product raises on purpose; anything else reaching a caller is a traceback.
REFUSALS = (ValueError, FileNotFoundError, KeyError)


@contextmanager
def deadline(seconds: int = DEADLINE_S):
    def hung(*_):
        raise TimeoutError(f"no answer within {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def png(path: Path, size=(48, 40), colour=(120, 130, 140)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def actionable(message: str) -> bool:
    return len(message) > 15 and "Traceback" not in message


# --- loaders: one good image beside each bad file -----------------------------------------------------------
def _bad_file(kind: str, folder: Path) -> None:
    target = folder / "bad.png"
    if kind == "truncated png":
        png(folder / "full.png", (64, 64), (1, 2, 3))
        target.write_bytes((folder / "full.png").read_bytes()[:60])
        (folder / "full.png").unlink()
    elif kind == "empty file":
        target.write_bytes(b"")
    elif kind == "text named png":
        target.write_text("not an image")
    elif kind == "EPS named png":
        target.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    elif kind == "huge header":
        head = io.BytesIO()
        Image.new("L", (1, 1)).save(head, "PNG")
        data = bytearray(head.getvalue())
        data[16:24] = (200_000).to_bytes(4, "big") * 2          # IHDR width and height, CRC left wrong
        target.write_bytes(bytes(data))
    elif kind == "named pipe":
        os.mkfifo(target)
    elif kind == "link to /etc/passwd":
        target.symlink_to("/etc/passwd")
    elif kind == "folder named png":
        target.mkdir()
    elif kind == "invalid UTF-8 name":
        png(Path(os.fsdecode(bytes(folder) + b"/bad\xff\xfe.png")))
    elif kind == "duplicate":
        shutil.copyfile(folder / "good.png", target)
    elif kind == "zip named png":
        with zipfile.ZipFile(target, "w") as zf:
            zf.writestr("a.txt", "x")
    elif kind == "GIF named png":
        Image.new("RGB", (20, 20)).save(target, "GIF")
    elif kind == "link this user may not follow":
        target.symlink_to("/proc/1/cwd")
        try:
            os.stat(target)
        except PermissionError:
            return
        pytest.skip("this user may follow /proc/1/cwd")
    else:
        raise AssertionError(kind)


LOADER_CASES = ["truncated png", "empty file", "text named png", "EPS named png", "huge header", "named pipe",
                "link to /etc/passwd", "folder named png", "invalid UTF-8 name", "duplicate", "zip named png",
                "GIF named png", "link this user may not follow"]


@pytest.mark.parametrize("kind", LOADER_CASES)
def test_loader_keeps_the_good_image_and_names_the_bad_file(tmp_path, kind):
    png(tmp_path / "good.png")
    _bad_file(kind, tmp_path)
    with deadline():
        ds = load_dataset(tmp_path)
    if kind == "GIF named png":       # a real image, only misnamed: loaded (GIF is an allowed format)
        assert len(ds) in (1, 2)
    elif kind == "folder named png":  # a folder is walked into, not read as a file
        assert len(ds) == 1 and ds.paths[0].name == "good.png"
    elif kind == "duplicate":         # one copy kept, the other named as its duplicate
        assert len(ds) == 1 and ds.report.skipped[0][1].startswith("duplicate of")
    else:
        assert len(ds) == 1 and ds.paths[0].name == "good.png"
        assert len(ds.report.skipped) == 1 and actionable(ds.report.skipped[0][1])
        json.dumps(ds.report.skipped)   # storable: the registry keeps the report
    OUTCOMES["loader: reported and kept going"] += 1


def _refused_source(kind: str, tmp: Path) -> str:
    if kind == "empty folder":
        (tmp / "empty").mkdir()
        return str(tmp / "empty")
    if kind == "only junk":
        (tmp / "junk").mkdir()
        (tmp / "junk" / "notes.txt").write_text("x")
        (tmp / "junk" / "a.png").write_text("x")
        return str(tmp / "junk")
    if kind == "path is a pipe":
        os.mkfifo(tmp / "pipe")
        return str(tmp / "pipe")
    if kind == "empty path":
        return ""
    if kind == "missing path":
        return str(tmp / "nowhere")
    if kind == "train/good is a file":
        png(tmp / "cat" / "test" / "good" / "a.png")
        (tmp / "cat" / "train").mkdir()
        (tmp / "cat" / "train" / "good").write_text("x")
        return str(tmp / "cat")
    if kind == "not a zip":
        (tmp / "data.zip").write_text("not a zip")
        return str(tmp / "data.zip")
    raise AssertionError(kind)


REFUSED_SOURCES = ["empty folder", "only junk", "path is a pipe", "empty path", "missing path",
                   "train/good is a file", "not a zip"]


@pytest.mark.parametrize("kind", REFUSED_SOURCES)
def test_unusable_sources_are_refused_with_a_reason(tmp_path, kind):
    source = _refused_source(kind, tmp_path)
    with deadline():
        code, out, err = cli("--registry", str(tmp_path / "r.sqlite"), "train", "--data", source,
                             "--set", "resize=64", "coreset_ratio=0.1", "score_border=0")
    assert code == 2 and "error:" in err and actionable(err), err
    OUTCOMES["source: refused with a reason"] += 1


# --- zips: nothing is ever written outside the destination ----------------------------------------------------
def _zip(kind: str, path: Path) -> dict:
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(good, "PNG")
    limits = {}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.png", good.getvalue())
        if kind == "zip slip":
            zf.writestr("../../evil.png", good.getvalue())
        elif kind == "absolute path":
            zf.writestr("/tmp/evil-abs.png", good.getvalue())
        elif kind == "backslash slip":
            zf.writestr("..\\..\\evil.png", good.getvalue())
        elif kind == "symlink member":
            info = zipfile.ZipInfo("link.png")
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
        elif kind == "member over the size limit":
            zf.writestr("big.png", b"\0" * 5000)
            limits["max_member_bytes"] = 4000
        elif kind == "past the total limit":
            for i in range(5):
                zf.writestr(f"p{i}.png", b"\0" * 1000)
            limits["max_total_bytes"] = 2500
        elif kind == "macOS junk":
            zf.writestr("__MACOSX/._ok.png", b"junk")
            zf.writestr(".DS_Store", b"junk")
        elif kind == "zip in a zip":
            zf.writestr("inner.zip", b"PK\x03\x04junk")
        elif kind == "two roots":
            zf.writestr("a/train/good/x.png", good.getvalue())
            zf.writestr("b/train/good/y.png", good.getvalue())
        else:
            raise AssertionError(kind)
    return limits


ZIP_CASES = ["zip slip", "absolute path", "backslash slip", "symlink member", "member over the size limit",
             "past the total limit", "macOS junk", "zip in a zip", "two roots"]


@pytest.mark.parametrize("kind", ZIP_CASES)
def test_zip_members_never_land_outside_the_destination(tmp_path, kind):
    limits = _zip(kind, tmp_path / "in.zip")
    dest = tmp_path / "sandbox" / "dest"
    before = set(tmp_path.rglob("*"))
    with deadline():
        try:
            ds = load_zip(tmp_path / "in.zip", dest, **limits)
        except REFUSALS as exc:
            assert actionable(str(exc))
            OUTCOMES["zip: refused with a reason"] += 1
        else:
            assert kind != "two roots", "two MVTec sets in one zip were read as one plain folder"
            assert len(ds) >= 1
            OUTCOMES["zip: unsafe members skipped"] += 1
    created = set(tmp_path.rglob("*")) - before
    assert all(dest in p.parents or p == dest or p == dest.parent for p in created), created
    assert not Path("/tmp/evil-abs.png").exists()


# --- parameters, from the command line -----------------------------------------------------------------------
def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:      # argparse refusing an argument
            code = exc.code if isinstance(exc.code, int) else 2
            if not isinstance(exc.code, int):
                err.write(f"error: {exc.code}")
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def five_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("five")
    for p in sorted((DEMO / "train" / "good").iterdir())[:5]:
        shutil.copyfile(p, folder / p.name)
    return folder


BAD_PARAMS = ["coreset_ratio=nan", "coreset_ratio=inf", "coreset_ratio=-1", "coreset_ratio=abc", "bogus_param=1",
              "resize=0", "resize=100000", "stages=(9,)", "blur_sigma=nan", "device=bogus", "weights=/etc/passwd",
              "score_border=-8", "n_reweight=0", "search=hnsw"]


@pytest.mark.parametrize("setting", BAD_PARAMS)
def test_bad_parameters_are_refused_by_name(tmp_path, five_images, setting):
    with deadline():
        code, _, err = cli("--registry", str(tmp_path / "r.sqlite"), "train", "--data", str(five_images),
                           "--set", setting)
    assert code == 2 and "error:" in err and actionable(err), err
    assert setting.split("=")[0] in err or "weights" in err or "device" in err, err
    OUTCOMES["parameter: refused by name"] += 1


# --- model folders are untrusted input --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory, five_images):
    from core.data import load_folder
    folder = tmp_path_factory.mktemp("model") / "m"
    create_detector("patchcore", resize=64, coreset_ratio=0.1, score_border=0).fit(load_folder(five_images)).save(folder)
    return folder


def _damage(kind: str, folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    tensors = folder / "fitted.safetensors"
    if kind == "missing config":
        (folder / "config.json").unlink()
    elif kind == "config not JSON":
        (folder / "config.json").write_text("{nope")
    elif kind == "deeply nested JSON":
        (folder / "config.json").write_text("[" * 100_000)
    elif kind == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif kind == "a pickle instead of tensors":
        import pickle
        tensors.write_bytes(pickle.dumps({"memory_bank": [1, 2]}))
    elif kind == "NaN in the bank":
        from safetensors.torch import load_file, save_file
        t = load_file(tensors)
        t["memory_bank"][0, 0] = float("nan")
        save_file(t, tensors)
    elif kind == "another detector's name":
        config["detector"] = "no-such-detector"
    elif kind == "unknown parameter":
        config["params"]["bogus"] = 1
    elif kind == "absurd frame":
        config["input_frame"] = [10**9, 10**9]
    elif kind == "format from the future":
        config["format_version"] = 99
    elif kind == "tensors missing":
        tensors.unlink()
    else:
        raise AssertionError(kind)
    if kind in ("another detector's name", "unknown parameter", "absurd frame", "format from the future"):
        (folder / "config.json").write_text(json.dumps(config))


MODEL_CASES = ["missing config", "config not JSON", "deeply nested JSON", "truncated tensors",
               "a pickle instead of tensors", "NaN in the bank", "another detector's name", "unknown parameter",
               "absurd frame", "format from the future", "tensors missing"]


@pytest.mark.parametrize("kind", MODEL_CASES)
def test_damaged_model_folders_are_refused_naming_the_folder(tmp_path, model, five_images, kind):
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    _damage(kind, folder)
    image = next(five_images.iterdir())
    with deadline():
        code, out, err = cli("predict", "--model", str(folder), str(image), "--threshold", "1")
    assert code == 2 and str(folder) in err and actionable(err), err
    assert "OK" not in out
    OUTCOMES["model folder: refused naming it"] += 1


# --- predictions and their verdicts ------------------------------------------------------------------------------
def test_a_nan_threshold_is_refused(model, five_images):
    with deadline():
        code, out, err = cli("predict", "--model", str(model), str(five_images), "--threshold", "nan")
    assert code == 2 and "threshold" in err and "OK" not in out
    OUTCOMES["predict: refused"] += 1


def test_an_output_path_that_is_a_file_is_refused(tmp_path, model, five_images):
    (tmp_path / "out").write_text("mine")
    with deadline():
        code, _, err = cli("predict", "--model", str(model), str(five_images), "--out", str(tmp_path / "out"))
    assert code == 2 and "out" in err and (tmp_path / "out").read_text() == "mine"
    OUTCOMES["predict: refused"] += 1


def test_a_folder_with_no_images_is_an_error_not_an_empty_csv(tmp_path, model):
    (tmp_path / "empty").mkdir()
    with deadline():
        code, out, err = cli("predict", "--model", str(model), str(tmp_path / "empty"))
    assert code != 0 and "no" in err.lower() and "image" in err.lower()
    OUTCOMES["predict: refused"] += 1


def test_same_stem_inputs_get_one_heatmap_each(tmp_path, model):
    for sub in ("a", "b"):
        png(tmp_path / "in" / sub / "part.png", (64, 64), (100, 100 + len(sub), 90))
    with deadline():
        code, out, _ = cli("predict", "--model", str(model), str(tmp_path / "in"), "--threshold", "1",
                           "--out", str(tmp_path / "maps"))
    assert code == 0 and len(list((tmp_path / "maps").glob("*.png"))) == 2
    OUTCOMES["predict: handled"] += 1


def test_bad_files_among_inputs_are_skipped_and_named(tmp_path, model):
    png(tmp_path / "in" / "good.png", (64, 64))
    (tmp_path / "in" / "bad.png").write_text("no")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    with deadline():
        code, out, err = cli("predict", "--model", str(model), str(tmp_path / "in"), "--threshold", "1")
    assert code == 1 and "bad.png" in err and "good.png" in out
    OUTCOMES["predict: handled"] += 1


# --- the registry ------------------------------------------------------------------------------------------------
def test_a_registry_that_is_not_a_database_is_an_error(tmp_path):
    (tmp_path / "r.sqlite").write_bytes(b"definitely not sqlite" * 100)
    with deadline():
        code, _, err = cli("--registry", str(tmp_path / "r.sqlite"), "list")
    assert code == 2 and "registry" in err
    OUTCOMES["registry: refused"] += 1


def test_a_registry_from_a_newer_version_is_an_error(tmp_path):
    from core.runs import RunStore
    RunStore(tmp_path / "r.sqlite")
    with sqlite3.connect(tmp_path / "r.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    with deadline():
        code, _, err = cli("--registry", str(tmp_path / "r.sqlite"), "list")
    assert code == 2 and "newer" in err
    OUTCOMES["registry: refused"] += 1


def test_the_corpus_is_complete_and_its_counts(capsys):
    total = sum(OUTCOMES.values())
    with capsys.disabled():
        print("\nhostile-input corpus:")
        for outcome, n in sorted(OUTCOMES.items()):
            print(f"  {outcome:40s} {n:3d}")
        print(f"  {'total':40s} {total:3d}")
    assert total >= 60
