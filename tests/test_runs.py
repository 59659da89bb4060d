"""Behaviour of the SQLite run registry (core/runs.py)."""
import datetime as dt
import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.rules import DefectRules
from core.runs import SCHEMA_VERSION, RegistryError, RunStore, to_json, _SCHEMA

ARCHIVED_COLUMN = "    archived          INTEGER NOT NULL DEFAULT 0 CHECK (archived IN (0, 1)),\n"   # schema 5

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "registry.sqlite")


@pytest.fixture
def ds(store):
    return store.add_dataset("bottle", "/data/mvtec/bottle", "mvtec", {"n_train": 209}, {"ok": True})


def make_scores(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = [0, 1, None][i % 3]
        out.append({"path": f"test/{'good' if label == 0 else 'crack'}/{i:04d}.png", "split": "test",
                    "label": label, "defect": "good" if label == 0 else "crack",
                    "score": float(rng.normal())})
    return out


def add_run(store, ds, **kw):
    args = dict(dataset_id=ds, detector="patchcore", params={"coreset_ratio": 0.1}, model_path="models/r",
                metrics={"image_auroc": 0.99}, timings={"fit_s": 1.5}, model_card={"backbone": "lite0"},
                scores=make_scores(5))
    args.update(kw)
    return store.add_run(**args)


def count(path, table):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


# -- schema and location ---------------------------------------------------------------------------
def test_fresh_path_creates_schema_in_wal_mode(tmp_path):
    path = tmp_path / "nested" / "dir" / "reg.sqlite"
    store = RunStore(path)
    assert path.exists() and store.path == path
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"datasets", "runs", "scores"} <= tables
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    # reopening an existing registry keeps its content
    ds = store.add_dataset("a", "/x", "folder", {}, {})
    assert RunStore(path).get_dataset(ds)["name"] == "a"


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "reg.sqlite"
    RunStore(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RegistryError, match="newer"):
        RunStore(path)


def test_a_file_that_is_not_a_registry_is_refused_with_a_way_out(tmp_path):
    path = tmp_path / "reg.sqlite"
    path.write_text("these are my notes")
    with pytest.raises(RegistryError, match="not a usable AnomalyScope registry.*move it aside"):
        RunStore(path)
    assert path.read_text() == "these are my notes"


def test_default_path_comes_from_anomalyscope_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ANOMALYSCOPE_HOME", str(home))
    store = RunStore()
    assert store.path == home / "registry.sqlite"
    store.add_dataset("d", "/x", "zip", {}, {})
    assert (home / "registry.sqlite").exists()
    assert RunStore(home / "registry.sqlite").find_dataset("d") is not None


# -- datasets --------------------------------------------------------------------------------------
def test_dataset_round_trip(store):
    summary = {"n_train": np.int64(209), "size": (900, 900), "mean": np.float32(0.5), "classes": ["good"]}
    ds = store.add_dataset("bottle", "/data/bottle", "mvtec", summary, {"warnings": []})
    got = store.get_dataset(ds)
    assert got == {"id": ds, "name": "bottle", "source": "/data/bottle", "kind": "mvtec",
                   "summary": {"n_train": 209, "size": [900, 900], "mean": 0.5, "classes": ["good"]},
                   "report": {"warnings": []}, "excluded": [], "archived": False, "created": got["created"],
                   "feedback": []}
    created = dt.datetime.fromisoformat(got["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert store.find_dataset("bottle") == got
    assert store.find_dataset("nope") is None
    ds2 = store.add_dataset("screw", "/data/screw.zip", "zip", {}, {})
    assert [d["id"] for d in store.list_datasets()] == [ds2, ds]
    with pytest.raises(KeyError):
        store.get_dataset(9999)


def test_dataset_name_clash_and_bad_kind(store, ds):
    with pytest.raises(ValueError, match="'bottle' already exists"):
        store.add_dataset("bottle", "/elsewhere", "folder", {}, {})
    with pytest.raises(ValueError, match="kind"):
        store.add_dataset("other", "/x", "tarball", {}, {})
    with pytest.raises(ValueError):
        store.add_dataset("  ", "/x", "folder", {}, {})
    assert len(store.list_datasets()) == 1


# -- runs ------------------------------------------------------------------------------------------
def test_run_round_trip_with_1000_scores(store, ds):
    scores = make_scores(1000)
    rid = store.add_run(dataset_id=ds, detector="patchcore", name="first",
                        params={"layers": (2, 3), "coreset_ratio": np.float64(0.1), "k": np.int32(9)},
                        model_path="models/run1", metrics={"image_auroc": np.float32(0.75)},
                        timings={"fit_s": 12.5}, model_card={"backbone": "tf_efficientnet_lite0"},
                        scores=scores, thresholds={"image": np.float64(0.3), "pixel": None})
    run = store.get_run(rid)
    assert run["id"] == rid and run["dataset_id"] == ds and run["dataset_name"] == "bottle"
    assert run["name"] == "first" and run["detector"] == "patchcore" and run["model_path"] == "models/run1"
    assert run["params"] == {"layers": [2, 3], "coreset_ratio": 0.1, "k": 9}
    assert run["metrics"] == {"image_auroc": 0.75} and run["timings"] == {"fit_s": 12.5}
    assert run["model_card"] == {"backbone": "tf_efficientnet_lite0"}
    assert run["threshold_image"] == 0.3 and run["threshold_pixel"] is None
    assert run["thresholds"]["image"] == 0.3 and run["thresholds"]["updated"] is not None
    assert run["deployed"] is False and run["n_scores"] == 1000
    dt.datetime.fromisoformat(run["created"])

    df = store.run_scores(rid)
    assert list(df.columns) == ["path", "split", "label", "defect", "score"]
    assert len(df) == 1000
    assert df["path"].tolist() == [s["path"] for s in scores]  # insertion order
    assert df["split"].tolist() == ["test"] * 1000
    assert df["defect"].tolist() == [s["defect"] for s in scores]
    assert [None if pd.isna(v) else int(v) for v in df["label"]] == [s["label"] for s in scores]
    assert df["score"].tolist() == [s["score"] for s in scores]  # exact float round trip
    assert str(df["label"].dtype) == "Int64" and df["score"].dtype == np.float64


def test_scores_defaults_and_nan_handling(store, ds):
    rid = add_run(store, ds, scores=[{"path": Path("a.png"), "score": np.float32(1.5)},
                                     {"path": "b.png", "score": float("nan"), "label": float("nan")},
                                     {"path": "c.png", "score": 2, "label": np.int64(1), "defect": "cut"}])
    df = store.run_scores(rid)
    assert df["path"].tolist() == ["a.png", "b.png", "c.png"]
    assert df["split"].tolist() == ["test"] * 3
    assert df["label"].isna().tolist() == [True, True, False] and df["label"].iloc[2] == 1
    assert df["score"].iloc[0] == 1.5 and math.isnan(df["score"].iloc[1]) and df["score"].iloc[2] == 2.0
    empty = add_run(store, ds, scores=[])
    assert store.run_scores(empty).empty and list(store.run_scores(empty).columns) == [
        "path", "split", "label", "defect", "score"]
    with pytest.raises(KeyError):
        store.run_scores(9999)
    with pytest.raises(KeyError):
        store.get_run(9999)
    with pytest.raises(KeyError):
        add_run(store, 9999)


def test_list_runs_newest_first_and_by_dataset(store, ds):
    other = store.add_dataset("screw", "/s", "folder", {}, {})
    r1 = add_run(store, ds)
    r2 = add_run(store, other)
    r3 = add_run(store, ds)
    assert [r["id"] for r in store.list_runs()] == [r3, r2, r1]
    assert [r["id"] for r in store.list_runs(ds)] == [r3, r1]
    assert [r["id"] for r in store.list_runs(other)] == [r2]
    assert {r["dataset_name"] for r in store.list_runs(ds)} == {"bottle"}


def test_nan_metric_stored_as_none(store, ds):
    rid = add_run(store, ds, metrics={"pixel_auroc": float("nan"), "image_auroc": np.float64(0.9),
                                      "pro": np.nan, "inf": float("inf"), "per_defect": {"crack": np.nan},
                                      "curve": np.array([0.1, np.nan])})
    assert store.get_run(rid)["metrics"] == {"pixel_auroc": None, "image_auroc": 0.9, "pro": None,
                                             "inf": None, "per_defect": {"crack": None}, "curve": [0.1, None]}
    conn = sqlite3.connect(store.path)
    raw = conn.execute("SELECT metrics FROM runs WHERE id = ?", (rid,)).fetchone()[0]
    conn.close()
    assert "NaN" not in raw and "Infinity" not in raw
    assert to_json({"x": np.bool_(True), "n": np.int16(3)}) == '{"x": true, "n": 3}'
    with pytest.raises(TypeError, match="object"):
        to_json({"bad": object()})


def test_set_threshold_updates_only_given_values(store, ds):
    rid = add_run(store, ds)
    assert store.get_run(rid)["thresholds"] == {"image": None, "pixel": None, "review": None, "preset": None,
                                                "updated": None, "saved": {"image": None, "pixel": None}}
    store.set_threshold(rid, image=np.float32(0.5), preset="f1_max")
    t = store.get_run(rid)["thresholds"]
    assert t["image"] == 0.5 and t["pixel"] is None and t["preset"] == "f1_max" and t["updated"]
    first_update = t["updated"]
    store.set_threshold(rid, pixel=0.25, preset="fpr<=0.01")
    t = store.get_run(rid)["thresholds"]
    assert (t["image"], t["pixel"], t["preset"]) == (0.5, 0.25, "fpr<=0.01")
    assert t["updated"] >= first_update
    store.set_threshold(rid, image=0.7)
    t = store.get_run(rid)["thresholds"]
    assert (t["image"], t["pixel"], t["preset"]) == (0.7, 0.25, "manual")
    with pytest.raises(ValueError):
        store.set_threshold(rid, image=float("nan"))
    with pytest.raises(ValueError):
        store.set_threshold(rid)
    with pytest.raises(KeyError):
        store.set_threshold(9999, image=1.0)
    assert store.get_run(rid)["thresholds"]["image"] == 0.7


def test_update_metrics_merges(store, ds):
    rid = add_run(store, ds, metrics={"image_auroc": 0.9, "pixel_auroc": None})
    store.update_metrics(rid, {"pixel_auroc": np.float64(0.95), "pro": float("nan")})
    assert store.get_run(rid)["metrics"] == {"image_auroc": 0.9, "pixel_auroc": 0.95, "pro": None}
    with pytest.raises(KeyError):
        store.update_metrics(9999, {"a": 1})


def test_set_deployed_leaves_exactly_one(store, ds):
    other = store.add_dataset("screw", "/s", "folder", {}, {})
    runs = [add_run(store, ds) for _ in range(3)]
    r_other = add_run(store, other)
    store.set_deployed(other, r_other)
    assert store.deployed_run(ds) is None
    for rid in (runs[0], runs[2], runs[1]):
        store.set_deployed(ds, rid)
        flags = {r["id"]: r["deployed"] for r in store.list_runs(ds)}
        assert [k for k, v in flags.items() if v] == [rid]
        assert store.deployed_run(ds)["id"] == rid
    assert store.deployed_run(other)["id"] == r_other  # other datasets untouched
    with pytest.raises(ValueError, match="belongs to dataset"):
        store.set_deployed(ds, r_other)
    assert store.deployed_run(ds)["id"] == runs[1]  # refused call changed nothing
    store.set_deployed(ds, None)
    assert store.deployed_run(ds) is None


def test_delete_run_returns_model_path(store, ds):
    keep = add_run(store, ds, model_path="models/keep")
    rid = add_run(store, ds, model_path="models/gone", scores=make_scores(10))
    assert store.delete_run(rid) == "models/gone"
    with pytest.raises(KeyError):
        store.get_run(rid)
    assert [r["id"] for r in store.list_runs()] == [keep]
    assert count(store.path, "scores") == 5  # only the kept run's
    with pytest.raises(KeyError):
        store.delete_run(rid)


def test_delete_dataset_refuses_with_runs_and_cascades(store, ds):
    other = store.add_dataset("screw", "/s", "folder", {}, {})
    r_other = add_run(store, other)
    add_run(store, ds, model_path="m/1")
    add_run(store, ds, model_path="m/2")
    with pytest.raises(ValueError, match="2 run"):
        store.delete_dataset(ds)
    assert store.get_dataset(ds)["name"] == "bottle" and len(store.list_runs(ds)) == 2
    assert sorted(store.delete_dataset(ds, cascade=True)) == ["m/1", "m/2"]
    assert store.find_dataset("bottle") is None and store.list_runs(ds) == []
    assert [r["id"] for r in store.list_runs()] == [r_other]
    assert count(store.path, "scores") == 5
    empty = store.add_dataset("empty", "/e", "upload", {}, {})
    assert store.delete_dataset(empty) == []
    with pytest.raises(KeyError):
        store.get_dataset(empty)
    # the name is free again
    store.add_dataset("bottle", "/again", "mvtec", {}, {})


# -- atomicity -------------------------------------------------------------------------------------
def test_bad_score_row_mid_way_leaves_nothing(store, ds):
    scores = make_scores(1000)
    scores[500]["score"] = "not a number"
    with pytest.raises(ValueError, match="row 500"):
        add_run(store, ds, scores=scores)
    assert store.list_runs() == []
    assert count(store.path, "runs") == 0 and count(store.path, "scores") == 0
    scores[500]["score"] = 0.0
    scores[700]["label"] = 2
    with pytest.raises(ValueError, match="row 700"):
        add_run(store, ds, scores=scores)
    assert count(store.path, "runs") == 0 and count(store.path, "scores") == 0
    rid = add_run(store, ds)  # the store still works afterwards
    assert store.list_runs()[0]["id"] == rid


def test_failure_after_run_row_insert_rolls_back(store, ds, monkeypatch):
    seen, real = {}, RunStore._insert_scores

    def insert_then_fail(conn, run_id, scores):
        real(conn, run_id, list(scores)[:100])
        seen["runs"] = conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        seen["scores"] = conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
        raise RuntimeError("crash mid-insert")

    monkeypatch.setattr(RunStore, "_insert_scores", staticmethod(insert_then_fail))
    with pytest.raises(RuntimeError, match="crash"):
        add_run(store, ds, scores=make_scores(1000))
    assert seen == {"runs": 1, "scores": 100}  # the rows existed inside the transaction...
    assert count(store.path, "runs") == 0 and count(store.path, "scores") == 0  # ...and are gone


def test_killed_process_leaves_no_half_registered_run(tmp_path):
    path = tmp_path / "reg.sqlite"
    ds = RunStore(path).add_dataset("bottle", "/b", "mvtec", {}, {})
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from core.runs import RunStore
        real = RunStore._insert_scores
        def insert_then_die(conn, run_id, scores):
            real(conn, run_id, list(scores)[:50])
            os._exit(3)   # killed mid-transaction: no commit, no rollback, no cleanup
        RunStore._insert_scores = staticmethod(insert_then_die)
        RunStore({str(path)!r}).add_run(dataset_id={ds}, detector="d", params={{}}, model_path="m",
            metrics={{}}, timings={{}}, model_card={{}},
            scores=[{{"path": str(i), "score": 1.0}} for i in range(100)])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    store = RunStore(path)
    assert store.list_runs() == []
    assert count(path, "runs") == 0 and count(path, "scores") == 0
    assert store.get_dataset(ds)["name"] == "bottle"


# -- concurrency -----------------------------------------------------------------------------------
def test_two_stores_in_two_threads_write_concurrently(tmp_path):
    path = tmp_path / "reg.sqlite"
    setup = RunStore(path)
    ds = setup.add_dataset("bottle", "/b", "mvtec", {}, {})
    errors, ids = [], {0: [], 1: []}
    start = threading.Barrier(2)

    def worker(k):
        try:
            store = RunStore(path)
            start.wait()
            for i in range(50):
                rid = store.add_run(dataset_id=ds, detector=f"det{k}", params={"i": i}, model_path=f"m/{k}/{i}",
                                    metrics={}, timings={}, model_card={}, scores=make_scores(20, seed=i))
                ids[k].append(rid)
                if i % 10 == 0:
                    store.update_metrics(rid, {f"w{k}": i})
                    store.set_deployed(ds, rid)
                    store.list_runs(ds)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    runs = setup.list_runs(ds)
    assert len(runs) == 100 and len(set(ids[0]) | set(ids[1])) == 100
    assert sorted(r["id"] for r in runs) == sorted(ids[0] + ids[1])
    assert all(r["n_scores"] == 20 for r in runs)
    assert sum(r["deployed"] for r in runs) == 1
    assert {r["detector"] for r in runs} == {"det0", "det1"}
    assert count(path, "scores") == 2000


def test_one_run_with_damaged_json_does_not_hide_the_others(tmp_path):
    path = tmp_path / "reg.sqlite"
    store = RunStore(path)
    ds = store.add_dataset(name="a", source="/x", kind="folder", summary={}, report={})
    good = store.add_run(dataset_id=ds, detector="patchcore", params={"k": 1}, model_path="/m1",
                         metrics={"image_auroc": 0.9}, timings={}, model_card={}, scores=[])
    bad = store.add_run(dataset_id=ds, detector="padim", params={}, model_path="/m2", metrics={}, timings={},
                        model_card={}, scores=[])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE runs SET metrics = ?, params = ? WHERE id = ?", ("{not json", "[" * 100000, bad))
    runs = {r["id"]: r for r in RunStore(path).list_runs()}
    assert runs[good]["metrics"] == {"image_auroc": 0.9} and runs[good]["params"] == {"k": 1}
    assert "damaged JSON" in runs[bad]["metrics"]["unreadable"] and "unreadable" in runs[bad]["params"]


def test_review_band_is_saved_below_the_image_threshold_and_removable(store, ds):
    rid = add_run(store, ds, thresholds={"image": 2.0, "review": 1.5, "preset": "f1_max"})
    assert store.get_run(rid)["thresholds"]["review"] == 1.5
    with pytest.raises(ValueError, match="below the image threshold"):
        store.set_threshold(rid, image=1.0)                 # would leave the review band above the threshold
    assert store.get_run(rid)["thresholds"]["image"] == 2.0  # rolled back
    store.set_threshold(rid, image=1.0, remove_review=True)
    t = store.get_run(rid)["thresholds"]
    assert (t["image"], t["review"]) == (1.0, None)
    with pytest.raises(ValueError, match="below the image threshold"):
        add_run(store, ds, thresholds={"review": 1.0})      # a review band needs an image threshold


def test_a_version_1_registry_gains_the_review_and_rules_columns_and_keeps_its_runs(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    old_schema = (_SCHEMA.replace("    threshold_review  REAL,\n", "")
                  .replace("    rules             TEXT    NOT NULL DEFAULT '{}',\n", "")
                  .replace("    roi               BLOB,\n", "")
                  .replace("    excluded TEXT    NOT NULL DEFAULT '[]',\n", "")
                  .replace(ARCHIVED_COLUMN, ""))
    assert not any(c in old_schema for c in ("threshold_review", "rules ", "roi ", "excluded", "archived"))
    conn.executescript(old_schema)
    conn.execute("INSERT INTO datasets (name, source, kind, created) VALUES ('d', '/d', 'folder', 'now')")
    conn.execute("INSERT INTO runs (dataset_id, detector, model_path, threshold_image, created) "
                 "VALUES (1, 'patchcore', '/m', 3.0, 'now')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = RunStore(path)
    t = store.get_run(1)["thresholds"]
    assert (t["image"], t["review"]) == (3.0, None)
    store.set_threshold(1, review=2.0)
    assert store.get_run(1)["thresholds"]["review"] == 2.0
    assert (store.get_run(1)["rules"], store.get_run(1)["roi"]) == ({}, None)
    store.set_rules(1, DefectRules(min_area=5))
    assert store.get_run(1)["rules"]["min_area"] == 5
    assert store.get_dataset(1)["excluded"] == []
    store.set_excluded(1, ["/d/b.png", "/d/a.png", "/d/a.png"])
    assert store.get_dataset(1)["excluded"] == ["/d/a.png", "/d/b.png"]


# -- inspections (the inspection service's record) ---------------------------------------------------
def test_inspections_round_trip_newest_first_and_outlive_their_run(store, ds):
    rid = add_run(store, ds)
    first = store.add_inspection(run_id=rid, variant="bottle", score=1.5, verdict="NG", reason="score above",
                                 seconds=0.02, source="a.png")
    store.add_inspection(run_id=rid, variant="bottle", score=float("nan"), verdict="", seconds=None)
    [newest, oldest] = store.list_inspections(run_id=rid)
    assert oldest["id"] == first and oldest["source"] == "a.png" and oldest["verdict"] == "NG"
    assert (oldest["score"], oldest["reason"], oldest["seconds"]) == (1.5, "score above", 0.02)
    assert math.isnan(newest["score"]) and newest["source"] is None and newest["verdict"] == ""
    assert dt.datetime.fromisoformat(oldest["time"]).tzinfo is not None
    assert store.list_inspections(limit=1)[0]["id"] == newest["id"]
    assert store.list_inspections(variant="other") == [] and store.count_inspections(rid) == 2
    with pytest.raises(ValueError, match="verdict must be one of"):
        store.add_inspection(run_id=rid, variant="bottle", score=1.0, verdict="bad")
    with pytest.raises(ValueError, match="score must be a number"):
        store.add_inspection(run_id=rid, variant="bottle", score="high", verdict="OK")
    store.delete_run(rid)                        # the line's record stays
    assert store.count_inspections(rid) == 2 and store.count_inspections() == 2


def test_inspections_from_many_threads_are_all_kept(tmp_path):
    path = tmp_path / "reg.sqlite"
    rid = add_run(RunStore(path), RunStore(path).add_dataset("d", "/d", "folder", {}, {}))
    errors, start = [], threading.Barrier(4)

    def worker(k):
        try:
            store = RunStore(path)
            start.wait()
            for i in range(50):
                store.add_inspection(run_id=rid, variant="d", score=float(i), verdict="OK", source=f"{k}/{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert {r["source"] for r in RunStore(path).list_inspections(limit=None)} == {
        f"{k}/{i}" for k in range(4) for i in range(50)}


def test_a_version_3_registry_gains_the_inspections_table_and_keeps_its_runs(tmp_path):
    path = tmp_path / "v3.sqlite"
    conn = sqlite3.connect(path)
    old_schema = _SCHEMA[:_SCHEMA.index("-- no foreign key on run_id")].replace(ARCHIVED_COLUMN, "")
    assert "inspections" not in old_schema and "archived" not in old_schema
    conn.executescript(old_schema)
    conn.execute("INSERT INTO datasets (name, source, kind, created) VALUES ('d', '/d', 'folder', 'now')")
    conn.execute("INSERT INTO runs (dataset_id, detector, model_path, threshold_image, created) "
                 "VALUES (1, 'patchcore', '/m', 3.0, 'now')")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    store = RunStore(path)
    assert store.get_run(1)["thresholds"]["image"] == 3.0
    assert store.list_inspections() == []
    store.add_inspection(run_id=1, variant="d", score=4.0, verdict="NG")
    assert store.count_inspections(1) == 1
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
    assert store.get_run(1)["archived"] is False and store.get_dataset(1)["archived"] is False


# -- threshold history (schema 6) ----------------------------------------------------------------------
def test_each_level_keeps_its_own_preset_time_and_note_and_every_save_is_in_the_history(store, ds):
    rid = add_run(store, ds, thresholds={"image": 0.5, "pixel": 0.2, "preset": "f1_max"})
    saved = store.get_run(rid)["thresholds"]["saved"]
    assert saved["image"]["preset"] == saved["pixel"]["preset"] == "f1_max" and saved["image"]["note"] == ""
    store.set_threshold(rid, pixel=0.3, preset="manual", note="dust on the lens counts")
    store.set_threshold(rid, image=0.6, review=0.4, preset="gap_middle", note="line 2")
    t = store.get_run(rid)["thresholds"]
    assert (t["saved"]["image"]["preset"], t["saved"]["image"]["note"]) == ("gap_middle", "line 2")
    assert (t["saved"]["pixel"]["preset"], t["saved"]["pixel"]["note"]) == ("manual", "dust on the lens counts")
    assert t["saved"]["pixel"]["time"] < t["saved"]["image"]["time"] == t["updated"]
    history = store.threshold_history(rid)
    assert [(h["level"], h["value"], h["review"], h["preset"]) for h in history] == [
        ("image", 0.6, 0.4, "gap_middle"), ("pixel", 0.3, None, "manual"),
        ("pixel", 0.2, None, "f1_max"), ("image", 0.5, None, "f1_max")]     # newest first, training's included
    assert [h["value"] for h in store.threshold_history(rid, "pixel")] == [0.3, 0.2]
    store.set_threshold(rid, remove_review=True)            # the band belongs to the image level
    assert store.threshold_history(rid, "image")[0]["review"] is None
    with pytest.raises(ValueError):
        store.set_threshold(rid, review=0.9)                # refused and rolled back: no history row either
    assert len(store.threshold_history(rid)) == 5
    with pytest.raises(KeyError):
        store.threshold_history(rid + 1)


def test_reverting_restores_a_saved_threshold_with_its_band_and_preset_and_is_recorded(store, ds):
    rid = add_run(store, ds, thresholds={"image": 0.5, "pixel": 0.2, "preset": "f1_max"})
    store.set_threshold(rid, image=0.8, review=0.7, preset="manual")
    store.set_threshold(rid, pixel=0.9, preset="manual")
    first_image = store.threshold_history(rid, "image")[-1]
    store.revert_threshold(rid, first_image["id"])
    t = store.get_run(rid)["thresholds"]
    assert (t["image"], t["review"], t["pixel"]) == (0.5, None, 0.9)     # the pixel level is left alone
    assert t["saved"]["image"]["preset"] == "f1_max" and t["saved"]["image"]["note"].startswith("reverted to")
    band = store.threshold_history(rid, "image")[1]                       # 0.8 with its band
    store.revert_threshold(rid, band["id"], note="back again")
    t = store.get_run(rid)["thresholds"]
    assert (t["image"], t["review"], t["saved"]["image"]["note"]) == (0.8, 0.7, "back again")
    assert len(store.threshold_history(rid, "image")) == 4
    other = add_run(store, ds, thresholds={"image": 1.0})
    with pytest.raises(KeyError):
        store.revert_threshold(other, first_image["id"])                  # another run's row


def test_a_version_5_registry_gains_the_threshold_history_and_shows_its_old_thresholds(tmp_path):
    path = tmp_path / "v5.sqlite"
    conn = sqlite3.connect(path)
    old_schema = _SCHEMA[:_SCHEMA.index("-- every threshold saved")]
    assert "threshold_history" not in old_schema
    conn.executescript(old_schema)
    conn.execute("INSERT INTO datasets (name, source, kind, created) VALUES ('d', '/d', 'folder', 'now')")
    conn.execute("INSERT INTO runs (dataset_id, detector, model_path, threshold_image, threshold_preset, "
                 "threshold_updated, created) VALUES (1, 'patchcore', '/m', 3.0, 'f1_max', '2025-01-01', 'now')")
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    store = RunStore(path)
    assert store.get_run(1)["thresholds"]["saved"] == {"image": {"preset": "f1_max", "time": "2025-01-01", "note": ""},
                                                       "pixel": None}
    assert store.threshold_history(1) == []
    store.set_threshold(1, pixel=1.0, note="first pixel threshold")
    assert store.get_run(1)["thresholds"]["saved"]["pixel"]["note"] == "first pixel threshold"
    assert [h["level"] for h in store.threshold_history(1)] == ["pixel"]
    store.delete_run(1)                                     # its history goes with it
    assert count(path, "threshold_history") == 0


def test_archiving_keeps_a_dataset_or_run_and_its_flag_round_trips(store, ds):
    rid = add_run(store, ds)
    store.set_archived(run_id=rid)
    store.set_archived(dataset_id=ds)
    assert store.get_run(rid)["archived"] and store.get_dataset(ds)["archived"]
    assert [r["id"] for r in store.list_runs()] == [rid]          # still listed: hiding is the views' choice
    store.set_archived(run_id=rid, archived=False)
    assert not store.get_run(rid)["archived"]
    with pytest.raises(KeyError):
        store.set_archived(run_id=rid + 1)
    with pytest.raises(ValueError, match="exactly one"):
        store.set_archived(dataset_id=ds, run_id=rid)
