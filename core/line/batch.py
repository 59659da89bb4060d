"""Scoring many images: in this process, or across Ray workers on one machine or a cluster.

Both engines run the same function on each image (:func:`score_image`: read, inspect, render the heatmap) and
hand its result to the same :class:`CsvWriter`, in input order, so `predict` and `score --engine local|ray` write
the same rows and the same heatmap files. With Ray, Ray Data does the scheduling: the paths are a dataset, and
``map_batches`` runs them through a pool of actors that each load the model once (:class:`RayScorer`).

Scores are bit-identical between engines when each scoring process runs torch with the same number of threads.
Across thread counts they are not: oneDNN's convolutions sum in a different order (about 1e-7 relative on the
demo set), which can move the sixth printed digit of a score.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np

from ..data import ImageError, read_image
from ..rules import DefectRules
from .inspector import Inspector

ENGINES = ("local", "ray")
# Images per Ray task: small enough to spread a few dozen images over the workers and to report progress often,
# large enough that the per-task overhead (milliseconds) is small against scoring (tens of ms per image).
RAY_BATCH = 4
# Ray Data hands each worker task one block of paths: blocks of a few batches keep the workers evenly loaded and
# the progress regular, and the cap keeps the block count (Ray's bookkeeping) bounded for millions of images.
RAY_MAX_BLOCKS = 10_000

# image, its anomaly map, the top of the colour scale -> PNG bytes. The engine does not draw: heatmap colours belong
# to the views (core.app.viz), so the caller passes a function, which Ray pickles by reference to its module.
Render = Callable[[np.ndarray, np.ndarray, float], bytes]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Scored:
    """One image's result, small enough to travel from a worker: the index of its path and PNG bytes."""
    index: int
    score: float | None = None      # None: the image was skipped (see `error`)
    label: str = ""
    reason: str = ""
    heatmap: bytes | None = None
    error: str | None = None        # why the file could not be read


def score_image(inspector: Inspector, index: int, path: str | Path, render: Render | None = None,
                vmax: float | None = None) -> Scored:
    """Read, inspect and draw one image; an unreadable file is a result with its reason, never an exception."""
    try:
        image = read_image(path)
    except ImageError as exc:
        return Scored(index, error=exc.reason)
    result = inspector.inspect(image)
    png = render(image, result.map, inspector.heatmap_scale(result.map, vmax)) if render else None
    return Scored(index, result.score, result.label, result.reason, png)


@dataclass(frozen=True)
class InspectorRecipe:
    """What a worker needs to build the driver's Inspector again: the model folder (a path every worker can read)
    and the thresholds and rules the driver resolved from the run and the command line."""
    model: str
    threshold: float | None = None
    review: float | None = None
    pixel_threshold: float | None = None
    rules: DefectRules = field(default_factory=DefectRules)

    @classmethod
    def of(cls, inspector: Inspector, model: str | Path) -> "InspectorRecipe":
        return cls(os.path.abspath(model), inspector.threshold, inspector.review, inspector.pixel_threshold,
                   inspector.rules)

    def build(self) -> Inspector:
        from ..detectors import load_detector
        return Inspector(load_detector(self.model), self.threshold, self.review, self.pixel_threshold, self.rules)


@contextmanager
def torch_threads(n: int | None):
    """Run torch with `n` threads inside the block (None: leave it), then as before."""
    import torch
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CsvWriter:
    """predict's CSV (path, score, verdict, reason[, heatmap]) and heatmap files, from results in input order."""

    def __init__(self, stream: TextIO, paths: Sequence[Path], out: Path | None = None,
                 log: Callable[[str], None] = print):
        self.paths, self.out, self.log = paths, out, log
        self.writer = csv.writer(stream)
        self.writer.writerow(["path", "score", "verdict", "reason", *(["heatmap"] if out else [])])
        self.used: set[str] = set()
        self.written = self.skipped = 0

    def write(self, result: Scored) -> None:
        path = self.paths[result.index]
        if result.error is not None:
            self.log(f"skipped: {path}: {result.error}")
            self.skipped += 1
            return
        row = [str(path), f"{result.score:.6g}", result.label, result.reason]
        if self.out is not None:
            # Images from different folders may share a name: never let one heatmap overwrite another.
            name, n = f"{path.stem}_heatmap.png", 1
            while name in self.used:
                n += 1
                name = f"{path.stem}_{n}_heatmap.png"
            self.used.add(name)
            (self.out / name).write_bytes(result.heatmap)
            row.append(str(self.out / name))
        self.writer.writerow(row)
        self.written += 1


def score_local(inspector: Inspector, paths: Sequence[Path], render: Render | None = None,
                vmax: float | None = None, threads: int | None = None) -> Iterator[Scored]:
    """The single-process engine: every image in turn, in this process."""
    with torch_threads(threads):
        for i, path in enumerate(paths):
            yield score_image(inspector, i, path, render, vmax)


class RayScorer:
    """A Ray Data actor: loads the model once, then scores batches of (index, path) rows."""

    def __init__(self, recipe: InspectorRecipe, render: Render | None, vmax: float | None, threads: int):
        import torch
        # Ray reserves `threads` CPUs for this actor: torch uses that many, so N workers on N cores do not fight.
        torch.set_num_threads(threads)
        self.inspector, self.render, self.vmax = recipe.build(), render, vmax

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = [score_image(self.inspector, int(i), str(p), self.render, self.vmax)
                   for i, p in zip(batch["index"], batch["path"])]
        return {"index": [r.index for r in results],
                "score": [np.nan if r.score is None else r.score for r in results],
                "label": [r.label for r in results],
                "reason": [r.reason for r in results],
                "heatmap": [r.heatmap or b"" for r in results],
                "error": ["" if r.error is None else r.error for r in results]}


def _not_about_progress_bars(record: logging.LogRecord) -> bool:
    """Ray Data warns that its progress bars are off: they are, on purpose (the command reports progress)."""
    return "Progress bars disabled" not in record.getMessage()


@dataclass
class RayStats:
    started_here: bool = False
    startup_s: float = 0.0          # ray.init (a new local Ray, or joining a cluster)
    workers: int = 0


def score_ray(recipe: InspectorRecipe, paths: Sequence[Path], render: Render | None = None,
              vmax: float | None = None, workers: int | None = None, threads: int = 1, address: str | None = None,
              log: Callable[[str], None] = print, stats: RayStats | None = None) -> Iterator[Scored]:
    """Ray Data over the paths: a pool of `workers` actors with `threads` CPUs each, results in input order.

    Uses the Ray this process is already connected to; otherwise joins `address` ("auto", "ray://head:10001")
    or starts a local Ray of workers x threads CPUs, and shuts it down when done, failed or interrupted. Every
    worker reads the model folder and the images by their absolute paths: on a cluster, shared storage.
    """
    import ray
    import ray.data

    stats = stats if stats is not None else RayStats()
    threads = int(threads)
    start = time.perf_counter()
    if not ray.is_initialized():
        quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
        if address:
            log(f"joining the Ray cluster at {address}")
            # The driver's own `core` package travels with the job, so every node runs this very code; its
            # dependencies (torch, timm, faiss...) must be installed on the nodes.
            core_dir = Path(__file__).resolve().parents[1]
            ray.init(address=address, runtime_env={"py_modules": [str(core_dir)],
                                                   "excludes": ["__pycache__", "*.pyc"]}, **quiet)
        else:
            cpus = (workers or max(1, (os.cpu_count() or 1) // threads)) * threads
            log(f"starting a local Ray with {cpus} CPUs")
            # address="local": always a new Ray of our own, never one found in RAY_ADDRESS or /tmp/ray.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
        stats.started_here = True
    stats.startup_s = time.perf_counter() - start
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
        stats.workers = workers
        log(f"Ray: {workers} worker{'s' if workers > 1 else ''} x {threads} CPU{'s' if threads > 1 else ''} "
            f"(ready in {stats.startup_s:.1f} s)")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False            # progress is ours, one line per 10% on stderr
        context.execution_options.preserve_order = True
        logging.getLogger("ray.data").setLevel(logging.WARNING)    # not its INFO lines on every execution
        logging.getLogger("ray.data._internal.progress").addFilter(_not_about_progress_bars)
        items = [{"index": i, "path": os.path.abspath(p)} for i, p in enumerate(paths)]
        blocks = max(1, min(-(-len(items) // RAY_BATCH), RAY_MAX_BLOCKS))
        dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            RayScorer, fn_constructor_kwargs=dict(recipe=recipe, render=render, vmax=vmax, threads=threads),
            batch_size=RAY_BATCH, batch_format="numpy", num_cpus=threads,
            compute=ray.data.ActorPoolStrategy(size=workers))
        pending: dict[int, Scored] = {}
        expected = 0
        for batch in _worker_errors_explained(dataset.iter_batches(batch_size=None, batch_format="numpy")):
            for j in range(len(batch["index"])):
                error = str(batch["error"][j])
                result = Scored(int(batch["index"][j]), None if error else float(batch["score"][j]),
                                str(batch["label"][j]), str(batch["reason"][j]),
                                bytes(batch["heatmap"][j]) if render and not error else None, error or None)
                pending[result.index] = result
            # Ray keeps the order (preserve_order); the buffer only makes sure of it.
            while expected in pending:
                yield pending.pop(expected)
                expected += 1
        if expected != len(paths):
            raise RuntimeError(f"Ray returned {expected} of {len(paths)} results")
    finally:
        if stats.started_here:
            ray.shutdown()


def _worker_errors_explained(batches: Iterator) -> Iterator:
    """A worker that cannot start (most often: the model folder is not at that path on its node) ends the job with
    the worker's own last line, not Ray's nested traceback."""
    import ray.exceptions
    try:
        yield from batches
    except ray.exceptions.RayActorError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"a Ray worker failed: {lines[-1] if lines else type(exc).__name__} (on a cluster, the model "
                         "folder and the images must be at the same paths on every node)") from exc


def score_images(inspector: Inspector, paths: Sequence[Path], stream: TextIO, *, engine: str = "local",
                 model: str | Path | None = None, out: Path | None = None, render: Render | None = None,
                 vmax: float | None = None, threads: int | None = None, workers: int | None = None,
                 address: str | None = None, progress: Progress | None = None,
                 log: Callable[[str], None] = print, stats: RayStats | None = None) -> CsvWriter:
    """Score `paths` with the chosen engine and write predict's CSV to `stream` (heatmaps into `out` when it is
    given, drawn by `render`). A progress callback may raise Cancelled to stop; Ray is shut down either way."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    for name, value in (("threads", threads), ("workers", workers)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if out is not None and render is None:
        raise ValueError("heatmaps need a render function")
    writer = CsvWriter(stream, paths, out, log)
    draw = render if out is not None else None
    if engine == "local":
        results: Iterable[Scored] = score_local(inspector, paths, draw, vmax, threads)
    else:
        if model is None:
            raise ValueError("the Ray engine needs the model folder, which every worker loads")
        results = score_ray(InspectorRecipe.of(inspector, model), paths, draw, vmax, workers,
                            threads if threads is not None else 1, address, log, stats)
    with closing(iter(results)) as results:     # closing it shuts a Ray started here down, whatever happened
        for done, result in enumerate(results, 1):
            writer.write(result)
            if progress:
                progress("scoring", done, len(paths))
    return writer


__all__ = ["ENGINES", "CsvWriter", "InspectorRecipe", "RayScorer", "RayStats", "Scored",
           "score_image", "score_images", "score_local", "score_ray", "torch_threads"]
