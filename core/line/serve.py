"""The inspection service: the deployed run of each product variant behind HTTP, and a hot folder.

A product variant is a dataset name in the registry; the service serves its deployed run (the one picked on
the Compare page), read once at start-up: deploying another run takes a restart. Every image is decided by
:class:`core.line.inspector.Inspector` (the run's thresholds, review band and defect rules, exactly as
``python -m core predict``) and every result is written to the registry's ``inspections`` table.

    python -m core serve [--host 127.0.0.1] [--port 8000] [--variant NAME ...]
    python -m core serve --hot-folder DIR --variant NAME [--no-http]

Endpoints (JSON; errors are ``{"detail": "..."}`` with a 4xx status, never a traceback):

    GET  /health                    the process answers (200 from the first moment)
    GET  /ready                     200 once every variant's model is loaded and warmed up, 503 until then
    GET  /variants                  each variant's run id, detector, thresholds and rules
    POST /inspect/{variant}         an image as a multipart file (field "file") or as the raw body with an
                                    image/* content type; ?heatmap=true adds a base64 PNG overlay
    GET  /inspections               the latest results from the registry (?variant=, ?limit=)

Refusals: 404 unknown variant (naming the served ones), 413 a body over ``max_bytes`` or an image over
``max_pixels`` (read from its header, never decoded), 415 not an image or an unsupported content type, 422 no
image in the request, 503 a variant still loading (or whose model failed to load) or a registry that stayed
locked (the result was not recorded: send it again).

Scoring: one model scores one image at a time by default (``concurrency`` 1, a semaphore per model): torch
already spreads one image over the machine's cores, and not every backbone is safe to run from two threads
(timm's hook-based feature nets keep their outputs on the module). ``concurrency`` 2 is tested to give the
same scores bit for bit with PatchCore on EfficientNet-Lite; the README's "Inspection service" has what each
setting measured. Decoding, the heatmap PNG and the registry write run outside the semaphore, in the server's
thread pool.

The hot folder polls a directory (no inotify: polling also works on network shares), scores each image
file once its size and modification time are the same on two polls, records it, and moves it to ``done/``,
or to ``failed/`` with a ``.txt`` reason when it cannot be read. At least once: a file whose result was
recorded but that could not be moved (the process killed between the two) is scored again on the next start.
"""
from __future__ import annotations

import base64
import logging
import math
import os
import signal
import sqlite3
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import IMAGE_SUFFIXES, ImageError, ImageTooLargeError, read_image
from ..detectors import load_detector
from ..runs import RegistryError, RunStore
from .inspector import Inspector

log = logging.getLogger("anomalyscope.serve")

MAX_BYTES = 20 * 2**20          # request bodies above 20 MiB are refused before they are parsed
MAX_PIXELS = 25_000_000         # images above 25 megapixels (5000 x 5000) are refused from their header
MAX_SOURCE_NAME = 255
RAW_TYPES = ("application/octet-stream",)    # besides image/*, accepted as a raw image body


class ServiceError(Exception):
    """A request the service refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class Variant:
    """One product variant: its deployed run and, once loaded and warmed up, its inspector."""

    def __init__(self, name: str, run: dict, concurrency: int = 1):
        self.name, self.run = name, run
        self.inspector: Inspector | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.slots = threading.BoundedSemaphore(concurrency)    # images this model scores at once
        self.load_seconds: float | None = None

    @property
    def state(self) -> str:
        return f"failed: {self.error}" if self.error else "ready" if self.ready.is_set() else "loading"

    def thresholds(self) -> dict:
        if self.inspector is not None:
            i = self.inspector
            return {"image": i.threshold, "review": i.review, "pixel": i.pixel_threshold}
        t = self.run["thresholds"]
        return {"image": t["image"], "review": t["review"], "pixel": t["pixel"]}

    def describe(self) -> dict:
        rules = self.inspector.rules.describe() if self.inspector is not None else None
        return {"variant": self.name, "run_id": self.run["id"], "detector": self.run["detector"],
                "run_name": self.run.get("name"), "thresholds": self.thresholds(),
                "threshold_preset": self.run["thresholds"].get("preset"), "rules": rules, "state": self.state,
                "load_seconds": self.load_seconds}

    def load(self, warm_up: bool = True) -> None:
        """Load the model and score one blank image (first calls are slow); errors are kept, not raised."""
        start = time.perf_counter()
        try:
            detector = load_detector(self.run["model_path"])
            inspector = Inspector.from_run(detector, self.run, log=log.info)
            if warm_up:
                inspector.warm_up()
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is reported by /ready, not fatal
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("variant %s: run %s could not be loaded: %s", self.name, self.run["id"], self.error)
            return
        self.inspector = inspector
        self.load_seconds = round(time.perf_counter() - start, 3)
        self.ready.set()
        log.info("variant %s: run %s (%s) ready in %.1f s", self.name, self.run["id"], self.run["detector"],
                 self.load_seconds)


def deployed_variants(store: RunStore, names: list[str] | None = None) -> dict[str, dict]:
    """Variant name -> its deployed run: the names given, or every dataset with a deployed run. Raises
    ValueError naming what is missing."""
    if names:
        out = {}
        for name in dict.fromkeys(names):
            dataset = store.find_dataset(name)
            if dataset is None:
                known = ", ".join(sorted(d["name"] for d in store.list_datasets())) or "none"
                raise ValueError(f"no product variant (dataset) named {name!r} in {store.path}; there are: {known}")
            run = store.deployed_run(dataset["id"])
            if run is None:
                raise ValueError(f"variant {name!r} has no deployed run: pick one on the dashboard's Compare page")
            out[name] = run
        return out
    out = {d["name"]: store.deployed_run(d["id"]) for d in sorted(store.list_datasets(), key=lambda d: d["name"])}
    out = {name: run for name, run in out.items() if run is not None}
    if not out:
        raise ValueError(f"no product variant in {store.path} has a deployed run: pick one on the dashboard's "
                         "Compare page")
    return out


class Service:
    """The variants, the limits and the one path every image takes: decode, score, record."""

    def __init__(self, store: RunStore, variants: list[str] | None = None, max_bytes: int = MAX_BYTES,
                 max_pixels: int = MAX_PIXELS, concurrency: int = 1):
        if int(max_bytes) < 1 or int(max_pixels) < 1 or int(concurrency) < 1:
            raise ValueError("max_bytes, max_pixels and concurrency must be at least 1")
        self.store = store
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
        self.variants = {name: Variant(name, run, int(concurrency))
                         for name, run in deployed_variants(store, variants).items()}

    def limits(self) -> dict:
        return {"max_bytes": self.max_bytes, "max_megabytes": round(self.max_bytes / 2**20, 3),
                "max_pixels": self.max_pixels, "max_megapixels": round(self.max_pixels / 1e6, 3)}

    def load_all(self, warm_up: bool = True) -> None:
        for variant in self.variants.values():
            variant.load(warm_up)

    @property
    def ready(self) -> bool:
        return all(v.ready.is_set() for v in self.variants.values())

    def variant(self, name: str) -> Variant:
        try:
            return self.variants[name]
        except KeyError:
            raise ServiceError(404, f"unknown variant {name!r}; this service serves: "
                                    f"{', '.join(self.variants)}") from None

    def inspect(self, variant: Variant, data: bytes | Path, source: str | None = None,
                heatmap: bool = False) -> dict:
        """Decode, score and record one image (bytes or a file); raises ServiceError for what it refuses."""
        if variant.error:
            raise ServiceError(503, f"variant {variant.name!r} could not be loaded ({variant.error}); see the "
                                    "service log")
        if not variant.ready.is_set():
            raise ServiceError(503, f"variant {variant.name!r} is still loading; try again shortly",
                               {"Retry-After": "5"})
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        if size > self.max_bytes:
            raise ServiceError(413, f"the image is {size:,} bytes, above the limit of {self.max_bytes:,} bytes")
        if size == 0:
            raise ServiceError(422, "the image is empty (0 bytes)")
        try:
            image = read_image(data, max_pixels=self.max_pixels)
        except ImageTooLargeError as exc:
            raise ServiceError(413, f"{exc.reason} (the service's limit is {self.max_pixels:,} pixels)") from None
        except ImageError as exc:
            raise ServiceError(415, exc.reason) from None
        with variant.slots:
            result = variant.inspector.inspect(image)
        score = result.score if math.isfinite(result.score) else None    # JSON has no NaN; the verdict says NG
        try:
            inspection_id = self.store.add_inspection(
                run_id=variant.run["id"], variant=variant.name, score=result.score, verdict=result.label,
                reason=result.reason, seconds=result.seconds, source=source)
        except (RegistryError, sqlite3.Error) as exc:
            log.error("variant %s: result not recorded: %s", variant.name, exc)
            raise ServiceError(503, f"the result could not be recorded in the registry ({exc}); send the image "
                                    "again", {"Retry-After": "1"}) from None
        out = {"inspection_id": inspection_id, "variant": variant.name, "run_id": variant.run["id"],
               "source": source, "score": score, "verdict": result.label or None, "reason": result.reason,
               "thresholds": variant.thresholds(), "seconds": round(result.seconds, 6)}
        if heatmap:
            vmax = variant.inspector.heatmap_scale(result.map)
            # The service is a view of the engine, as the CLI is: its overlay is the dashboard's and predict's
            # (tests/test_layout.py lists line/serve.py among the views).
            from ..app.viz import heatmap_png
            out["heatmap_png"] = base64.b64encode(heatmap_png(image, result.map, vmax)).decode()
            out["heatmap_scale"] = [0.0, vmax]
        return out


def _source_name(name: str | None) -> str | None:
    if not name:
        return None
    name = "".join(c if c.isprintable() else "?" for c in Path(str(name).replace("\\", "/")).name)
    return name[:MAX_SOURCE_NAME] or None


# ----------------------------------------------------------------------------------------------
# hot folder
# ----------------------------------------------------------------------------------------------
class HotFolder:
    """Scores each image file dropped into `folder` once it is completely written, then moves it."""

    def __init__(self, service: Service, variant: str, folder: str | Path, poll_seconds: float = 1.0):
        self.service, self.variant = service, service.variant(variant)
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"hot folder {self.folder} is not a folder")
        if not poll_seconds > 0:
            raise ValueError(f"the poll interval must be positive, got {poll_seconds!r}")
        self.poll_seconds = float(poll_seconds)
        self.done, self.failed = self.folder / "done", self.folder / "failed"
        self.done.mkdir(exist_ok=True)
        self.failed.mkdir(exist_ok=True)
        self._seen: dict[str, tuple[int, int]] = {}
        self._ignored: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scored = self.refused = 0

    def poll_once(self) -> list[str]:
        """One poll: score and move every file unchanged since the previous poll; returns their names."""
        current = {}
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name in self._ignored:
                    continue      # hidden files are how many tools write before a rename
                if not entry.is_file(follow_symlinks=False):
                    if not entry.is_dir(follow_symlinks=False):
                        self._ignore(entry.name, "not a regular file")
                    continue
                if Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
                    self._ignore(entry.name, f"not an image file name ({', '.join(sorted(IMAGE_SUFFIXES))})")
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                current[entry.name] = (st.st_size, st.st_mtime_ns)
        stable = sorted(name for name, key in current.items() if self._seen.get(name) == key)
        self._seen = {name: key for name, key in current.items() if name not in stable}
        for name in stable:
            self._handle(name)
        return stable

    def _ignore(self, name: str, why: str) -> None:
        self._ignored.add(name)
        log.warning("hot folder %s: %s left where it is: %s", self.folder, name, why)

    def _handle(self, name: str) -> None:
        path = self.folder / name
        start = time.perf_counter()
        try:
            record = self.service.inspect(self.variant, path, name)
        except ServiceError as exc:
            if exc.status >= 500:    # not loaded, or the registry locked: the file stays, and is tried again
                log.warning("hot folder %s: %s not scored yet: %s", self.folder, name, exc.detail)
                return
            moved = _move(path, self.failed)
            if moved is not None:
                (self.failed / f"{moved.name}.txt").write_text(f"{name}: {exc.detail}\n", encoding="utf-8")
            self.refused += 1
            log.info("hot %s %s refused %d: %s", self.variant.name, name, exc.status, exc.detail)
            return
        except FileNotFoundError:
            return                   # taken away between the poll and the read
        _move(path, self.done)
        self.scored += 1
        log.info("hot %s %s verdict=%s score=%s ms=%.1f id=%d", self.variant.name, name, record["verdict"],
                 _fmt(record["score"]), 1000 * (time.perf_counter() - start), record["inspection_id"])

    def run(self) -> None:
        """Poll until stop(), once the variant's model is ready."""
        while not self.variant.ready.wait(0.2):
            if self.variant.error or self._stop.is_set():
                if self.variant.error:
                    log.error("hot folder %s stopped: variant %s did not load", self.folder, self.variant.name)
                return
        log.info("hot folder %s: scoring new images for %s every %g s", self.folder, self.variant.name,
                 self.poll_seconds)
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - one bad poll (folder gone for a moment) must not end the loop
                log.exception("hot folder %s: poll failed", self.folder)
            self._stop.wait(self.poll_seconds)

    def start(self) -> "HotFolder":
        self._thread = threading.Thread(target=self.run, name=f"hot folder {self.folder}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _move(path: Path, folder: Path) -> Path | None:
    """Move into `folder` without overwriting an earlier file of the same name; None if it could not be moved."""
    target, n = folder / path.name, 1
    while target.exists():
        n += 1
        target = folder / f"{path.stem}_{n}{path.suffix}"
    try:
        os.replace(path, target)
    except OSError as exc:
        log.error("cannot move %s to %s: %s", path, folder, exc)
        return None
    return target


def _fmt(score) -> str:
    return "nan" if score is None else f"{score:.6g}"


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------
async def _send_json(scope, receive, send, status: int, body: dict, headers: dict | None = None) -> None:
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body above `max_bytes` gets 413 before anything parses it (declared by
    Content-Length or counted as it streams in); bodies within it are buffered and handed on. `image_bytes`
    is the image limit the message states (the body may be a little larger: the multipart envelope)."""

    ENVELOPE = 64 * 1024

    def __init__(self, app, image_bytes: int):
        self.app, self.image_bytes, self.max_bytes = app, image_bytes, image_bytes + self.ENVELOPE

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = {"detail": f"the request is too large: images up to {self.image_bytes:,} bytes "
                             f"({self.image_bytes / 2**20:g} MiB) are accepted"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            scope.setdefault("anomalyscope", {})["detail"] = too_big["detail"]
            return await _send_json(scope, receive, send, 413, too_big, {"Connection": "close"})
        messages, total = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                scope.setdefault("anomalyscope", {})["detail"] = too_big["detail"]
                return await _send_json(scope, receive, send, 413, too_big, {"Connection": "close"})
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)


class RequestLog:
    """ASGI middleware: one log line per request (method, path, status, ms; variant, verdict and score for
    an inspection; the reason for a refusal)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        info = scope.setdefault("anomalyscope", {})

        async def capture(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, capture)
        finally:
            ms = 1000 * (time.perf_counter() - start)
            if "verdict" in info:
                log.info("%s %s %d variant=%s verdict=%s score=%s ms=%.1f id=%s", scope["method"], scope["path"],
                         status[0], info["variant"], info["verdict"], _fmt(info["score"]), ms, info["id"])
            elif "detail" in info:
                log.info("%s %s %d ms=%.1f refused: %s", scope["method"], scope["path"], status[0], ms,
                         info["detail"])
            else:
                log.info("%s %s %d ms=%.1f", scope["method"], scope["path"], status[0], ms)


async def _image_from(request) -> tuple[bytes, str | None]:
    """The image of a request: the multipart file (field "file", else the only file) or the raw body."""
    how = ("send the image as a multipart file field named 'file' (curl -F file=@part.png) or as the raw body "
           "with an image/* content type (curl --data-binary @part.png -H 'Content-Type: image/png')")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=4, max_fields=16)
        except StarletteHTTPException as exc:
            raise ServiceError(422, f"malformed multipart body ({exc.detail}); {how}") from None
        try:
            files = [v for v in form.values() if isinstance(v, UploadFile)]
            upload = form.get("file") if isinstance(form.get("file"), UploadFile) else None
            if upload is None and len(files) == 1:
                upload = files[0]
            if upload is None:
                raise ServiceError(422, f"no image file in the request ({len(files)} file fields); {how}")
            return await upload.read(), _source_name(upload.filename)
        finally:
            await form.close()
    if kind.startswith("image/") or kind in RAW_TYPES:
        body = await request.body()
        if not body:
            raise ServiceError(422, f"no image in the request (empty body); {how}")
        return body, _source_name(request.headers.get("x-filename"))
    if not kind and not await request.body():
        raise ServiceError(422, f"no image in the request; {how}")
    raise ServiceError(415, f"unsupported content type {kind or '(none)'!r}; {how}")


def create_app(registry_path: str | Path | None = None, variants: list[str] | None = None, *,
               max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS, concurrency: int = 1,
               hot_folder: str | Path | None = None, poll_seconds: float = 1.0, warm_up: bool = True):
    """The FastAPI app. The variants are resolved now (a name without a deployed run raises ValueError); their
    models load in a background thread at start-up (lifespan), so /health answers at once and /ready says
    when they are warm. `hot_folder` also polls that folder for the one variant served."""
    service = Service(RunStore(registry_path), variants, max_bytes, max_pixels, concurrency)
    if hot_folder is not None and len(service.variants) != 1:
        raise ValueError(f"a hot folder scores for one variant: name it with --variant (this registry has "
                         f"{len(service.variants)} deployed: {', '.join(service.variants)})")
    folder = HotFolder(service, next(iter(service.variants)), hot_folder, poll_seconds) if hot_folder else None

    @asynccontextmanager
    async def lifespan(app):
        loader = threading.Thread(target=service.load_all, args=(warm_up,), name="load models", daemon=True)
        loader.start()
        if folder is not None:
            folder.start()
        try:
            yield
        finally:
            if folder is not None:
                folder.stop()

    app = FastAPI(title="AnomalyScope inspection service", lifespan=lifespan,
                  description="The deployed run of each product variant: POST an image, get its score and verdict.")
    app.state.service, app.state.hot_folder = service, folder

    @app.exception_handler(ServiceError)
    async def refused(request: Request, exc: ServiceError):
        request.scope.setdefault("anomalyscope", {})["detail"] = exc.detail
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        request.scope.setdefault("anomalyscope", {})["detail"] = str(exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the service log has the details"},
                            status_code=500)

    @app.get("/health")
    async def health():
        """The process is alive (the models may still be loading: see /ready)."""
        return {"status": "alive"}

    @app.get("/ready")
    async def ready():
        """200 once every variant's model is loaded and warmed up; 503 (with each variant's state) until then."""
        body = {"ready": service.ready, "variants": {v.name: v.state for v in service.variants.values()}}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/variants")
    async def list_variants():
        """The served variants: run id, detector, thresholds, rules and state; and the request limits."""
        return {"variants": [v.describe() for v in service.variants.values()], "limits": service.limits()}

    @app.post("/inspect/{variant}")
    async def inspect(variant: str, request: Request, heatmap: bool = False):
        """Score one image with the variant's deployed run; the result is recorded in the registry."""
        chosen = service.variant(variant)
        data, source = await _image_from(request)
        out = await run_in_threadpool(service.inspect, chosen, data, source, heatmap)
        request.scope.setdefault("anomalyscope", {}).update(
            variant=chosen.name, verdict=out["verdict"], score=out["score"], id=out["inspection_id"])
        return out

    @app.get("/inspections")
    async def inspections(variant: str | None = None, limit: int = 50):
        """The latest recorded results, newest first (at most 1000)."""
        if variant is not None:
            service.variant(variant)
        if not 0 <= limit <= 1000:
            raise ServiceError(422, f"limit must be between 0 and 1000, got {limit}")
        rows = await run_in_threadpool(service.store.list_inspections, None, variant, limit)
        for row in rows:
            row["score"] = row["score"] if math.isfinite(row["score"]) else None
        return {"inspections": rows}

    # The middleware added last is the outermost: the log sees every answer, the body limit's 413s included.
    app.add_middleware(BodyLimit, image_bytes=service.max_bytes)
    app.add_middleware(RequestLog)
    return app


def serve(registry_path=None, variants=None, host: str = "127.0.0.1", port: int = 8000, hot_folder=None,
          http: bool = True, poll_seconds: float = 1.0, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
          concurrency: int = 1, log_level: str = "info") -> int:
    """`python -m core serve`: uvicorn over create_app, or the hot folder alone (http=False)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not http:
        if hot_folder is None:
            raise ValueError("--no-http needs --hot-folder: without either there is nothing to serve")
        service = Service(RunStore(registry_path), variants, max_bytes, max_pixels, concurrency)
        if len(service.variants) != 1:
            raise ValueError(f"a hot folder scores for one variant: name it with --variant (this registry has "
                             f"{len(service.variants)} deployed: {', '.join(service.variants)})")
        folder = HotFolder(service, next(iter(service.variants)), hot_folder, poll_seconds)
        signal.signal(signal.SIGTERM, lambda *_: folder.stop(timeout=0))
        service.load_all()
        try:
            folder.run()
        except KeyboardInterrupt:
            pass
        return 0 if service.ready else 1
    import uvicorn
    app = create_app(registry_path, variants, max_bytes=max_bytes, max_pixels=max_pixels, concurrency=concurrency,
                     hot_folder=hot_folder, poll_seconds=poll_seconds)
    # One process: the models live in it (workers would each load every model); our own line per request
    # replaces uvicorn's access log.
    uvicorn.run(app, host=host, port=port, access_log=False, log_level=log_level)
    return 0
