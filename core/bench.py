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
from pathlib import Path

import numpy as np
import torch

from .data import load_mvtec
from .detectors import create_detector, load_detector
from .pipeline import evaluate


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _per_image_ms(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up: first calls pay for allocation and lazy initialisation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best / n_images


def run_bench(data: str | Path, detector: str = "patchcore", params: dict | None = None,
              batch_size: int = 8, timing_images: int = 32, repeats: int = 3, log=print) -> dict:
    dataset = load_mvtec(data)
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

    def predict_decoded():
        reloaded.predict(decoded, batch_size=batch_size)

    def end_to_end():
        reloaded.predict([subset[i] for i in range(n)], batch_size=batch_size)

    timings = {
        "backbone_ms": _per_image_ms(backbone, n, repeats) if extractor is not None else None,
        "predict_ms": _per_image_ms(predict_decoded, n, repeats),
        "end_to_end_ms": _per_image_ms(end_to_end, n, repeats),
    }
    result = {
        "dataset": dataset.name, "data": str(data), "detector": detector, "params": det.get_params(),
        "n_train": len(train), "n_test": len(test), "batch_size": batch_size, "timing_images": n,
        "torch_threads": torch.get_num_threads(),
        **{k: evaluation.metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold")},
        "fit_seconds": fit_seconds, **timings,
        "predict_over_backbone": (timings["predict_ms"] / timings["backbone_ms"]) if timings["backbone_ms"] else None,
        "peak_rss_mb": _peak_rss_mb(), "model_mb": model_bytes / 2**20,
    }
    return result


COLUMNS = [("dataset", "{}"), ("detector", "{}"), ("image_auroc", "{:.4f}"), ("pixel_auroc", "{:.4f}"),
           ("aupro", "{:.4f}"), ("f1_max", "{:.4f}"), ("fit_seconds", "{:.1f}"), ("backbone_ms", "{:.1f}"),
           ("predict_ms", "{:.1f}"), ("predict_over_backbone", "{:.2f}"), ("end_to_end_ms", "{:.1f}"),
           ("peak_rss_mb", "{:.0f}"), ("model_mb", "{:.2f}")]


def format_table(results: list[dict]) -> str:
    rows = [[name for name, _ in COLUMNS]]
    for r in results:
        rows.append(["-" if r.get(k) is None else fmt.format(r[k]) for k, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def write_json(results: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
