"""Benchmark a detector on an MVTec-layout category: accuracy, speed, memory and size, measured in one run.

Latency is reported three ways, per image, at the same batch size:
- backbone_ms: the frozen backbone's own forward pass on preprocessed tensors (the floor);
- predict_ms: decoded images -> scores and maps at input resolution (what `Detector.predict` does);
- end_to_end_ms: image files -> decoded -> scores and maps (what a user waits for).
"""
from __future__ import annotations

import json
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .data import image_batches, load_mvtec
from .detectors import create_detector, load_detector
from .files import json_default, replacing
from .pipeline import evaluate
from .thresholds import is_anomalous, normal_threshold, synthetic_miss_rate


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# A timed call longer than this is its own warm-up and is not repeated: lazy initialisation is noise against it.
SLOW_CALL_S = 30.0


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_alternately(timers: list[dict], n_images: list[int], repeats: int) -> list[dict]:
    """Best-of-`repeats` ms per image for each named call, the detectors taking turns round by round.

    This VM's speed drifts by up to 1.6x over minutes; timing one detector after the other folded that drift into
    the comparison between them, taking turns spreads it over all of them.
    """
    best = [{name: _seconds(fn) for name, fn in calls.items()} for calls in timers]  # warm-up: first calls allocate
    slow = [{name for name, s in row.items() if s > SLOW_CALL_S} for row in best]
    best = [{name: (s if name in slow[i] else float("inf")) for name, s in row.items()} for i, row in enumerate(best)]
    for _ in range(repeats):
        for i, calls in enumerate(timers):
            for name, fn in calls.items():
                if name not in slow[i]:
                    best[i][name] = min(best[i][name], _seconds(fn))
    return [{name: 1000 * s / n for name, s in row.items()} for row, n in zip(best, n_images)]


def _fit_and_evaluate(dataset, detector: str, params: dict | None, batch_size: int, timing_images: int, log):
    """A detector's measured row without timings, and the calls to time for it."""
    train = dataset.subset(split="train", label=0)
    test = dataset.subset(split="test")
    det = create_detector(detector, **(params or {}))
    log(f"[bench] {dataset.name}: {len(train)} train, {len(test)} test; {det!r}")

    def progress(stage, done, total):
        if done == total:
            log(f"[bench]   {stage}: {total} done")

    # Decode once before timing fit: the fit budget is about learning, file I/O is timed separately.
    train_images = [train[i] for i in range(len(train))]
    start = time.perf_counter()
    det.fit(train_images, progress)
    fit_seconds = time.perf_counter() - start
    auto = det.fit_info_.get("auto_settings", {})
    if auto:
        log(f"[bench]   auto settings ({auto.get('seconds', 0):.0f} s of the fit): {auto['why']}")
    evaluation = evaluate(det, test, progress)

    with tempfile.TemporaryDirectory() as tmp:
        det.save(Path(tmp) / "model")
        model_bytes = _folder_bytes(Path(tmp) / "model")
        reloaded = load_detector(Path(tmp) / "model")
    n = min(timing_images, len(test))
    subset = test[:n]
    decoded = [subset[i] for i in range(n)]
    tensor = det.preprocess.images_to_tensor(decoded[:batch_size])
    extractor = det.feature_extractor()

    def backbone():
        for _ in range(0, n, batch_size):
            extractor(tensor)

    timers = {
        "predict_ms": lambda: reloaded.predict(decoded, batch_size=batch_size),
        "end_to_end_ms": lambda: reloaded.predict([subset[i] for i in range(n)], batch_size=batch_size),
    }
    if extractor is not None:
        timers["backbone_ms"] = backbone
    row = {
        "dataset": dataset.name, "detector": detector, "params": det.get_params(),
        "n_train": len(train), "n_test": len(test), "batch_size": batch_size, "timing_images": n,
        "torch_threads": torch.get_num_threads(),
        **{k: evaluation.metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold")},
        "fit_seconds": fit_seconds,
        "input_frame": "x".join(map(str, det.fit_info_["input_frame_hw"])), "bank_size": _bank_size(det),
        "model_mb": model_bytes / 2**20, **_search_quality(reloaded, tensor),
        "search": det.model_card().get("memory_bank", {}).get("search"),
        "auto_settings": {k: v for k, v in auto.items() if k != "candidates"},
        "normal_thresholds": normal_threshold_check(det, evaluation, log),
    }
    return row, timers


def run_bench(data: str | Path, detectors: Sequence[str] = ("patchcore",), params: dict | None = None,
              batch_size: int = 8, timing_images: int = 32, repeats: int = 3, log=print) -> list[dict]:
    """One row per detector on one data set: accuracy, fit time, and per-image times taken in turns."""
    dataset = load_mvtec(data)
    rows, timers = [], []
    for detector in detectors:
        row, calls = _fit_and_evaluate(dataset, detector, params, batch_size, timing_images, log)
        rows.append({**row, "data": str(data)})
        timers.append(calls)
    timings = _time_alternately(timers, [row["timing_images"] for row in rows], repeats)
    for row, timing in zip(rows, timings):
        backbone = timing.pop("backbone_ms", None)
        row.update(backbone_ms=backbone, **timing,
                   predict_over_backbone=timing["predict_ms"] / backbone if backbone else None,
                   # Fit against the backbone's forward pass over as many images: the floor of any fit.
                   fit_over_backbone=1000 * row["fit_seconds"] / (backbone * row["n_train"]) if backbone else None,
                   peak_rss_mb=_peak_rss_mb())
    return rows


# False-reject rates checked against the test set's good images (the 0.5% among them).
CHECKED_RATES = (0.05, 0.01, 0.005)


def normal_threshold_check(det, evaluation, log=print) -> list[dict]:
    """Thresholds set from the calibration images alone, applied to the test set's good images: how many
    each rejected against the stated 95% interval of that count, and the share of test defects it missed."""
    cal = getattr(det, "calibration_", None)
    if cal is None:
        return []
    good = evaluation.scores[evaluation.labels == 0]
    defective = evaluation.scores[evaluation.labels == 1]
    rows = []
    for rate in CHECKED_RATES:
        try:
            t = normal_threshold(cal.scores, rate)
        except ValueError as exc:
            log(f"[bench]   {rate:.1%} false-reject rate: {exc}")
            continue
        low, high = t.false_rejects_interval(len(good))
        rejected = int(is_anomalous(good, t.threshold).sum())
        row = {"target_rate": rate, "method": t.method, "threshold": t.threshold, "n_calibration": t.n_images,
               "expected_rate": t.expected_rate, "upper_rate": t.upper_rate, "test_good": len(good),
               "rejected": rejected, "interval": [low, high], "inside": bool(low <= rejected <= high),
               "missed_defects": float(np.mean(~is_anomalous(defective, t.threshold))) if len(defective) else None,
               "synthetic_missed": synthetic_miss_rate(cal.synthetic_scores, t.threshold)}
        log(f"[bench]   {rate:.1%} from {t.n_images} good images ({t.method}): {rejected} of {len(good)} test good "
            f"rejected (stated 95% interval {low}..{high}: {'inside' if row['inside'] else 'OUTSIDE'}); missed "
            f"{row['missed_defects'] if row['missed_defects'] is None else format(row['missed_defects'], '.1%')} "
            f"of test defects, {row['synthetic_missed']:.1%} of synthetic ones")
        rows.append(row)
    return rows


AUDIT_COLUMNS = [("dataset", "{}"), ("planted", "{}"), ("planted_in_top_15", "{}"), ("flagged", "{}"),
                 ("planted_flagged", "{}"), ("clean_auroc", "{:.4f}"), ("dirty_auroc", "{:.4f}"),
                 ("tolerant_auroc", "{:.4f}"), ("audit_seconds", "{:.1f}")]


def run_audit_bench(data: str | Path, detector: str = "patchcore", params: dict | None = None, log=print) -> dict:
    """A set with defects planted among its good training images (benchmarks/plant_defects.py names them
    "planted_*"): image AUROC on its test set of a model fitted without them (clean), with them (dirty) and
    by the tolerant fit, and where the audit ranks them."""
    from .audit import fit_tolerant
    dataset = load_mvtec(data)
    train = dataset.subset(split="train", label=0)
    test = dataset.subset(split="test")
    planted = np.array([s.path.name.startswith("planted_") for s in train.samples])
    if not planted.any():
        raise ValueError(f"{data} has no planted_* training images: build it with benchmarks/plant_defects.py")
    images = [train[i] for i in range(len(train))]
    log(f"[bench] {dataset.name}: {len(train)} train ({planted.sum()} planted defects), {len(test)} test")

    def auroc(det) -> float:
        return float(evaluate(det, test).metrics["image_auroc"])
    clean = create_detector(detector, **(params or {})).fit([im for im, p in zip(images, planted) if not p])
    dirty = create_detector(detector, **(params or {})).fit(images)
    start = time.perf_counter()
    tolerant, found = fit_tolerant(create_detector(detector, **(params or {})), images)
    seconds = time.perf_counter() - start
    top = found.ranking[:15]
    result = {"dataset": dataset.name, "planted": int(planted.sum()), "planted_in_top_15": int(planted[top].sum()),
              "flagged": int(len(found.suspicious)), "planted_flagged": int(planted[found.suspicious].sum()),
              "clean_auroc": auroc(clean), "dirty_auroc": auroc(dirty), "tolerant_auroc": auroc(tolerant),
              "audit_seconds": seconds, "fence": found.fence,
              "top_15": [[train.samples[i].path.name, float(found.scores[i])] for i in top]}
    for name, score in result["top_15"]:
        log(f"[bench]   {score:10.4g}  {name}")
    return result


def run_few_shot(data: str | Path, detector: str, shots: Sequence[int] = (2, 4, 8), seeds: int = 3,
                 params: dict | None = None, log=print) -> list[dict]:
    """A detector fitted on only `shots` good training images, drawn at random (`seeds` draws, the same draws
    for every detector), scored on the whole test set: one row per shot count with the mean over the draws."""
    dataset = load_mvtec(data)
    train = dataset.subset(split="train", label=0)
    test = dataset.subset(split="test")
    rows = []
    for k in shots:
        runs = []
        for seed in range(seeds):
            pick = np.random.default_rng(seed).choice(len(train), k, replace=False)
            det = create_detector(detector, **{"calibration_fraction": 0.0, **(params or {})})
            start = time.perf_counter()
            det.fit([train[int(i)] for i in pick])
            fit_seconds = time.perf_counter() - start
            metrics = evaluate(det, test).metrics
            runs.append({**{m: metrics.get(m) for m in ("image_auroc", "pixel_auroc", "aupro")},
                         "fit_seconds": fit_seconds})
            log(f"[few-shot] {dataset.name} {detector} {k} shots, draw {seed}: {runs[-1]}")
        mean = {m: float(np.mean([r[m] for r in runs if r[m] is not None])) if any(r[m] is not None for r in runs)
                else None for m in runs[0]}
        rows.append({"dataset": dataset.name, "detector": detector, "shots": k, "draws": seeds,
                     "params": det.get_params(), **mean,
                     "image_auroc_per_draw": [r["image_auroc"] for r in runs]})
    return rows


FEW_SHOT_COLUMNS = [("dataset", "{}"), ("detector", "{}"), ("shots", "{}"), ("image_auroc", "{:.4f}"),
                    ("pixel_auroc", "{:.4f}"), ("aupro", "{:.4f}"), ("fit_seconds", "{:.1f}")]


def _search_quality(det, x: torch.Tensor) -> dict:
    """For an approximate nearest-neighbour index: recall@1 against exact search on test patches, and the
    relative error of the patch scores (an approximate neighbour is never closer than the true one)."""
    index = getattr(det, "_index", None)
    if index is None or not hasattr(index, "nprobe"):
        return {}
    import faiss
    emb = det.embed(x)
    queries = np.ascontiguousarray(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).numpy())
    exact = faiss.IndexFlatL2(queries.shape[1])
    exact.add(det.memory_bank_.numpy().astype(np.float32))
    d_true, i_true = exact.search(queries, 1)
    d_ann, i_ann = index.search(queries, 1)
    return {"search_recall_at_1": float((i_true[:, 0] == i_ann[:, 0]).mean()),
            "search_score_error": float(np.mean(np.sqrt(np.maximum(d_ann[:, 0], 0))
                                                / np.maximum(np.sqrt(np.maximum(d_true[:, 0], 0)), 1e-12) - 1))}


def _bank_size(det) -> int | None:
    bank = getattr(det, "memory_bank_", None)
    return None if bank is None else int(bank.shape[0])


class AugmentedCopies(Sequence):
    """`n` distinct normal images made from a few: the 8 flips and quarter turns of each, then circular
    shifts by a few pixels. Items are made on demand, so only the originals are held in memory."""

    def __init__(self, originals: list[np.ndarray], n: int):
        self.originals, self.n = originals, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(i)
        copy, k = divmod(i, len(self.originals))
        image = self.originals[k]
        turn, shift = copy % 8, copy // 8
        image = np.rot90(image[:, ::-1] if turn >= 4 else image, turn % 4)
        if shift:
            image = np.roll(image, (3 * shift, -2 * shift), axis=(0, 1))
        return np.ascontiguousarray(image)


def run_scale(data: str | Path, n_images: int, detector: str = "patchcore", params: dict | None = None,
              batch_size: int = 8, log=print) -> dict:
    """Fit on `n_images` augmented copies of a category's normal training images: time and peak memory.

    The originals are decoded once and shrunk to the model's frame before fitting (what the backbone
    sees anyway), so the peak memory is the fit's own plus that small set; the backbone's share of the
    fit is its forward time per image, measured in the same run, times `n_images`.
    """
    train = load_mvtec(data).subset(split="train", label=0)
    det = create_detector(detector, **(params or {}))
    det.fit(train[:2])      # resolves the frame from real images; the fit below starts afresh
    frame = det.frame()
    pre = det.preprocess
    originals = [pre.image_to_frame(train[i]) for i in range(len(train))]
    rss_before = _peak_rss_mb()
    log(f"[scale] {n_images} images from {len(originals)} originals at {frame[0]}x{frame[1]}; "
        f"peak RSS before fit {rss_before:.0f} MB")
    images = AugmentedCopies(originals, n_images)
    tensor = pre.images_to_tensor(originals[:batch_size])
    extractor = det.feature_extractor()
    backbone_ms = _time_alternately([{"backbone": lambda: extractor(tensor)}], [len(tensor)], 3)[0]["backbone"]
    last = {}

    def progress(stage, done, total):
        if last.get(stage, -1) != 10 * done // total:
            last[stage] = 10 * done // total
            log(f"[scale]   {stage}: {done}/{total}")

    start = time.perf_counter()
    det.fit(images, progress)
    fit_seconds = time.perf_counter() - start
    return {"dataset": Path(data).name, "detector": detector, "n_images": n_images,
            "input_frame": "x".join(map(str, frame)), "fit_seconds": fit_seconds, "backbone_ms": backbone_ms,
            "fit_over_backbone": 1000 * fit_seconds / (backbone_ms * n_images), "peak_rss_mb": _peak_rss_mb(),
            "bank_size": _bank_size(det), "params": det.get_params()}


COLUMNS = [("dataset", "{}"), ("detector", "{}"), ("image_auroc", "{:.4f}"), ("pixel_auroc", "{:.4f}"),
           ("aupro", "{:.4f}"), ("f1_max", "{:.4f}"), ("input_frame", "{}"), ("fit_seconds", "{:.1f}"),
           ("fit_over_backbone", "{:.2f}"), ("backbone_ms", "{:.1f}"), ("predict_ms", "{:.1f}"),
           ("predict_over_backbone", "{:.2f}"), ("end_to_end_ms", "{:.1f}"), ("peak_rss_mb", "{:.0f}"),
           ("model_mb", "{:.2f}"), ("search_recall_at_1", "{:.4f}")]


def run_coverage(data: str | Path, params: dict | None = None, log=print) -> dict:
    """PatchCore's streamed coreset against one greedy pass over all training patches, at the same bank
    size: selection time and the coverage radius each reaches (the largest distance from any training
    patch to its nearest bank patch, in the projected space both select in, computed exactly)."""
    import faiss
    from .detectors.coreset import StreamingCoreset, greedy_coreset, project
    train = load_mvtec(data).subset(split="train", label=0)
    det = create_detector("patchcore", **(params or {}))
    det.fit(train)
    log(f"[coverage] {len(train)} images at {det.frame()}: {det.n_train_patches_} patches, bank {len(det.memory_bank_)}")
    rows = []
    for _, batch in image_batches(train, 16):
        emb = det.embed(det.preprocess.images_to_tensor(batch))
        rows.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
    rows = torch.cat(rows)
    z = project(rows, det.projection_dim, det.seed)

    def radius(bank: torch.Tensor) -> float:
        index = faiss.IndexFlatL2(z.shape[1])
        index.add(project(bank, det.projection_dim, det.seed))
        return float(np.sqrt(max(index.search(z, 1)[0].max(), 0)))

    k = len(det.memory_bank_)
    start = time.perf_counter()
    stream = StreamingCoreset(len(rows), k, det.projection_dim, det.seed)
    for i in range(0, len(rows), 16 * det.grid_[0] * det.grid_[1]):
        stream.add(rows[i:i + 16 * det.grid_[0] * det.grid_[1]])
    streamed = stream.finish()[0]
    streamed_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = rows[torch.from_numpy(greedy_coreset(rows, k, det.projection_dim, det.seed)[0])]
    plain_s = time.perf_counter() - start
    return {"dataset": Path(data).name, "input_frame": "x".join(map(str, det.frame())), "patches": len(rows),
            "bank_size": k, "streamed_radius": radius(streamed), "plain_radius": radius(plain),
            "streamed_seconds": streamed_s, "plain_seconds": plain_s}


COVERAGE_COLUMNS = [("dataset", "{}"), ("input_frame", "{}"), ("patches", "{}"), ("bank_size", "{}"),
                    ("streamed_radius", "{:.3f}"), ("plain_radius", "{:.3f}"), ("streamed_seconds", "{:.1f}"),
                    ("plain_seconds", "{:.1f}")]

SCALE_COLUMNS = [("dataset", "{}"), ("detector", "{}"), ("n_images", "{}"), ("input_frame", "{}"),
                 ("bank_size", "{}"), ("fit_seconds", "{:.1f}"), ("backbone_ms", "{:.1f}"),
                 ("fit_over_backbone", "{:.2f}"), ("peak_rss_mb", "{:.0f}")]


def format_table(results: list[dict], columns: list[tuple[str, str]] | None = None) -> str:
    columns = columns or COLUMNS
    rows = [[name for name, _ in columns]]
    for r in results:
        rows.append(["-" if r.get(k) is None else fmt.format(r[k]) for k, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def write_json(results: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=json_default))
