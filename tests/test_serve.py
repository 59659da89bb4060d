"""The inspection service (core/line/serve.py): verdicts of a deployed run over HTTP, recorded in the registry;
health and readiness; a clear 4xx for every bad request; the hot folder; a concurrent burst loses nothing.

One tiny PatchCore run (128 px, no calibration, no auto settings: about 3 s) is fitted once for the module;
each test works on its own copy of that registry.
"""
import base64
import io
import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.cli import main
from core.data import load_mvtec, read_image
from core.detectors import load_detector
from core.line.inspector import Inspector
from core.line.serve import HotFolder, Service, Variant, create_app
from core.pipeline import register_dataset, train_run
from core.runs import RunStore

from conftest import DEMO, wait_until
from test_data import fake_png_header

GOOD = DEMO / "test" / "good" / "04.jpg"
BAD = DEMO / "test" / "colour" / "00.jpg"
VARIANT = "hazelnut_toy"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A registry holding one deployed PatchCore run of the demo set (the models folder beside it)."""
    home = tmp_path_factory.mktemp("serve_workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALYSCOPE_HOME", str(home))
        store = RunStore(home / "registry.sqlite")
        demo = load_mvtec(DEMO)
        dataset_id = register_dataset(store, demo, "mvtec")
        run_id = train_run(store, dataset_id, demo, "patchcore", {"coreset_ratio": 0.05, "resize": 128,
                                                                   "calibration_fraction": 0, "score_border": 0})
        store.set_deployed(dataset_id, run_id)
    assert store.get_run(run_id)["thresholds"]["image"] is not None
    return store.path, run_id


@pytest.fixture
def registry(fitted, tmp_path):
    """This test's own copy of the module's registry (the model files are shared, read-only)."""
    source, run_id = fitted
    target = tmp_path / "registry.sqlite"
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target, run_id


def ready_client(app) -> TestClient:
    client = TestClient(app).__enter__()
    wait_until(lambda: client.get("/ready").status_code == 200, 60, "the service ready")
    return client


@pytest.fixture
def client(registry):
    client = ready_client(create_app(registry[0]))
    yield client
    client.__exit__(None, None, None)


def test_good_and_defective_images_get_their_verdicts_and_each_is_recorded(client, registry, caplog):
    path, run_id = registry
    caplog.set_level(logging.INFO, logger="anomalyscope.serve")
    good = client.post(f"/inspect/{VARIANT}", files={"file": ("04.jpg", GOOD.read_bytes(), "image/jpeg")})
    bad = client.post(f"/inspect/{VARIANT}?heatmap=true", content=BAD.read_bytes(),
                      headers={"Content-Type": "image/jpeg", "X-Filename": "colour/00.jpg"})
    assert good.status_code == 200 and bad.status_code == 200, (good.text, bad.text)
    good, bad = good.json(), bad.json()
    run = RunStore(path).get_run(run_id)
    assert good["verdict"] == "OK" and bad["verdict"] == "NG" and bad["score"] > run["thresholds"]["image"]
    assert good["run_id"] == bad["run_id"] == run_id and good["variant"] == VARIANT
    assert good["thresholds"] == {"image": run["thresholds"]["image"], "review": None,
                                  "pixel": run["thresholds"]["pixel"]}
    assert "below the threshold" in good["reason"] and good["seconds"] > 0 and "heatmap_png" not in good
    # The same decision as predict's: the run's Inspector on the same image.
    inspector = Inspector.from_run(load_detector(run["model_path"]), run)
    assert bad["score"] == pytest.approx(inspector.inspect(read_image(BAD)).score, rel=1e-5)
    heat = Image.open(io.BytesIO(base64.b64decode(bad["heatmap_png"])))
    assert heat.format == "PNG" and heat.size == Image.open(BAD).size
    # Every result is in the registry, under its id.
    rows = {r["id"]: r for r in RunStore(path).list_inspections(run_id=run_id)}
    assert set(rows) == {good["inspection_id"], bad["inspection_id"]}
    recorded = rows[bad["inspection_id"]]
    assert (recorded["variant"], recorded["verdict"], recorded["source"]) == (VARIANT, "NG", "00.jpg")
    assert recorded["score"] == pytest.approx(bad["score"]) and recorded["reason"] == bad["reason"]
    assert client.get("/inspections", params={"limit": 1}).json()["inspections"][0]["id"] == bad["inspection_id"]
    # One log line per request, with variant, verdict, score and time.
    lines = [r.getMessage() for r in caplog.records if "/inspect/" in r.getMessage()]
    assert len(lines) == 2 and all(f"variant={VARIANT}" in line and " ms=" in line for line in lines)
    assert "verdict=OK" in lines[0] and "verdict=NG" in lines[1] and "score=" in lines[1]


def test_bad_requests_get_a_clear_4xx_and_are_not_recorded(registry):
    path, run_id = registry
    client = ready_client(create_app(path, max_bytes=150_000))
    try:
        url = f"/inspect/{VARIANT}"

        def refused(status, *words, **request):
            answer = client.post(url, **request) if "url" not in request else client.post(**request)
            assert answer.status_code == status, answer.text
            detail = answer.json()["detail"]
            assert all(w in str(detail) for w in words), detail
            return detail

        refused(415, "not a recognised image format", files={"file": ("part.png", b"hello", "image/png")})
        refused(415, "unsupported content type 'text/plain'", content=b"hello", headers={"Content-Type": "text/plain"})
        refused(422, "no image in the request", content=b"", headers={"Content-Type": "image/png"})
        refused(422, "no image in the request")
        refused(422, "no image file", files={"a": ("a.png", b"1"), "b": ("b.png", b"2")})
        refused(422, "empty (0 bytes)", files={"file": ("part.png", b"", "image/png")})
        refused(413, "6000x6000 pixels", "25,000,000 pixels", "not decoded",
                files={"file": ("huge.png", fake_png_header(6000, 6000), "image/png")})
        refused(413, "150,000 bytes", files={"file": ("big.jpg", b"\xff" * 200_000, "image/jpeg")})
        refused(413, "150,000 bytes", content=b"\xff" * 200_000, headers={"Content-Type": "image/jpeg"})
        refused(413, "images up to 150,000 bytes", content=b"\xff" * 300_000, headers={"Content-Type": "image/jpeg"})
        refused(404, "unknown variant 'nope'", VARIANT, url="/inspect/nope",
                files={"file": ("04.jpg", GOOD.read_bytes(), "image/jpeg")})
        assert client.post(url + "?heatmap=maybe", content=GOOD.read_bytes(),
                           headers={"Content-Type": "image/jpeg"}).status_code == 422
        assert client.get("/inspections", params={"limit": 5000}).status_code == 422
        assert client.get("/inspections", params={"variant": "nope"}).status_code == 404
        assert RunStore(path).count_inspections() == 0
        assert client.post(url, files={"file": ("04.jpg", GOOD.read_bytes(), "image/jpeg")}).status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_health_answers_at_once_ready_waits_for_every_model(registry, monkeypatch):
    path, run_id = registry
    release = threading.Event()
    load = Variant.load
    monkeypatch.setattr(Variant, "load", lambda self, warm_up=True: (release.wait(30), load(self, warm_up)))
    with TestClient(create_app(path)) as client:
        assert client.get("/health").json() == {"status": "alive"}
        answer = client.get("/ready")
        assert answer.status_code == 503 and answer.json() == {"ready": False, "variants": {VARIANT: "loading"}}
        early = client.post(f"/inspect/{VARIANT}", content=GOOD.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert early.status_code == 503 and "still loading" in early.json()["detail"]
        assert early.headers["Retry-After"] == "5"
        release.set()
        wait_until(lambda: client.get("/ready").status_code == 200, 60, "the service ready")
        [variant] = client.get("/variants").json()["variants"]
        assert (variant["run_id"], variant["detector"], variant["state"]) == (run_id, "patchcore", "ready")
        assert variant["thresholds"]["image"] == RunStore(path).get_run(run_id)["thresholds"]["image"]

    # A model that cannot be loaded: never ready, and each request says why.
    monkeypatch.setattr(Variant, "load", load)
    store = RunStore(path)
    dataset = store.add_dataset("broken", "/nowhere", "folder", {}, {})
    broken = store.add_run(dataset_id=dataset, detector="patchcore", params={}, model_path=str(path.parent / "gone"),
                           metrics={}, timings={}, model_card={}, scores=[])
    store.set_deployed(dataset, broken)
    with TestClient(create_app(path)) as client:
        wait_until(lambda: "failed" in client.get("/ready").json()["variants"]["broken"], 60, "the load failed")
        assert client.get("/ready").status_code == 503
        answer = client.post("/inspect/broken", content=GOOD.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 503 and "could not be loaded" in answer.json()["detail"]


def test_variants_are_chosen_by_name_and_refused_clearly(registry):
    path, run_id = registry
    store = RunStore(path)
    other = store.add_dataset("other", "/o", "folder", {}, {})
    with pytest.raises(ValueError, match="'other' has no deployed run"):
        create_app(path, ["other"])
    with pytest.raises(ValueError, match=r"no product variant \(dataset\) named 'nope'.*hazelnut_toy, other"):
        create_app(path, ["nope"])
    # A second variant served by the same model files: both are listed; a hot folder needs one named.
    second = store.add_run(dataset_id=other, detector="patchcore", params={},
                           model_path=store.get_run(run_id)["model_path"], metrics={}, timings={}, model_card={},
                           scores=[], thresholds={"image": 1e-3})
    store.set_deployed(other, second)
    with pytest.raises(ValueError, match="one variant: name it with --variant"):
        create_app(path, hot_folder=path.parent)
    assert set(Service(store).variants) == {VARIANT, "other"}
    assert set(Service(store, ["other"]).variants) == {"other"}
    with pytest.raises(ValueError, match="no product variant .* has a deployed run"):
        create_app(path.parent / "empty.sqlite")
    assert main(["--registry", str(path), "serve", "--variant", "nope"]) == 2


def test_cli_serve_hands_its_options_to_uvicorn(registry, monkeypatch):
    import uvicorn
    path, _ = registry
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["--registry", str(path), "serve", "--variant", VARIANT, "--port", "8123", "--max-mb", "2",
                 "--max-megapixels", "4", "--concurrency", "2"]) == 0
    service = seen["app"].state.service
    assert (seen["host"], seen["port"], seen["access_log"]) == ("127.0.0.1", 8123, False)
    assert (service.max_bytes, service.max_pixels, list(service.variants)) == (2 * 2**20, 4_000_000, [VARIANT])


def test_hot_folder_scores_each_file_once_it_is_written_and_moves_it(registry, tmp_path):
    path, run_id = registry
    service = Service(RunStore(path))
    service.load_all()
    drop = tmp_path / "drop"
    drop.mkdir()
    folder = HotFolder(service, VARIANT, drop)
    (drop / "good.jpg").write_bytes(GOOD.read_bytes())
    (drop / "broken.png").write_bytes(b"not an image")
    (drop / "notes.txt").write_text("left alone")
    (drop / "part.jpg").write_bytes(BAD.read_bytes()[:1000])       # still being written
    assert folder.poll_once() == []                                  # seen once: not yet known to be complete
    with open(drop / "part.jpg", "ab") as f:
        f.write(BAD.read_bytes()[1000:])
    assert folder.poll_once() == ["broken.png", "good.jpg"]
    assert folder.poll_once() == ["part.jpg"]
    assert sorted(p.name for p in (drop / "done").iterdir()) == ["good.jpg", "part.jpg"]
    assert sorted(p.name for p in (drop / "failed").iterdir()) == ["broken.png", "broken.png.txt"]
    assert "not a recognised image format" in (drop / "failed" / "broken.png.txt").read_text()
    assert (drop / "notes.txt").exists() and folder.poll_once() == []
    verdicts = {r["source"]: r["verdict"] for r in RunStore(path).list_inspections(run_id=run_id)}
    assert verdicts == {"good.jpg": "OK", "part.jpg": "NG"}
    # A second file of the same name does not overwrite the first in done/.
    (drop / "good.jpg").write_bytes(GOOD.read_bytes())
    folder.poll_once(), folder.poll_once()
    assert sorted(p.name for p in (drop / "done").iterdir()) == ["good.jpg", "good_2.jpg", "part.jpg"]


def test_hot_folder_runs_beside_the_http_service(registry, tmp_path):
    path, run_id = registry
    drop = tmp_path / "drop"
    drop.mkdir()
    with TestClient(create_app(path, [VARIANT], hot_folder=drop, poll_seconds=0.05)) as client:
        (drop / "00.jpg").write_bytes(BAD.read_bytes())
        wait_until(lambda: (drop / "done" / "00.jpg").exists(), 60, "the dropped file scored and moved")
        assert client.get("/inspections").json()["inspections"][0]["source"] == "00.jpg"
    assert [r["verdict"] for r in RunStore(path).list_inspections(run_id=run_id)] == ["NG"]


def test_a_concurrent_burst_loses_nothing(client, registry):
    path, run_id = registry
    images = [GOOD.read_bytes(), BAD.read_bytes()]

    def one(i):
        answer = client.post(f"/inspect/{VARIANT}", files={"file": (f"{i}.jpg", images[i % 2], "image/jpeg")})
        assert answer.status_code == 200, answer.text
        return answer.json()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(40)))
    assert [a["verdict"] for a in answers] == ["OK", "NG"] * 20
    rows = RunStore(path).list_inspections(run_id=run_id, limit=None)
    assert len(rows) == 40 and {r["id"] for r in rows} == {a["inspection_id"] for a in answers}
    assert {r["source"] for r in rows} == {f"{i}.jpg" for i in range(40)}


def test_scoring_is_serialised_per_model(registry, monkeypatch):
    """concurrency=1 (the default): one model never scores two images at once."""
    path, _ = registry
    service = Service(RunStore(path))
    service.load_all()
    [variant] = service.variants.values()
    busy, most, lock = [0], [0], threading.Lock()
    inspect = variant.inspector.inspect

    def counted(image):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        try:
            return inspect(image)
        finally:
            with lock:
                busy[0] -= 1
    object.__setattr__(variant.inspector, "inspect", counted)
    data = GOOD.read_bytes()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: service.inspect(variant, data, f"{i}.jpg"), range(8)))
    assert most[0] == 1


def test_two_images_at_once_score_exactly_as_one_at_a_time(registry):
    """--concurrency 2 (PatchCore on EfficientNet-Lite): the same scores, bit for bit, as serial scoring."""
    path, _ = registry
    service = Service(RunStore(path), concurrency=2)
    service.load_all()
    [variant] = service.variants.values()
    images = [p.read_bytes() for p in sorted((DEMO / "test").rglob("*.jpg"))[::3]]
    serial = [service.inspect(variant, data)["score"] for data in images]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda data: service.inspect(variant, data)["score"], images * 2))
    assert concurrent == serial * 2
