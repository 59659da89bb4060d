"""Command line: `python -m core train | evaluate | predict | score | export | bench | list | regad-train | serve`.

As thin as the dashboard: it parses arguments and calls the same functions the pages call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path


from . import Cancelled
from .params import parse_overrides


class LogProgress:
    """Progress as log lines on stderr, at most one per stage per 10%."""

    def __init__(self):
        self.last = {}
        self.start = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        decile = (10 * done) // max(total, 1)
        if self.last.get(stage) != decile:
            self.last[stage] = decile
            print(f"[{time.perf_counter() - self.start:7.1f}s] {stage}: {done}/{total}", file=sys.stderr)


def _load_any(path: str):
    from .data import load_dataset
    from .pipeline import dataset_kind
    from .workspace import datasets_dir
    if not str(path).strip():
        raise ValueError("--data is empty: name a dataset folder or a .zip archive")
    p = Path(path)
    if p.suffix.lower() == ".zip":
        # Each load of an archive extracts into its own folder: load_zip refuses a non-empty destination.
        dest = datasets_dir() / f"{p.stem}-{uuid.uuid4().hex[:8]}"
        dataset, kind = load_dataset(p, dest_dir=dest), "zip"
        dataset.report.source = str(dest)   # registered where it was extracted, so that open_dataset finds it
    else:
        dataset = load_dataset(p)
        kind = dataset_kind(dataset)
    if dataset.report.skipped or dataset.report.warnings:
        print(f"load report: {dataset.report.summary()}", file=sys.stderr)
        for name, reason in [*dataset.report.skipped, *dataset.report.warnings][:20]:
            print(f"  {name}: {reason}", file=sys.stderr)
    return dataset, kind


def cmd_list(args) -> int:
    from .detectors import list_detectors
    from .runs import RunStore
    print("detectors:", ", ".join(list_detectors()))
    store = RunStore(args.registry)
    for d in store.list_datasets():
        print(f"dataset {d['id']}: {d['name']} ({d['kind']}) {d['source']}")
    for r in store.list_runs():
        m = r.get("metrics") or {}
        print(f"run {r['id']}: {r['detector']} on {r['dataset_name']}  image_auroc={m.get('image_auroc')}  "
              f"threshold={r['thresholds']['image']}  model={r['model_path']}")
    return 0


def cmd_train(args) -> int:
    from .pipeline import register_dataset, train_run
    from .runs import RunStore
    params = parse_overrides(args.set)      # a malformed --set fails before anything is loaded or registered
    store = RunStore(args.registry)
    dataset, kind = _load_any(args.data)
    dataset_id = register_dataset(store, dataset, kind, args.dataset_name)
    run_id = train_run(store, dataset_id, dataset, args.detector, params, LogProgress(), args.name, audit=args.audit)
    run = store.get_run(run_id)
    print(json.dumps({"run_id": run_id, "model_path": run["model_path"], "metrics": run["metrics"],
                      "thresholds": run["thresholds"], "timings": run["timings"]}, indent=2))
    return 0


def _detector_and_run(args):
    from .detectors import load_detector
    from .runs import RunStore
    if args.run is not None:
        run = RunStore(args.registry).get_run(args.run)
        return load_detector(run["model_path"]), run
    if args.model is None:
        raise SystemExit("give --run ID (from the registry) or --model FOLDER")
    return load_detector(args.model), {"thresholds": {"image": None, "pixel": None, "review": None}}


def cmd_evaluate(args) -> int:
    from .pipeline import evaluate
    detector, _ = _detector_and_run(args)
    dataset, _ = _load_any(args.data)
    result = evaluate(detector, dataset.subset(split="test"), LogProgress())
    print(json.dumps(result.metrics, indent=2))
    return 0


def _image_paths(inputs: list[str]) -> list[Path]:
    from .data import IMAGE_SUFFIXES
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)
    return paths


def _rules(args, run: dict):
    """The run's defect rules, with what the command line gives instead."""
    from .data import read_mask
    from .rules import DefectRules
    saved = DefectRules.of_run(run)
    roi = saved.roi if args.roi is None else read_mask(args.roi)
    min_area = saved.min_area if args.min_area is None else args.min_area
    return DefectRules(roi, min_area, saved.mm_per_px if args.mm_per_px is None else args.mm_per_px)


@contextmanager
def _csv_output(path: str | None):
    """stdout, or a file that appears whole when scoring ends (a cancelled job leaves none)."""
    if path is None:
        yield sys.stdout
        return
    from .files import replacing
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        yield f


def cmd_score(args) -> int:
    """`predict` and `score`: one path, `predict` being `score --engine local` writing to stdout."""
    from .app.viz import heatmap_png
    from .data import IMAGE_SUFFIXES
    from .line.batch import RayStats, score_images
    from .line.inspector import Inspector
    detector, run = _detector_and_run(args)
    inspector = Inspector.from_run(detector, run, args.threshold, args.review_threshold, args.pixel_threshold,
                                   _rules(args, run), args.false_reject_rate)
    out = Path(args.out) if args.out else None
    if out:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file: name a folder for the heatmaps")
        out.mkdir(parents=True, exist_ok=True)
    paths = _image_paths(args.images)
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(args.images)}")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    stats, start = RayStats(), time.perf_counter()
    try:
        with _csv_output(args.csv) as stream:
            writer = score_images(inspector, paths, stream, engine=args.engine,
                                   model=args.model if args.run is None else run["model_path"], out=out,
                                   render=heatmap_png, vmax=args.vmax, threads=args.threads, workers=args.workers,
                                   address=args.address, progress=LogProgress() if args.command == "score" else None,
                                   log=log, stats=stats)
    except KeyboardInterrupt:
        raise Cancelled() from None     # Ray, when started here, is already shut down
    if args.command == "score":
        seconds = time.perf_counter() - start - stats.startup_s
        log(f"scored {writer.written} images ({writer.skipped} skipped) in {seconds:.1f} s after "
            f"{stats.startup_s:.1f} s of Ray start-up: {writer.written / max(seconds, 1e-9):.2f} images/s"
            if args.engine == "ray" else
            f"scored {writer.written} images ({writer.skipped} skipped) in {seconds:.1f} s: "
            f"{writer.written / max(seconds, 1e-9):.2f} images/s")
        if args.csv:
            log(f"wrote {args.csv}")
    return 1 if writer.skipped else 0


def cmd_bench(args) -> int:
    from .bench import (AUDIT_COLUMNS, COVERAGE_COLUMNS, FEW_SHOT_COLUMNS, SCALE_COLUMNS, format_table,
                        run_audit_bench, run_bench, run_coverage, run_few_shot, run_scale, write_json)
    results = []
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    for data in args.data:
        if not (args.coverage or args.audit or args.shots or args.scale):
            results.extend(run_bench(data, args.detector, parse_overrides(args.set), batch_size=args.batch_size,
                                     log=log))
            print(format_table(results[-len(args.detector):]), file=sys.stderr)
            continue
        for detector in args.detector:
            if args.coverage:
                results.append(run_coverage(data, parse_overrides(args.set), log=log))
            elif args.audit:
                results.append(run_audit_bench(data, detector, parse_overrides(args.set), log=log))
            elif args.shots:
                results.extend(run_few_shot(data, detector, args.shots, args.draws, parse_overrides(args.set), log=log))
                print(format_table(results[-len(args.shots):], FEW_SHOT_COLUMNS), file=sys.stderr)
            else:
                results.append(run_scale(data, args.scale, detector, parse_overrides(args.set), log=log))
    write_json(results, args.json)   # first: a long run's numbers survive a formatting slip
    print(f"wrote {args.json}", file=sys.stderr)
    columns = (COVERAGE_COLUMNS if args.coverage else FEW_SHOT_COLUMNS if args.shots else SCALE_COLUMNS if args.scale else AUDIT_COLUMNS if args.audit
               else None)
    print(format_table(results, columns))
    return 0


def cmd_regad_train(args) -> int:
    from .data import load_mvtec
    from .detectors.regad import train_registration
    from .workspace import registrations_dir
    categories = {}
    for root in args.data:
        good = load_mvtec(root).subset(split="train", label=0)
        categories[Path(root).name] = [good[i] for i in range(len(good))]
    out = args.out or registrations_dir() / f"trained_on_{'_'.join(sorted(categories))}.safetensors"
    out = train_registration(categories, out, steps=args.steps, size=args.size, seed=args.seed,
                             progress=LogProgress(), log=lambda m: print(m, file=sys.stderr))
    print(f"wrote {out}: use it with --set registration={out}")
    return 0


def cmd_export(args) -> int:
    from .line.export import export
    detector, run = _detector_and_run(args)
    folder = Path(args.model if args.run is None else run["model_path"]) / "export"
    out = Path(args.out) if args.out else folder / f"model.{'onnx' if args.format == 'onnx' else 'xml'}"
    print(f"wrote {export(detector, args.format, out, run if args.run is not None else None)}")
    return 0


def cmd_serve(args) -> int:
    from .line.serve import serve
    return serve(args.registry, args.variant, args.host, args.port, args.hot_folder, not args.no_http,
                 args.poll_seconds, int(args.max_mb * 2**20), int(args.max_megapixels * 1e6), args.concurrency,
                 args.log_level)


def build_parser() -> argparse.ArgumentParser:
    from .detectors import list_detectors
    parser = argparse.ArgumentParser(prog="python -m core", description="AnomalyScope: unsupervised visual inspection")
    parser.add_argument("--registry", help="SQLite run registry (default: $ANOMALYSCOPE_HOME/registry.sqlite)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="detectors, datasets and runs in the registry").set_defaults(func=cmd_list)

    train = sub.add_parser("train", help="fit a detector on a dataset's normal images and register the run")
    train.add_argument("--data", required=True, help="MVTec-layout category, folder of normal images, or .zip")
    train.add_argument("--detector", default="patchcore", choices=list_detectors())
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="detector parameters")
    train.add_argument("--name", help="a name for the run")
    train.add_argument("--dataset-name", help="registry name of the dataset (default: folder name)")
    train.add_argument("--audit", choices=["off", "flag", "drop"], default="off",
                       help="audit the good training images (five more fits, patchcore and padim): 'flag' registers "
                            "each one's score from models fitted without it and marks the suspicious ones; 'drop' "
                            "also leaves those out of the final fit")
    train.set_defaults(func=cmd_train)

    for name, helptext in [("evaluate", "metrics of a saved model on a labelled test split"),
                           ("predict", "score images: CSV of path, score, verdict and its reason; heatmap PNGs with --out"),
                           ("score", "predict's CSV and heatmaps for many images, in this process or across Ray workers "
                                     "(a local Ray, or a cluster with --address)")]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--run", type=int, help="run id in the registry (uses its model and threshold)")
        p.add_argument("--model", help="a saved model folder instead of a run")
        if name == "evaluate":
            p.add_argument("--data", required=True, help="MVTec-layout category with a test split")
            p.set_defaults(func=cmd_evaluate)
            continue
        p.add_argument("images", nargs="+", help="image files or folders")
        p.add_argument("--threshold", type=float, help="image threshold (default: the run's)")
        p.add_argument("--review-threshold", type=float,
                       help="scores from this up to the image threshold are 'review', not OK (default: the run's)")
        p.add_argument("--false-reject-rate", type=float, metavar="RATE",
                       help="set the image threshold from the model's held-out good images to reject this "
                            "share of good parts (0.01 = 1%%)")
        p.add_argument("--pixel-threshold", type=float,
                       help="map level where defect regions start, for the rules (default: the run's, else the "
                            "image threshold)")
        p.add_argument("--roi", metavar="MASK",
                       help="region of interest: a mask image, nonzero where defects count (default: the run's)")
        p.add_argument("--min-area", type=float, metavar="PIXELS",
                       help="smallest defect region that counts, in image pixels (default: the run's)")
        p.add_argument("--mm-per-px", type=float, help="the images' scale, to report areas in mm²")
        p.add_argument("--out", help="folder for heatmap overlays")
        p.add_argument("--vmax", type=float, help="top of the heatmap colour scale (default: 2x threshold)")
        p.set_defaults(func=cmd_score)
        if name == "predict":
            p.set_defaults(engine="local", address=None, workers=None, threads=None, csv=None)
        else:
            p.add_argument("--engine", choices=["local", "ray"], default="local",
                           help="local: this process (as predict); ray: Ray Data over a pool of worker processes")
            p.add_argument("--address",
                           help="join a running Ray cluster ('auto', or ray://HEAD:10001) instead of starting a "
                                "local Ray; the model folder and the images must be at the same paths on every node")
            p.add_argument("--workers", type=int, metavar="N",
                           help="Ray workers, each loading the model once (default: the CPUs / --threads)")
            p.add_argument("--threads", type=int, metavar="T",
                           help="torch threads per scoring process; with Ray also the CPUs each worker reserves "
                                "(default: ray 1, local torch's own). Scores are bit-identical across engines at "
                                "the same T")
            p.add_argument("--csv", metavar="FILE", help="write the CSV here (whole, at the end) instead of stdout")

    exp = sub.add_parser("export", help="the whole scoring graph to ONNX or OpenVINO, thresholds as metadata")
    exp.add_argument("--run", type=int, help="run id in the registry (its model, thresholds and training images)")
    exp.add_argument("--model", help="a saved model folder instead of a run")
    exp.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    exp.add_argument("--out", help="file to write (default: the model folder's export/model.onnx or model.xml)")
    exp.set_defaults(func=cmd_export)

    regad = sub.add_parser("regad-train", help="train RegAD's feature registration on other categories' good images")
    regad.add_argument("--data", nargs="+", required=True, help="MVTec-layout categories (never the target one)")
    regad.add_argument("--out", help="registration file to write (default: the workspace's registrations folder, "
                                     "where the Train page finds it)")
    regad.add_argument("--steps", type=int, default=300)
    regad.add_argument("--size", type=int, default=224, help="square training input side")
    regad.add_argument("--seed", type=int, default=0)
    regad.set_defaults(func=cmd_regad_train)

    bench = sub.add_parser("bench", help="accuracy, speed, memory and size on MVTec-layout categories")
    bench.add_argument("--data", nargs="+", required=True, help="one or more category folders")
    bench.add_argument("--detector", nargs="+", default=["patchcore"], choices=list_detectors())
    bench.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="detector parameters")
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--scale", type=int, metavar="N",
                       help="only fit, on N augmented copies of the training images: time and peak memory")
    bench.add_argument("--coverage", action="store_true",
                       help="PatchCore's streamed coreset against one greedy pass: coverage radius and time")
    bench.add_argument("--audit", action="store_true",
                       help="on a set with planted_* defects among its good images (benchmarks/plant_defects.py): "
                            "where the audit ranks them, and image AUROC clean, dirty and with the tolerant fit")
    bench.add_argument("--shots", type=int, nargs="+", metavar="K",
                       help="few-shot: fit on only K random good training images (each K given), score the whole "
                            "test set; the mean over --draws random draws")
    bench.add_argument("--draws", type=int, default=3, help="random draws of the shots (default 3)")
    bench.add_argument("--json", default="bench_results/bench.json", help="where to write the results")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="HTTP inspection service for the deployed run of each product variant, "
                                         "and/or a hot folder (see the README's 'Inspection service')")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--variant", action="append", metavar="NAME",
                       help="a product variant (dataset name) to serve, its deployed run; repeat for several "
                            "(default: every dataset with a deployed run)")
    serve.add_argument("--hot-folder", metavar="DIR",
                       help="also score each image file written into DIR (then moved to DIR/done or DIR/failed) "
                            "with the one --variant")
    serve.add_argument("--no-http", action="store_true", help="only the hot folder, no HTTP service")
    serve.add_argument("--poll-seconds", type=float, default=1.0,
                       help="hot folder poll interval; a file is scored once unchanged over two polls")
    serve.add_argument("--max-mb", type=float, default=20.0, help="largest image file accepted, MiB (default 20)")
    serve.add_argument("--max-megapixels", type=float, default=25.0,
                       help="largest image accepted, megapixels, read from its header (default 25)")
    serve.add_argument("--concurrency", type=int, default=1,
                       help="images one model scores at once (default 1: torch already uses every core; 2 is "
                            "tested with PatchCore on EfficientNet-Lite, see the README's 'Inspection service')")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import sweep_unregistered_models
    sweep_unregistered_models()   # folders of trainings killed before they were registered
    try:
        return args.func(args)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
