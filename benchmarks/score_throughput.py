"""Throughput of `score`: one process against Ray with N workers, on the same images and model.

    .venv/bin/python benchmarks/score_throughput.py --fit ../shared/datasets/bottle --model /tmp/bottle_model \
        ../shared/datasets/bottle/test

Scores the images (with their heatmap PNGs, as `score --out` does) three ways, one after the other: the local
engine as `predict` runs it (one process, torch's own thread count), the local engine at one thread (what each
Ray worker runs), and Ray Data with --workers workers of one CPU each on a local Ray this script starts. Ray's
start-up (ray.init) is timed apart; "scoring" for Ray includes the workers' start (a Python process each, torch
imported, the model loaded), which a long job pays once. It checks the CSVs against each other on the way.
Not a test: timings depend on the machine and its load, so it prints `uptime`'s load average before and after.
`--fit` trains and saves a PatchCore model first when --model does not exist yet (nothing is registered).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.app.viz import heatmap_png  # noqa: E402
from core.cli import _image_paths  # noqa: E402
from core.line.batch import RayStats, score_images  # noqa: E402
from core.line.inspector import Inspector  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fit(data: str, model: Path, settings: list[str]) -> None:
    from core.data import load_dataset
    from core.detectors import create_detector
    from core.params import parse_overrides
    start = time.perf_counter()
    train = load_dataset(data).subset(split="train", label=0)
    create_detector("patchcore", **parse_overrides(settings)).fit(train).save(model)
    print(f"fitted PatchCore on {len(train)} images of {data} in {time.perf_counter() - start:.1f} s -> {model}",
          file=sys.stderr)


def run(name: str, inspector: Inspector, model: Path, paths: list[Path], out: Path | None, **engine) -> dict:
    stream, stats, first = io.StringIO(), RayStats(), []
    start = time.perf_counter()

    def progress(stage, done, total):
        if done == 1:
            first.append(time.perf_counter() - start)
    writer = score_images(inspector, paths, stream, model=model, out=out, render=heatmap_png, progress=progress,
                          log=lambda m: print(m, file=sys.stderr), stats=stats, **engine)
    total = time.perf_counter() - start
    scoring = total - stats.startup_s
    n = writer.written
    result = {"config": name, "images": n, "skipped": writer.skipped, "startup_s": round(stats.startup_s, 2),
              "first_result_s": round(first[0] - stats.startup_s, 2) if first else None,
              "scoring_s": round(scoring, 2), "images_per_s": round(n / scoring, 2),
              "end_to_end_images_per_s": round(n / total, 2),
              # once every worker is up: the rate a long job runs at (the first result marks the first worker ready)
              "after_first_result_images_per_s": round((n - 1) / (scoring - (first[0] - stats.startup_s)), 2)
              if first and n > 1 else None,
              "load_after": load(),
              "rows": list(csv.DictReader(io.StringIO(stream.getvalue())))}
    print(f"{name}: {n} images in {scoring:.1f} s = {result['images_per_s']:.2f} images/s "
          f"(start-up {stats.startup_s:.1f} s, first result after {result['first_result_s']} s; end to end "
          f"{result['end_to_end_images_per_s']:.2f} images/s), load {result['load_after']}", file=sys.stderr)
    return result


def compare(a: dict, b: dict) -> str:
    diffs = [abs(float(x["score"]) - float(y["score"])) / max(abs(float(x["score"])), 1e-12)
             for x, y in zip(a["rows"], b["rows"])]
    same = sum(x["score"] == y["score"] for x, y in zip(a["rows"], b["rows"]))
    verdicts = sum(x["verdict"] != y["verdict"] for x, y in zip(a["rows"], b["rows"]))
    return (f"{b['config']} against {a['config']}: {same} of {len(diffs)} printed scores equal, largest relative "
            f"difference {max(diffs):.2g}, {verdicts} verdicts differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--model", required=True, help="saved model folder (written by --fit when absent)")
    parser.add_argument("--fit", metavar="DATA", help="fit PatchCore on DATA's good training images first")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="detector parameters for --fit")
    parser.add_argument("--threshold", type=float, help="image threshold (default: the model's 5%% false rejects, "
                                                        "else none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="score the list this many times (a longer job)")
    parser.add_argument("--no-heatmaps", action="store_true")
    parser.add_argument("--configs", nargs="+", choices=["local", "local1", "ray"], default=["local", "local1", "ray"],
                        help="which to run: local (torch's threads), local1 (1 thread), ray (shorter in a quiet "
                             "window)")
    parser.add_argument("--json", default="bench_results/score_throughput.json")
    args = parser.parse_args()

    model = Path(args.model)
    if not model.exists():
        if not args.fit:
            raise SystemExit(f"{model} does not exist: give --fit DATA to train it")
        fit(args.fit, model, args.set)
    from core.detectors import load_detector
    start = time.perf_counter()
    detector = load_detector(model)
    load_s = time.perf_counter() - start
    print(f"model loaded in {load_s:.1f} s (the local engines' start-up; each Ray worker loads it too)",
          file=sys.stderr)
    threshold = args.threshold
    if threshold is None and detector.calibration_ is not None:
        from core.thresholds import normal_threshold
        threshold = normal_threshold(detector.calibration_.scores, 0.05).threshold
    inspector = Inspector(detector, threshold)
    paths = _image_paths(args.images) * args.repeat
    print(f"{len(paths)} images, load average before: {load()} ({os.cpu_count()} CPUs)", file=sys.stderr)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"local": ("1 process (local engine, torch's threads)", dict(engine="local")),
                   "local1": ("1 process at 1 thread", dict(engine="local", threads=1)),
                   "ray": (f"Ray, {args.workers} workers x 1 CPU", dict(engine="ray", workers=args.workers))}
        for name, engine in [configs[c] for c in args.configs]:
            out = None if args.no_heatmaps else Path(tmp) / f"heat{len(results)}"
            if out:
                out.mkdir()
            results.append(run(name, inspector, model, paths, out, **engine))
    for i, first in enumerate(results):
        for other in results[i + 1:]:
            print(compare(first, other), file=sys.stderr)

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k != "rows"} for r in results]
    Path(args.json).write_text(json.dumps({"images": [str(p) for p in args.images], "repeat": args.repeat,
                                           "heatmaps": not args.no_heatmaps, "model": str(model),
                                           "model_load_s": round(load_s, 2),
                                           "results": summary}, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    print("| config | images | Ray start-up s | first result s | scoring s | images/s | after first result "
          "images/s | end-to-end images/s | load after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['config']} | {r['images']} | {r['startup_s']:.1f} | {r['first_result_s']} | {r['scoring_s']:.1f} | "
              f"{r['images_per_s']:.2f} | {r['after_first_result_images_per_s']} | {r['end_to_end_images_per_s']:.2f} "
              f"| {r['load_after']} |")


if __name__ == "__main__":
    main()
