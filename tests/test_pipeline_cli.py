"""The path dataset -> run registry, through the library and through `python -m core`."""
import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import Cancelled
from core.cli import main
from core.rules import DefectRules
from core.pipeline import models_dir, register_dataset, train_run
from core.runs import RunStore

from conftest import DEMO

FAST = ["--set", "coreset_ratio=0.05", "resize=160"]
FASTEST = [*FAST, "calibration_fraction=0"]    # where the calibration is not what the test is about


def test_train_run_registers_model_scores_and_thresholds(demo):
    store = RunStore()
    dataset_id = register_dataset(store, demo, "mvtec")
    stages = set()
    run_id = train_run(store, dataset_id, demo, "patchcore", {"coreset_ratio": 0.05, "resize": 160},
                       progress=lambda stage, done, total: stages.add(stage))
    run = store.get_run(run_id)
    # score_border is left to "auto"; the 28 training images are too few to hold out, so they are cross-fitted
    assert stages == {"auto settings", "features", "coreset", "calibration", "score"}
    assert run["metrics"]["image_auroc"] > 0.9
    every = store.run_scores(run_id)
    assert every["split"].value_counts().to_dict() == {"test": 23, "calibration": 28, "synthetic": 28}
    calibration = every[every["split"] == "calibration"]
    assert set(calibration["path"]) == {str(s.path) for s in demo.subset(split="train").samples}
    scores = every[every["split"] == "test"]
    assert scores["label"].sum() == 17
    t = run["thresholds"]
    assert t["preset"] == "f1_max" and t["image"] is not None and t["pixel"] is not None
    # The image threshold is the F1-max one: recomputing F1 at it from the stored scores gives f1_max.
    predicted = scores["score"].to_numpy() >= t["image"]
    truth = scores["label"].to_numpy().astype(bool)
    f1 = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert f1 == pytest.approx(run["metrics"]["f1_max"])


def test_cancelled_training_registers_nothing_and_leaves_no_model(demo):
    store = RunStore()
    dataset_id = register_dataset(store, demo, "mvtec")

    def cancel_during_coreset(stage, done, total):
        if stage == "coreset" and done > 1:
            raise Cancelled()
    with pytest.raises(Cancelled):
        train_run(store, dataset_id, demo, "patchcore", {"coreset_ratio": 0.05, "resize": 256}, progress=cancel_during_coreset)
    assert store.list_runs() == []
    assert not models_dir().exists() or not any(models_dir().iterdir())


def test_cli_train_list_predict_evaluate(tmp_path, capsys):
    assert main(["train", "--data", str(DEMO), *FAST]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["metrics"]["image_auroc"] > 0.9

    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "patchcore" in listing and f"run {trained['run_id']}:" in listing

    # One good image, one defective, one corrupt file: the corrupt one is reported, the others scored.
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good, bad = DEMO / "test" / "good" / "04.jpg", DEMO / "test" / "colour" / "00.jpg"
    out = tmp_path / "heat"
    code = main(["predict", "--run", str(trained["run_id"]), str(good), str(bad), str(tmp_path / "broken.png"),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [r["verdict"] for r in rows] == ["OK", "NG"]
    assert float(rows[1]["score"]) > float(rows[0]["score"])
    heat = Image.open(out / "00_heatmap.png")
    assert heat.size == Image.open(bad).size

    # A review band saved with the run: the good image's score now falls in it.
    run = RunStore().get_run(trained["run_id"])
    RunStore().set_threshold(trained["run_id"], review=float(rows[0]["score"]) * 0.99)
    assert main(["predict", "--run", str(trained["run_id"]), str(good), str(bad)]) == 0
    assert [r["verdict"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))] == ["review", "NG"]
    with pytest.raises(ValueError, match="below the image threshold"):
        RunStore().set_threshold(trained["run_id"], review=run["thresholds"]["image"] * 2)
    # Defect rules: the colour defect lies in the middle of the image; a region of interest on its left
    # quarter leaves it out, a minimum area larger than the image rules out every region.
    roi = np.zeros((64, 64), np.uint8)
    roi[:, :16] = 255
    Image.fromarray(roi).save(tmp_path / "roi.png")
    assert main(["predict", "--run", str(trained["run_id"]), str(bad), "--roi", str(tmp_path / "roi.png")]) == 0
    [row] = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["verdict"] == "OK" and row["reason"] == "every region above the pixel threshold is outside the region of interest"
    RunStore().set_rules(trained["run_id"], DefectRules(min_area=512 * 512 + 1))
    assert main(["predict", "--run", str(trained["run_id"]), str(bad)]) == 0
    [row] = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["verdict"] == "OK" and "smaller than the minimum area" in row["reason"]
    assert main(["predict", "--run", str(trained["run_id"]), str(bad), "--min-area", "20"]) == 0
    [row] = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["verdict"] == "NG" and row["reason"].startswith("defect region at x=")
    RunStore().set_rules(trained["run_id"], None)

    # The threshold from the model's own held-out good images, with what it promises.
    assert main(["predict", "--model", run["model_path"], "--false-reject-rate", "0.2", str(good)]) == 0
    captured = capsys.readouterr()
    assert "good parts rejected" in captured.err and "28 held-out good images" in captured.err
    assert list(csv.DictReader(io.StringIO(captured.out)))[0]["verdict"] in ("OK", "NG")

    assert main(["evaluate", "--run", str(trained["run_id"]), "--data", str(DEMO)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["image_auroc"] == pytest.approx(trained["metrics"]["image_auroc"])


def test_cli_bench_writes_measured_numbers(tmp_path, capsys):
    target = tmp_path / "bench.json"
    assert main(["bench", "--data", str(DEMO), *FASTEST, "--json", str(target)]) == 0
    table = capsys.readouterr().out
    [result] = json.loads(target.read_text())
    assert "hazelnut_toy" in table and "predict_over_backbone" in table
    assert 0.5 < result["image_auroc"] <= 1 and result["fit_seconds"] > 0
    assert result["predict_ms"] > 0 and result["backbone_ms"] > 0 and result["end_to_end_ms"] > 0
    assert result["model_mb"] > 0 and result["peak_rss_mb"] > 100
    assert np.isclose(result["predict_over_backbone"], result["predict_ms"] / result["backbone_ms"])


def test_bench_scale_and_coverage_report_what_they_measured(tmp_path, capsys):
    from core.bench import AugmentedCopies
    originals = [np.arange(12, dtype=np.uint8).reshape(2, 2, 3), np.zeros((2, 2, 3), np.uint8)]
    copies = AugmentedCopies(originals, 40)
    distinct = {copies[i].tobytes() + bytes(copies[i].shape) for i in range(16)}
    assert len(copies) == 40 and len(distinct) == 9   # 8 turns and flips of one, the blank one once

    target = tmp_path / "scale.json"
    assert main(["bench", "--data", str(DEMO), "--scale", "60", "--set", "resize=128", "coreset_ratio=0.05",
                 "score_border=0", "calibration_fraction=0", "--json", str(target)]) == 0
    [scale] = json.loads(target.read_text())
    assert scale["n_images"] == 60 and scale["input_frame"] == "128x128" and scale["fit_seconds"] > 0
    assert np.isclose(scale["fit_over_backbone"], 1000 * scale["fit_seconds"] / (60 * scale["backbone_ms"]))
    target = tmp_path / "coverage.json"
    assert main(["bench", "--data", str(DEMO), "--coverage", "--set", "resize=128", "coreset_ratio=0.1",
                 "min_bank=100", "--json", str(target)]) == 0
    [coverage] = json.loads(target.read_text())
    # One chunk here: the streamed coreset is the plain greedy.
    assert coverage["patches"] == 28 * 16 * 16 and coverage["bank_size"] == round(0.1 * 28 * 256)
    assert coverage["streamed_radius"] == pytest.approx(coverage["plain_radius"]) and coverage["plain_radius"] > 0
    assert "streamed_radius" in capsys.readouterr().out


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty)]) == 2
    assert "no usable images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(DEMO), "--detector", "nonsense"])
    assert main(["train", "--data", str(DEMO), "--set", "coreset_ratio"]) == 2      # a --set without "="
    assert "error: --set expects key=value, got 'coreset_ratio'" in capsys.readouterr().err
    assert RunStore().list_datasets() == []                                          # refused before loading


def test_cli_trains_twice_from_the_same_zip(tmp_path, capsys):
    import shutil
    archive = shutil.make_archive(str(tmp_path / "demo"), "zip", root_dir=DEMO.parent, base_dir=DEMO.name)
    run_ids = []
    for _ in range(2):
        assert main(["train", "--data", archive, *FASTEST]) == 0
        run_ids.append(json.loads(capsys.readouterr().out)["run_id"])
    assert run_ids == [1, 2]
    # The dataset is registered where the archive was extracted: the dashboard and re-evaluation reopen it.
    from core.pipeline import open_dataset
    record = RunStore().list_datasets()[0]
    assert Path(record["source"]).is_dir() and len(open_dataset(record).subset(split="test")) == 23


def test_a_dataset_recorded_as_its_archive_is_reopened_and_re_evaluated(tmp_path, capsys):
    import shutil
    import sqlite3
    from core.pipeline import run_results
    from core.results import RESULTS_FILE
    archive = shutil.make_archive(str(tmp_path / "demo"), "zip", root_dir=DEMO.parent, base_dir=DEMO.name)
    assert main(["train", "--data", archive, *FASTEST]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    store = RunStore()
    with sqlite3.connect(store.path) as conn:        # as an older CLI registered it: the archive's path
        conn.execute("UPDATE datasets SET source = ?", (archive,))
    run = store.get_run(run_id)
    (Path(run["model_path"]) / RESULTS_FILE).unlink()  # a run saved before results were kept: evaluated again
    assert len(run_results(store, run_id).scores) == 23


def test_the_cli_and_a_server_folder_give_a_dataset_the_same_kind(tmp_path, capsys):
    import shutil
    from core.app.uploads import register_folder
    holder = tmp_path / "holder"
    shutil.copytree(DEMO, holder / DEMO.name)            # an MVTec set one folder down, as unzipped
    assert main(["train", "--data", str(holder), "--dataset-name", "by cli", *FASTEST]) == 0
    capsys.readouterr()
    store = RunStore()
    _, _ = register_folder(store, holder, "by folder")
    assert {d["name"]: d["kind"] for d in store.list_datasets()} == {"by cli": "mvtec", "by folder": "mvtec"}


def test_cli_refuses_empty_data_unknown_and_non_finite_parameters_and_pipes(tmp_path, capsys):
    import os
    assert main(["train", "--data", ""]) == 2
    assert "--data is empty" in capsys.readouterr().err
    assert main(["train", "--data", str(DEMO), "--set", "bogus_param=1"]) == 2
    assert "no parameter 'bogus_param'" in capsys.readouterr().err
    assert main(["train", "--data", str(DEMO), "--set", "coreset_ratio=nan"]) == 2
    assert "finite" in capsys.readouterr().err
    # A named pipe in a folder or as a path must not block a reader for ever.
    folder = tmp_path / "with_pipe"
    folder.mkdir()
    os.mkfifo(folder / "camera.png")
    from core.data import ImageError, load_folder, read_image
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(folder / "camera.png")
    with pytest.raises(ValueError):          # nothing usable left: an empty set, said so
        load_folder(folder)


def test_predict_refuses_a_file_as_out_and_an_empty_input_and_never_overwrites_a_heatmap(tmp_path, capsys):
    from core.detectors import create_detector
    from core.data import load_mvtec
    folder = create_detector("patchcore", resize=64, coreset_ratio=0.1).fit(
        load_mvtec(DEMO).subset(split="train")[:3]).save(tmp_path / "model")
    image = DEMO / "test" / "good" / "04.jpg"
    blocker = tmp_path / "heat.txt"
    blocker.write_text("keep me")
    assert main(["predict", "--model", str(folder), str(image), "--out", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err and blocker.read_text() == "keep me"
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["predict", "--model", str(folder), str(empty)]) == 2
    assert "no image files" in capsys.readouterr().err
    # Two images named 04.jpg from two folders: two heatmaps, each named in the CSV.
    other = tmp_path / "other"
    other.mkdir()
    (other / "04.jpg").write_bytes((DEMO / "test" / "colour" / "00.jpg").read_bytes())
    assert main(["predict", "--model", str(folder), str(image), str(other / "04.jpg"),
                 "--out", str(tmp_path / "heat")]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [Path(r["heatmap"]).name for r in rows] == ["04_heatmap.png", "04_2_heatmap.png"]
    assert all(Path(r["heatmap"]).is_file() for r in rows)


@pytest.fixture
def small_fit(demo):
    from core.detectors import create_detector
    return create_detector("patchcore", resize=64, coreset_ratio=0.1, score_border=0).fit(
        demo.subset(split="train")[:5])


def test_a_locked_registry_is_waited_for_then_reported_and_the_fit_is_kept(demo, small_fit):
    import sqlite3
    from core.pipeline import register_fitted
    from core.runs import RegistryLockedError
    store = RunStore(busy_timeout_s=0.2)
    dataset_id = register_dataset(store, demo, "mvtec")
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")                 # another program holds the write lock throughout
    waits = []
    try:
        with pytest.raises(RegistryLockedError, match="fitted model is kept in") as caught:
            register_fitted(store, dataset_id, demo, small_fit,
                            progress=lambda stage, done, total: waits.append(stage) if "locked" in stage else None)
    finally:
        holder.rollback()
        holder.close()
    assert waits == ["registry locked: waiting"] * 2    # three attempts, two waits reported
    kept = Path(str(caught.value).split("kept in ")[1].split(":")[0])
    assert (kept / "config.json").is_file() and not list(models_dir().glob(".unregistered-*"))
    from core.pipeline import sweep_unregistered_models
    assert sweep_unregistered_models() == [] and kept.is_dir()     # kept on purpose: never swept
    assert store.list_runs() == []


def test_a_registry_lock_released_in_time_loses_nothing(demo, small_fit):
    import sqlite3
    import threading
    from core.pipeline import register_fitted
    store = RunStore(busy_timeout_s=0.3)
    dataset_id = register_dataset(store, demo, "mvtec")
    holder = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.45, lambda: (holder.rollback(), holder.close())).start()   # during the second attempt
    run_id = register_fitted(store, dataset_id, demo, small_fit)
    assert store.get_run(run_id)["model_path"]


def test_kill_9_between_save_and_register_leaves_no_orphan_after_the_next_start(tmp_path):
    import subprocess
    import sys
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from core.data import load_mvtec
from core.detectors import create_detector
from core.pipeline import register_dataset, register_fitted
from core.runs import RunStore
demo = load_mvtec({str(DEMO)!r})
store = RunStore()
dataset_id = register_dataset(store, demo, "mvtec")
det = create_detector("patchcore", resize=64, coreset_ratio=0.1, score_border=0).fit(demo.subset(split="train")[:5])
store.add_run = lambda **kw: os.kill(os.getpid(), signal.SIGKILL)    # killed after the save, before the commit
register_fitted(store, dataset_id, demo, det)
"""
    done = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), timeout=300)
    assert done.returncode == -9
    orphans = [p for p in models_dir().iterdir() if p.is_dir()]
    assert len(orphans) == 1 and list(models_dir().glob(".unregistered-*"))
    code = main(["list"])                               # the next start of any command sweeps
    assert code == 0 and not [p for p in models_dir().iterdir()]


def test_a_claim_of_a_live_process_is_left_alone(tmp_path):
    from core.pipeline import UNREGISTERED, sweep_unregistered_models
    models_dir().mkdir(parents=True)
    (models_dir() / "patchcore-live").mkdir()
    (models_dir() / f"{UNREGISTERED}patchcore-live").write_text(str(os.getpid()))   # this very process
    assert sweep_unregistered_models() == [] and (models_dir() / "patchcore-live").is_dir()


def test_bench_times_detectors_in_turns_and_skips_repeating_slow_calls(monkeypatch):
    from core import bench
    calls, clock = [], [0.0]

    def call(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    timings = bench._time_alternately([{"a": call("a", 2.0)}, {"b": call("b", 1.0), "slow": call("slow", 40.0)}],
                                      [4, 2], repeats=2)
    assert calls == ["a", "b", "slow", "a", "b", "a", "b"]   # warm-ups, then turns; the slow call only once
    assert timings == [{"a": 500.0}, {"b": 500.0, "slow": 20000.0}]
