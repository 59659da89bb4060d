"""The run registry: datasets, training runs, per-image scores and the line's inspections in one SQLite file.

Everything a user makes is recorded here: the datasets they registered, every run (detector, params,
model path, metrics, timings, model card, chosen thresholds, which run is deployed), the score of
every test image, and every image the inspection service scored (``inspections``: run, variant, time,
source name, score, verdict, reason, seconds; see :meth:`RunStore.add_inspection`), every threshold saved
(``threshold_history``, see :meth:`RunStore.threshold_history`) and what the user said test images are from
the heatmaps (``image_feedback``, see :meth:`RunStore.set_feedback`). Inspections are the
line's record: they are kept when their run is deleted (their ``run_id`` then names a deleted run). The default file is ``workspace_dir() / "registry.sqlite"`` (``ANOMALYSCOPE_HOME``
moves it). Only the standard library's ``sqlite3`` is used, no ORM.

Concurrency
    Several Streamlit sessions and CLI processes may share one file. Each operation opens its own
    connection (so a ``RunStore`` may be shared by threads, e.g. through ``st.cache_resource``) with
    a 30 s busy timeout, on a database in WAL mode (readers never block the writer). Every write is
    one ``BEGIN IMMEDIATE`` transaction inside ``with conn:``: it takes the write lock up front, so
    read-modify-write updates (``update_metrics``, ``set_deployed``) cannot interleave, and it either
    commits whole or rolls back whole.

Atomicity
    ``add_run`` inserts the run row and all its score rows in ONE transaction. If anything fails
    half-way (a bad score row, an exception, the process being killed) nothing of the run remains.

JSON columns
    ``params``, ``metrics``, ``timings``, ``model_card``, ``summary`` and ``report`` are stored as
    strict JSON. Before encoding, numpy scalars become Python scalars (``.item()``), arrays become
    lists, tuples and sets become lists, ``Path`` becomes ``str``, dates become ISO strings, and
    non-finite floats (NaN, +inf, -inf) and ``pd.NA`` become ``null``: a NaN metric comes back as
    ``None``. Anything else that JSON cannot hold raises ``TypeError`` rather than being stored as
    its ``repr``.

Timestamps are ISO-8601 UTC strings (``2026-01-31T12:00:00.123456+00:00``). The schema version is
kept in ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`).

Example
-------
>>> store = RunStore(tmp_path / "registry.sqlite")                          # doctest: +SKIP
>>> ds = store.add_dataset("bottle", "/data/mvtec/bottle", "mvtec", {"n_train": 209}, {})
>>> rid = store.add_run(dataset_id=ds, detector="patchcore", params={"coreset_ratio": 0.1},
...                     model_path="models/run1", metrics={"image_auroc": 0.99}, timings={"fit_s": 12.0},
...                     model_card={}, scores=[{"path": "a.png", "split": "test", "label": 1,
...                                             "defect": "broken_large", "score": 3.2}])
>>> store.set_threshold(rid, image=2.5, preset="f1_max", note="first week on line 2")
>>> store.revert_threshold(rid, store.threshold_history(rid, "image")[-1]["id"])   # back to the first one
>>> store.set_deployed(ds, rid)
>>> store.run_scores(rid)          # DataFrame: path, split, label, defect, score
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from core.workspace import workspace_dir

__all__ = ["RunStore", "RegistryError", "RegistryLockedError", "SCHEMA_VERSION", "DATASET_KINDS", "FEEDBACK", "REGISTRY_FILENAME", "to_json"]

# 2: runs.threshold_review, the lower end of the OK / review / NG band (NULL: two bands only).
# 3: runs.rules (JSON: minimum defect area, scale) and runs.roi (the region of interest as a PNG), see core.rules;
#    datasets.excluded (JSON list of training image paths the user left out).
# 4: the inspections table (every image the inspection service scored); a new table, so older files only gain it.
# 5: datasets.archived and runs.archived (1: kept, but left out of the dashboard's lists until shown).
# 6: the threshold_history table (every threshold saved, per level, with its preset and note); a new table.
# 7: the image_feedback table (test images a user marked good or defective from a run's heatmaps); a new table,
#    so older files only gain it.
SCHEMA_VERSION = 7


class RegistryError(ValueError):
    """The registry file cannot be used (not a database, or written by a newer AnomalyScope)."""


class RegistryLockedError(RegistryError):
    """Another program held the registry's write lock for longer than the busy timeout."""
REGISTRY_FILENAME = "registry.sqlite"
DATASET_KINDS = ("mvtec", "folder", "zip", "upload")
BUSY_TIMEOUT_S = 30.0
SCORE_COLUMNS = ["path", "split", "label", "defect", "score"]
VERDICTS = ("OK", "review", "NG", "")    # "": the run had no image threshold
FEEDBACK = ("good", "defective")          # what a user may say an image is (see RunStore.set_feedback)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    name     TEXT    NOT NULL UNIQUE,
    source   TEXT    NOT NULL,
    kind     TEXT    NOT NULL CHECK (kind IN ('mvtec', 'folder', 'zip', 'upload')),
    summary  TEXT    NOT NULL DEFAULT '{}',
    report   TEXT    NOT NULL DEFAULT '{}',
    excluded TEXT    NOT NULL DEFAULT '[]',
    archived          INTEGER NOT NULL DEFAULT 0 CHECK (archived IN (0, 1)),
    created  TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id        INTEGER NOT NULL REFERENCES datasets(id),
    name              TEXT,
    detector          TEXT    NOT NULL,
    params            TEXT    NOT NULL DEFAULT '{}',
    model_path        TEXT    NOT NULL,
    metrics           TEXT    NOT NULL DEFAULT '{}',
    timings           TEXT    NOT NULL DEFAULT '{}',
    model_card        TEXT    NOT NULL DEFAULT '{}',
    threshold_image   REAL,
    threshold_pixel   REAL,
    threshold_review  REAL,
    threshold_preset  TEXT,
    threshold_updated TEXT,
    rules             TEXT    NOT NULL DEFAULT '{}',
    roi               BLOB,
    deployed          INTEGER NOT NULL DEFAULT 0 CHECK (deployed IN (0, 1)),
    archived          INTEGER NOT NULL DEFAULT 0 CHECK (archived IN (0, 1)),
    created           TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_dataset ON runs(dataset_id);
-- at most one deployed run per dataset, enforced by the database itself
CREATE UNIQUE INDEX IF NOT EXISTS one_deployed_run ON runs(dataset_id) WHERE deployed = 1;
CREATE TABLE IF NOT EXISTS scores (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    path    TEXT    NOT NULL,
    split   TEXT    NOT NULL,
    label   INTEGER CHECK (label IN (0, 1)),
    defect  TEXT,
    score   REAL
);
CREATE INDEX IF NOT EXISTS scores_by_run ON scores(run_id, id);
-- no foreign key on run_id: the line's record outlives a deleted run
CREATE TABLE IF NOT EXISTS inspections (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id   INTEGER NOT NULL,
    variant  TEXT    NOT NULL,
    time     TEXT    NOT NULL,
    source   TEXT,
    score    REAL,
    verdict  TEXT    NOT NULL,
    reason   TEXT    NOT NULL DEFAULT '',
    seconds  REAL
);
CREATE INDEX IF NOT EXISTS inspections_by_run ON inspections(run_id, id);
-- every threshold saved, one row per level: the image level carries its review band
CREATE TABLE IF NOT EXISTS threshold_history (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    level   TEXT    NOT NULL CHECK (level IN ('image', 'pixel')),
    value   REAL    NOT NULL,
    review  REAL,
    preset  TEXT    NOT NULL,
    note    TEXT    NOT NULL DEFAULT '',
    time    TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS threshold_history_by_run ON threshold_history(run_id, level, id);
-- what the user says an image of a dataset is, one word per image (the latest). No foreign key on run_id, the run
-- whose heatmaps it was said from: the word outlives a deleted run, and goes with its dataset
CREATE TABLE IF NOT EXISTS image_feedback (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id  INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    path        TEXT    NOT NULL,
    verdict     TEXT    NOT NULL CHECK (verdict IN ('good', 'defective')),
    run_id      INTEGER,
    time        TEXT    NOT NULL,
    UNIQUE (dataset_id, path)
);
"""

_RUN_SELECT = """
SELECT r.*, d.name AS dataset_name,
       (SELECT COUNT(*) FROM scores s WHERE s.run_id = r.id) AS n_scores,
       (SELECT json_object('preset', h.preset, 'time', h.time, 'note', h.note) FROM threshold_history h
        WHERE h.run_id = r.id AND h.level = 'image' ORDER BY h.id DESC LIMIT 1) AS saved_image,
       (SELECT json_object('preset', h.preset, 'time', h.time, 'note', h.note) FROM threshold_history h
        WHERE h.run_id = r.id AND h.level = 'pixel' ORDER BY h.id DESC LIMIT 1) AS saved_pixel
FROM runs r JOIN datasets d ON d.id = r.dataset_id
"""
LEVELS = ("image", "pixel")

_JSON_RUN_COLUMNS = ("params", "metrics", "timings", "model_card", "rules")
_JSON_DATASET_COLUMNS = ("summary", "report", "excluded")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _jsonable(obj: Any) -> Any:
    """Return ``obj`` as plain JSON types (see the module docstring for the conversions)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, np.generic):
                k = k.item()
            out[k if isinstance(k, str) else str(k)] = _jsonable(v)
        return out
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if obj is pd.NA:
        return None
    raise TypeError(f"cannot store a {type(obj).__name__} in the run registry as JSON: {obj!r:.80}")


def to_json(obj: Any) -> str:
    """Encode ``obj`` as strict JSON; NaN/inf become ``null`` and numpy scalars plain numbers."""
    return json.dumps(_jsonable({} if obj is None else obj), allow_nan=False, ensure_ascii=False)


def _from_json(text: str | None) -> Any:
    """A stored JSON column; a damaged one (edited by hand, cut short) reads as {"unreadable": reason}, so
    one bad row never hides every other run."""
    if text is None:
        return {}
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        return {"unreadable": f"damaged JSON in the registry ({type(exc).__name__})"}


def _as_id(value: Any, what: str) -> int:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer id, got {value!r}")
    return value


def _threshold(value: Any, what: str) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} threshold must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} threshold must be finite, got {value!r}")
    return out


def _review(review: float | None, image: float | None) -> float | None:
    """The review threshold, which only makes sense below an image threshold."""
    if review is not None and (image is None or review >= image):
        raise ValueError(f"the review threshold ({review:.4g}) must be below the image threshold "
                         f"({'none' if image is None else format(image, '.4g')}): scores from it up to the image "
                         "threshold go to review")
    return review


def _score_row(run_id: int, i: int, row: dict) -> tuple:
    """Validate one score dict and return its ``scores`` row; raises ValueError naming the row."""
    try:
        path, score = row["path"], row["score"]
    except (KeyError, TypeError):
        raise ValueError(f"score row {i} needs 'path' and 'score' keys: {row!r:.120}") from None
    if isinstance(score, (str, bytes)) or score is None:
        raise ValueError(f"score row {i}: score must be a number, got {score!r}")
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise ValueError(f"score row {i}: score must be a number, got {score!r}") from None
    label = row.get("label")
    if label is not None and label is not pd.NA and not (isinstance(label, float) and math.isnan(label)):
        if isinstance(label, (str, bytes)) or label not in (0, 1):
            raise ValueError(f"score row {i}: label must be 0, 1 or None, got {label!r}")
        label = int(label)
    else:
        label = None
    defect = row.get("defect")
    split = row.get("split", "test")
    return (run_id, str(path), str(split), label, None if defect is None else str(defect),
            score if math.isfinite(score) else None)


# ----------------------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------------------
class RunStore:
    """Datasets, runs and per-image scores in one SQLite file, safe for concurrent sessions.

    Parameters
    ----------
    path : str or Path, optional
        The database file. Default: ``workspace_dir() / "registry.sqlite"``, read when the store is
        made (so ``ANOMALYSCOPE_HOME`` set before then is honoured). Parent folders are created and
        the schema is created on first use.

    Notes
    -----
    The object holds no connection, only the path: each method opens, uses and closes its own, so
    one store may be shared between threads and many stores (and processes) may share one file.
    Methods raise ``KeyError`` for an unknown dataset or run id and ``ValueError`` for bad input.
    """

    def __init__(self, path: str | Path | None = None, busy_timeout_s: float = BUSY_TIMEOUT_S):
        self.path = Path(path) if path is not None else workspace_dir() / REGISTRY_FILENAME
        self.busy_timeout_s = float(busy_timeout_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # -- connections -----------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit BEGINs; writes open BEGIN IMMEDIATE themselves.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL: a crash loses no committed data
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed if the block ends normally, rolled back otherwise."""
        conn = self._connect()
        try:
            with conn:  # commit on success, rollback on any exception
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    raise RegistryLockedError(
                        f"{self.path} stayed locked by another program for {self.busy_timeout_s:.0f} s (a long "
                        "write, or a tool holding it open): close that program or try again") from None
                yield conn
        finally:
            conn.close()

    def _init_schema(self) -> None:
        try:
            self._create_or_check_schema()
        except sqlite3.DatabaseError as exc:
            if "not a database" not in str(exc) and "malformed" not in str(exc):
                raise
            raise RegistryError(f"{self.path} is not a usable AnomalyScope registry ({exc}): move it aside, or "
                                f"point --registry or $ANOMALYSCOPE_HOME elsewhere") from None

    def _create_or_check_schema(self) -> None:
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RegistryError(
                        f"{self.path} has registry schema version {version}, newer than this "
                        f"AnomalyScope understands ({SCHEMA_VERSION}); upgrade AnomalyScope")
                if version < SCHEMA_VERSION:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    if 0 < version < 2:   # tables made by version 1 lack the review threshold
                        conn.execute("ALTER TABLE runs ADD COLUMN threshold_review REAL")
                    if 0 < version < 3:   # and those made before version 3 the defect rules
                        conn.execute("ALTER TABLE runs ADD COLUMN rules TEXT NOT NULL DEFAULT '{}'")
                        conn.execute("ALTER TABLE runs ADD COLUMN roi BLOB")
                        conn.execute("ALTER TABLE datasets ADD COLUMN excluded TEXT NOT NULL DEFAULT '[]'")
                    if 0 < version < 5:   # and those made before version 5 the archive flags
                        for table in ("datasets", "runs"):
                            conn.execute(f"ALTER TABLE {table} ADD COLUMN archived INTEGER NOT NULL DEFAULT 0 "
                                         "CHECK (archived IN (0, 1))")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            conn.close()

    # -- row decoding ----------------------------------------------------------------------
    @staticmethod
    def _datasets(conn: sqlite3.Connection, where: str = "", args: tuple = ()) -> list[dict]:
        """The datasets selected by `where`, newest first, JSON decoded, each with its ``feedback``."""
        rows = conn.execute(f"SELECT * FROM datasets {where} ORDER BY id DESC", args).fetchall()
        ids = [r["id"] for r in rows]
        feedback: dict[int, list[dict]] = {i: [] for i in ids}
        for f in conn.execute(f"SELECT * FROM image_feedback WHERE dataset_id IN ({', '.join('?' * len(ids))}) "
                              "ORDER BY id", ids):
            feedback[f["dataset_id"]].append({k: f[k] for k in ("path", "verdict", "run_id", "time")})
        out = []
        for row in rows:
            record = dict(row)
            for col in _JSON_DATASET_COLUMNS:
                record[col] = _from_json(record[col])
            record["archived"] = bool(record["archived"])
            record["feedback"] = feedback[row["id"]]
            out.append(record)
        return out

    @staticmethod
    def _run_dict(row: sqlite3.Row) -> dict:
        out = dict(row)
        for col in _JSON_RUN_COLUMNS:
            out[col] = _from_json(out[col])
        out["deployed"] = bool(out["deployed"])
        out["archived"] = bool(out["archived"])
        # How each level was last saved; a level saved before the history existed (schema < 6) shows the run's
        # one preset and time.
        legacy = {"preset": out["threshold_preset"] or "manual", "time": out["threshold_updated"], "note": ""}
        saved = {}
        for level in LEVELS:
            text = out.pop(f"saved_{level}")
            saved[level] = (json.loads(text) if text is not None
                            else legacy if out[f"threshold_{level}"] is not None else None)
        out["thresholds"] = {"image": out["threshold_image"], "pixel": out["threshold_pixel"],
                             "review": out["threshold_review"],
                             "preset": out["threshold_preset"], "updated": out["threshold_updated"], "saved": saved}
        return out

    # -- datasets --------------------------------------------------------------------------
    def add_dataset(self, name: str, source: str, kind: str, summary: dict, report: dict) -> int:
        """Register a dataset and return its id.

        ``kind`` is one of :data:`DATASET_KINDS`. Names are unique (exact, case-sensitive match);
        a clash raises ``ValueError`` naming the existing dataset.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
        if kind not in DATASET_KINDS:
            raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {kind!r}")
        summary_json, report_json = to_json(summary), to_json(report)
        with self._write() as conn:
            clash = conn.execute("SELECT id FROM datasets WHERE name = ?", (name,)).fetchone()
            if clash is not None:
                raise ValueError(f"a dataset named {name!r} already exists (id {clash['id']}); "
                                 "choose another name or delete that dataset first")
            cur = conn.execute(
                "INSERT INTO datasets (name, source, kind, summary, report, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, str(source), kind, summary_json, report_json, _now()))
            return int(cur.lastrowid)

    def get_dataset(self, dataset_id: int) -> dict:
        """``{"id", "name", "source", "kind", "summary", "report", "excluded", "archived", "created", "feedback"}``;
        KeyError if missing. ``excluded`` lists the training images the user left out (see :meth:`set_excluded`),
        ``feedback`` what the user said images are, oldest first (see :meth:`set_feedback`)."""
        dataset_id = _as_id(dataset_id, "dataset_id")
        with self._read() as conn:
            found = self._datasets(conn, "WHERE id = ?", (dataset_id,))
        if not found:
            raise KeyError(f"no dataset with id {dataset_id}")
        return found[0]

    def set_excluded(self, dataset_id: int, paths: Iterable[str]) -> None:
        """Replace the dataset's list of training images left out of every later fit (the files stay where
        they are: restoring one is removing it from the list)."""
        dataset_id = _as_id(dataset_id, "dataset_id")
        paths = sorted({str(p) for p in paths})
        with self._write() as conn:
            cur = conn.execute("UPDATE datasets SET excluded = ? WHERE id = ?", (to_json(paths), dataset_id))
            if cur.rowcount == 0:
                raise KeyError(f"no dataset with id {dataset_id}")

    def set_feedback(self, dataset_id: int, path: str, verdict: str, run_id: int | None = None) -> None:
        """Record what the user says an image of the dataset is, replacing what they said of it before: "good"
        (a normal training image from the next fit on, out of the test set) or "defective" (a test defect, never
        trained on); see :func:`core.pipeline.open_dataset`. ``run_id`` names the run it was said from."""
        dataset_id = _as_id(dataset_id, "dataset_id")
        if verdict not in FEEDBACK:
            raise ValueError(f"feedback must be one of {FEEDBACK}, got {verdict!r}")
        run_id = None if run_id is None else _as_id(run_id, "run_id")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise KeyError(f"no dataset with id {dataset_id}")
            conn.execute("INSERT INTO image_feedback (dataset_id, path, verdict, run_id, time) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (dataset_id, path) DO UPDATE SET verdict = excluded.verdict, "
                         "run_id = excluded.run_id, time = excluded.time",
                         (dataset_id, str(path), verdict, run_id, _now()))

    def remove_feedback(self, dataset_id: int, paths: Iterable[str]) -> None:
        """Undo what the user said of these images: the next fit takes them as their folders say again."""
        dataset_id = _as_id(dataset_id, "dataset_id")
        with self._write() as conn:
            conn.executemany("DELETE FROM image_feedback WHERE dataset_id = ? AND path = ?",
                             [(dataset_id, str(p)) for p in paths])

    def rename_dataset(self, dataset_id: int, name: str) -> None:
        """Give the dataset another name (names stay unique: a clash raises ValueError naming it)."""
        dataset_id = _as_id(dataset_id, "dataset_id")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
        with self._write() as conn:
            clash = conn.execute("SELECT id FROM datasets WHERE name = ? AND id != ?", (name, dataset_id)).fetchone()
            if clash is not None:
                raise ValueError(f"a dataset named {name!r} already exists (id {clash['id']}): choose another name")
            cur = conn.execute("UPDATE datasets SET name = ? WHERE id = ?", (name, dataset_id))
            if cur.rowcount == 0:
                raise KeyError(f"no dataset with id {dataset_id}")

    def set_archived(self, *, dataset_id: int | None = None, run_id: int | None = None, archived: bool = True) -> None:
        """Archive (or restore) one dataset or one run: it is kept, with its runs and files, and the dashboard's
        lists leave it out until archived items are shown. The registry's own lists still return it."""
        if (dataset_id is None) == (run_id is None):
            raise ValueError("set_archived needs exactly one of dataset_id and run_id")
        table, key = ("datasets", _as_id(dataset_id, "dataset_id")) if run_id is None else ("runs", _as_id(run_id, "run_id"))
        with self._write() as conn:
            cur = conn.execute(f"UPDATE {table} SET archived = ? WHERE id = ?", (int(bool(archived)), key))
            if cur.rowcount == 0:
                raise KeyError(f"no {table[:-1]} with id {key}")

    def find_dataset(self, name: str) -> dict | None:
        """The dataset with exactly this name, or None."""
        with self._read() as conn:
            found = self._datasets(conn, "WHERE name = ?", (name,))
        return found[0] if found else None

    def list_datasets(self) -> list[dict]:
        """All datasets, newest first."""
        with self._read() as conn:
            return self._datasets(conn)

    def delete_dataset(self, dataset_id: int, cascade: bool = False) -> list[str]:
        """Delete a dataset; return the model paths of the runs deleted with it (files are kept).

        Refuses with ``ValueError`` while runs reference the dataset, unless ``cascade=True``, which
        deletes those runs and their scores in the same transaction.
        """
        dataset_id = _as_id(dataset_id, "dataset_id")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise KeyError(f"no dataset with id {dataset_id}")
            runs = conn.execute("SELECT id, model_path FROM runs WHERE dataset_id = ? ORDER BY id",
                                (dataset_id,)).fetchall()
            if runs and not cascade:
                raise ValueError(f"dataset {dataset_id} still has {len(runs)} run(s); delete them "
                                 "first or pass cascade=True to delete them too")
            conn.execute("DELETE FROM scores WHERE run_id IN (SELECT id FROM runs WHERE dataset_id = ?)",
                         (dataset_id,))
            conn.execute("DELETE FROM runs WHERE dataset_id = ?", (dataset_id,))
            conn.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))
        return [r["model_path"] for r in runs]

    # -- runs ------------------------------------------------------------------------------
    def add_run(self, *, dataset_id: int, detector: str, params: dict, model_path: str, metrics: dict,
                timings: dict, model_card: dict, scores: Iterable[dict],
                thresholds: dict | None = None, name: str | None = None) -> int:
        """Register a finished run and all its per-image scores in ONE transaction; return its id.

        Parameters
        ----------
        scores : iterable of dict
            ``{"path": str, "split": "test", "label": 0 | 1 | None, "defect": str, "score": float}``.
            ``path`` and ``score`` are required; ``split`` defaults to ``"test"``, ``label`` and
            ``defect`` to None; a NaN label counts as None; other keys are ignored. A NaN score is
            stored as NULL and read back as NaN. A non-numeric score or a label other than 0/1
            raises ``ValueError`` and nothing of the run is kept.
        thresholds : dict, optional
            ``{"image": float | None, "pixel": float | None}``, optionally with ``"preset"``.
        """
        dataset_id = _as_id(dataset_id, "dataset_id")
        if not isinstance(detector, str) or not detector:
            raise ValueError(f"detector must be a non-empty string, got {detector!r}")
        thresholds = dict(thresholds or {})
        unknown = set(thresholds) - {"image", "pixel", "review", "preset"}
        if unknown:
            raise ValueError(f"unknown threshold keys {sorted(unknown)}; use 'image', 'pixel', 'review', 'preset'")
        t_image = _threshold(thresholds.get("image"), "image")
        t_pixel = _threshold(thresholds.get("pixel"), "pixel")
        t_review = _review(_threshold(thresholds.get("review"), "review"), t_image)
        preset = thresholds.get("preset")
        now = _now()
        params_j, metrics_j, timings_j, card_j = (to_json(x) for x in (params, metrics, timings, model_card))
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise KeyError(f"no dataset with id {dataset_id}")
            cur = conn.execute(
                "INSERT INTO runs (dataset_id, name, detector, params, model_path, metrics, timings, "
                "model_card, threshold_image, threshold_pixel, threshold_review, threshold_preset, "
                "threshold_updated, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (dataset_id, name, detector, params_j, str(model_path), metrics_j, timings_j, card_j,
                 t_image, t_pixel, t_review, preset,
                 now if (t_image is not None or t_pixel is not None or preset) else None, now))
            run_id = int(cur.lastrowid)
            self._record_thresholds(conn, run_id, [level for level in LEVELS if thresholds.get(level) is not None],
                                    preset or "manual", "", now)
            self._insert_scores(conn, run_id, scores)
        return run_id

    @staticmethod
    def _insert_scores(conn: sqlite3.Connection, run_id: int, scores: Iterable[dict]) -> None:
        # Rows are validated lazily, so a bad row half-way aborts the whole enclosing transaction.
        conn.executemany(
            "INSERT INTO scores (run_id, path, split, label, defect, score) VALUES (?, ?, ?, ?, ?, ?)",
            (_score_row(run_id, i, row) for i, row in enumerate(scores)))

    def get_run(self, run_id: int) -> dict:
        """Every column of the run (JSON decoded, ``deployed`` as bool) plus ``dataset_name``,
        ``n_scores`` and ``thresholds`` = ``{"image", "pixel", "review", "preset", "updated", "saved"}``: ``preset``
        and ``updated`` are the last save's, ``saved`` = ``{"image": {"preset", "time", "note"} | None, "pixel":
        ...}`` each level's own last save."""
        run_id = _as_id(run_id, "run_id")
        with self._read() as conn:
            row = conn.execute(_RUN_SELECT + " WHERE r.id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run with id {run_id}")
        return self._run_dict(row)

    def list_runs(self, dataset_id: int | None = None) -> list[dict]:
        """Runs as :meth:`get_run` dicts, newest first, of one dataset or of all."""
        with self._read() as conn:
            if dataset_id is None:
                rows = conn.execute(_RUN_SELECT + " ORDER BY r.id DESC").fetchall()
            else:
                rows = conn.execute(_RUN_SELECT + " WHERE r.dataset_id = ? ORDER BY r.id DESC",
                                    (_as_id(dataset_id, "dataset_id"),)).fetchall()
        return [self._run_dict(r) for r in rows]

    def run_scores(self, run_id: int) -> pd.DataFrame:
        """Per-image scores in insertion order: columns path, split, label, defect, score.

        ``label`` has pandas' nullable ``Int64`` dtype (missing labels are ``<NA>``); ``score`` is
        float64. Raises KeyError for an unknown run (an empty frame means a run without scores).
        """
        run_id = _as_id(run_id, "run_id")
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise KeyError(f"no run with id {run_id}")
            rows = conn.execute("SELECT path, split, label, defect, score FROM scores "
                                "WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        df = pd.DataFrame([tuple(r) for r in rows], columns=SCORE_COLUMNS)
        df["label"] = df["label"].astype("Int64")
        df["score"] = df["score"].astype("float64")
        return df

    def set_threshold(self, run_id: int, image: float | None = None, pixel: float | None = None,
                      preset: str | None = None, review: float | None = None, remove_review: bool = False,
                      note: str = "") -> None:
        """Update only the thresholds given (None = leave as is) and record the preset and when.

        ``preset`` names how they were chosen (``"f1_max"``, ``"fpr<=0.01"``, ...); if thresholds
        change without one, ``"manual"`` is recorded. Values must be finite numbers. ``review`` is the
        lower end of a review band below the image threshold (scores from it up to the image threshold are
        "review", not OK); it must stay below the image threshold; ``remove_review`` drops the band.

        Each level the call touches (the review band belongs to the image level; a call with only a preset
        touches the image level) gains a row in the run's :meth:`threshold_history`, with ``note``.
        """
        run_id = _as_id(run_id, "run_id")
        t_image, t_pixel = _threshold(image, "image"), _threshold(pixel, "pixel")
        t_review = _threshold(review, "review")
        if t_image is None and t_pixel is None and t_review is None and preset is None and not remove_review:
            raise ValueError("set_threshold needs at least one of image, pixel, review or preset")
        sets, args = [], []
        for column, value in (("threshold_image", t_image), ("threshold_pixel", t_pixel),
                              ("threshold_review", t_review)):
            if value is not None:
                sets.append(f"{column} = ?"), args.append(value)
        if remove_review:
            sets.append("threshold_review = NULL")
        preset, now = preset if preset is not None else "manual", _now()
        sets += ["threshold_preset = ?", "threshold_updated = ?"]
        args += [preset, now]
        touched = [level for level, value in (("image", t_image), ("pixel", t_pixel)) if value is not None]
        if "image" not in touched and (t_review is not None or remove_review or not touched):
            touched.insert(0, "image")
        with self._write() as conn:
            cur = conn.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*args, run_id))
            if cur.rowcount == 0:
                raise KeyError(f"no run with id {run_id}")
            row = conn.execute("SELECT threshold_image, threshold_review FROM runs WHERE id = ?", (run_id,)).fetchone()
            _review(row["threshold_review"], row["threshold_image"])   # raising rolls the update back
            self._record_thresholds(conn, run_id, touched, preset, str(note or ""), now)

    @staticmethod
    def _record_thresholds(conn: sqlite3.Connection, run_id: int, levels: list[str], preset: str, note: str,
                           time: str) -> None:
        """Append the run's current value of each level to its history (a level without a value is skipped)."""
        row = conn.execute("SELECT threshold_image, threshold_pixel, threshold_review FROM runs WHERE id = ?",
                           (run_id,)).fetchone()
        for level in levels:
            if row[f"threshold_{level}"] is not None:
                conn.execute("INSERT INTO threshold_history (run_id, level, value, review, preset, note, time) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (run_id, level, row[f"threshold_{level}"],
                              row["threshold_review"] if level == "image" else None, preset, note, time))

    def threshold_history(self, run_id: int, level: str | None = None) -> list[dict]:
        """The thresholds saved for the run, newest first: dicts of id, run_id, level, value, review (image
        level only), preset, note, time; of one level or both."""
        run_id = _as_id(run_id, "run_id")
        if level is not None and level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise KeyError(f"no run with id {run_id}")
            rows = conn.execute("SELECT * FROM threshold_history WHERE run_id = ? AND level = coalesce(?, level) "
                                "ORDER BY id DESC", (run_id, level)).fetchall()
        return [dict(r) for r in rows]

    def revert_threshold(self, run_id: int, history_id: int, note: str | None = None) -> None:
        """Set the run's threshold of that history row's level back to the row's value (and, for the image
        level, its review band) and preset. The revert is itself recorded, as a new row."""
        run_id, history_id = _as_id(run_id, "run_id"), _as_id(history_id, "history_id")
        with self._read() as conn:
            row = conn.execute("SELECT * FROM threshold_history WHERE id = ? AND run_id = ?",
                               (history_id, run_id)).fetchone()
        if row is None:
            raise KeyError(f"run {run_id} has no saved threshold #{history_id}")
        review = {} if row["level"] == "pixel" else (
            {"remove_review": True} if row["review"] is None else {"review": row["review"]})
        self.set_threshold(run_id, **{row["level"]: row["value"]}, preset=row["preset"], **review,
                           note=note if note is not None else
                           f"reverted to the threshold saved {row['time'][:16].replace('T', ' ')} UTC")

    def set_rules(self, run_id: int, rules) -> None:
        """Save the run's defect rules (a :class:`core.rules.DefectRules`; None removes them)."""
        from core.rules import DefectRules
        run_id = _as_id(run_id, "run_id")
        if rules is not None and not isinstance(rules, DefectRules):
            raise TypeError(f"rules must be a core.rules.DefectRules or None, got {type(rules).__name__}")
        settings, roi = ({}, None) if rules is None or rules.empty else (rules.settings(), rules.roi_png())
        with self._write() as conn:
            cur = conn.execute("UPDATE runs SET rules = ?, roi = ? WHERE id = ?", (to_json(settings), roi, run_id))
            if cur.rowcount == 0:
                raise KeyError(f"no run with id {run_id}")

    def update_metrics(self, run_id: int, metrics: dict) -> None:
        """Merge ``metrics`` into the stored metrics (top-level keys; new values win)."""
        run_id = _as_id(run_id, "run_id")
        new = _jsonable(dict(metrics))
        with self._write() as conn:
            row = conn.execute("SELECT metrics FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"no run with id {run_id}")
            merged = {**_from_json(row["metrics"]), **new}
            conn.execute("UPDATE runs SET metrics = ? WHERE id = ?", (to_json(merged), run_id))

    def set_deployed(self, dataset_id: int, run_id: int | None) -> None:
        """Mark ``run_id`` as the dataset's deployed run and unmark the others, in one transaction.

        ``run_id=None`` unmarks all. The run must belong to the dataset (else ValueError).
        """
        dataset_id = _as_id(dataset_id, "dataset_id")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone() is None:
                raise KeyError(f"no dataset with id {dataset_id}")
            if run_id is not None:
                run_id = _as_id(run_id, "run_id")
                row = conn.execute("SELECT dataset_id FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None:
                    raise KeyError(f"no run with id {run_id}")
                if row["dataset_id"] != dataset_id:
                    raise ValueError(f"run {run_id} belongs to dataset {row['dataset_id']}, "
                                     f"not {dataset_id}")
            conn.execute("UPDATE runs SET deployed = 0 WHERE dataset_id = ? AND deployed = 1",
                         (dataset_id,))
            if run_id is not None:
                conn.execute("UPDATE runs SET deployed = 1 WHERE id = ?", (run_id,))

    def deployed_run(self, dataset_id: int) -> dict | None:
        """The dataset's deployed run (as :meth:`get_run`), or None."""
        with self._read() as conn:
            row = conn.execute(_RUN_SELECT + " WHERE r.dataset_id = ? AND r.deployed = 1",
                               (_as_id(dataset_id, "dataset_id"),)).fetchone()
        return None if row is None else self._run_dict(row)

    def rename_run(self, run_id: int, name: str | None) -> None:
        """Set the run's name (None or blank: unnamed, shown by its detector); names need not be unique."""
        run_id = _as_id(run_id, "run_id")
        name = (name or "").strip() or None
        with self._write() as conn:
            cur = conn.execute("UPDATE runs SET name = ? WHERE id = ?", (name, run_id))
            if cur.rowcount == 0:
                raise KeyError(f"no run with id {run_id}")

    def delete_run(self, run_id: int) -> str:
        """Delete the run and its scores; return its ``model_path`` (the files are the caller's)."""
        run_id = _as_id(run_id, "run_id")
        with self._write() as conn:
            row = conn.execute("SELECT model_path FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"no run with id {run_id}")
            conn.execute("DELETE FROM scores WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        return row["model_path"]

    # -- inspections (the inspection service's results) -------------------------------------
    def add_inspection(self, *, run_id: int, variant: str, score: float, verdict: str, reason: str = "",
                       seconds: float | None = None, source: str | None = None, time: str | None = None) -> int:
        """Record one inspected image and return its id. ``verdict`` is "OK", "review", "NG" or "" (a run
        without a threshold); a non-finite score is stored as NULL (read back as NaN). ``time`` defaults to
        now (ISO-8601 UTC). One short transaction, so concurrent requests each keep their row."""
        run_id = _as_id(run_id, "run_id")
        if not isinstance(variant, str) or not variant:
            raise ValueError(f"variant must be a non-empty string, got {variant!r}")
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise ValueError(f"score must be a number, got {score!r}") from None
        seconds = None if seconds is None else float(seconds)
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO inspections (run_id, variant, time, source, score, verdict, reason, seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, variant, time or _now(), None if source is None else str(source),
                 score if math.isfinite(score) else None, verdict, str(reason or ""), seconds))
            return int(cur.lastrowid)

    def list_inspections(self, run_id: int | None = None, variant: str | None = None,
                         limit: int | None = 100) -> list[dict]:
        """Inspections, newest first, of one run and/or variant or of all; at most ``limit`` (None: all).
        Each a dict of the table's columns: id, run_id, variant, time, source, score, verdict, reason, seconds."""
        where, args = [], []
        if run_id is not None:
            where.append("run_id = ?"), args.append(_as_id(run_id, "run_id"))
        if variant is not None:
            where.append("variant = ?"), args.append(str(variant))
        sql = "SELECT * FROM inspections" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise ValueError(f"limit must be an integer >= 0 or None, got {limit!r}")
            sql += " LIMIT ?"
            args.append(limit)
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        out = [dict(r) for r in rows]
        for r in out:
            r["score"] = math.nan if r["score"] is None else r["score"]
        return out

    def count_inspections(self, run_id: int | None = None) -> int:
        """How many inspections are recorded (of one run, or of all)."""
        with self._read() as conn:
            if run_id is None:
                return int(conn.execute("SELECT COUNT(*) FROM inspections").fetchone()[0])
            return int(conn.execute("SELECT COUNT(*) FROM inspections WHERE run_id = ?",
                                    (_as_id(run_id, "run_id"),)).fetchone()[0])
