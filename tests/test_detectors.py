"""The detector contract, for every registered detector, on the bundled demo set."""
import numpy as np
import pytest

from core import metrics
from core.detectors import NotFittedError, create_detector, list_detectors, load_detector

# Small settings so that each detector fits the demo set in seconds on two CPU cores.
FAST_PARAMS = {
    # The calibration split is tested on its own (test_calibration.py); here it would only cost time.
    "patchcore": {"coreset_ratio": 0.05, "resize": 256, "calibration_fraction": 0},
    "padim": {"n_features": 50, "calibration_fraction": 0},
    "cpr": {"resize": 256, "n_neighbours": 10, "windows": (3, 1), "calibration_fraction": 0},
    "pad": {"resize": 128, "n_candidates": 4, "n_references": 2, "calibration_fraction": 0},
    "regad": {"resize": 128, "n_features": 50, "calibration_fraction": 0},
    "fastflow": {"epochs": 2, "resize": 128, "crop": 112},
    "efficientad": {"steps": 40, "resize": 128, "student_width": 0.125, "ae_width": 32, "penalty_size": 64},
    "ae": {"resize": 64, "epochs": 3, "batch_size": 14, "base_channels": 16},
    "dae": {"resize": 64, "epochs": 3, "batch_size": 14, "base_channels": 16},
    "vae": {"resize": 64, "epochs": 3, "batch_size": 14, "base_channels": 16},
    "ganomaly": {"resize": 64, "epochs": 3, "batch_size": 14, "base_channels": 16},
}


@pytest.fixture(scope="module")
def fitted(demo):
    """Each detector fitted once on the demo's normal training images."""
    train = demo.subset(split="train", label=0)
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = create_detector(name, **FAST_PARAMS.get(name, {}))
            params_before = cache[name].get_params()
            assert cache[name].fit(train) is cache[name]
            assert cache[name].get_params() == params_before, "fit must not change parameters"
        return cache[name]
    return get


def test_every_detector_has_fast_settings():
    assert set(list_detectors()) <= set(FAST_PARAMS)


@pytest.mark.parametrize("name", list_detectors())
def test_unfitted_detector_refuses_to_score(name, demo):
    with pytest.raises(NotFittedError):
        create_detector(name, **FAST_PARAMS.get(name, {})).score_maps(demo[:1])


@pytest.mark.parametrize("name", list_detectors())
def test_detector_beats_chance_on_demo(name, demo, fitted):
    test = demo.subset(split="test")
    scores, maps = fitted(name).score_maps(test)
    size = fitted(name).preprocess.input_size
    assert maps.shape == (len(test), size, size) and np.isfinite(maps).all()
    assert metrics.image_auroc(test.labels, scores) > 0.6


@pytest.mark.parametrize("name", list_detectors())
def test_save_load_round_trip_gives_identical_scores(name, demo, fitted, tmp_path):
    images = [demo.subset(split="test")[i] for i in (0, 10, 20)]
    det = fitted(name)
    before = det.predict(images)
    det.save(tmp_path / "model")
    again = load_detector(tmp_path / "model").predict(images)
    np.testing.assert_array_equal(before.scores, again.scores)
    for a, b in zip(before.maps, again.maps):
        np.testing.assert_array_equal(a, b)
    assert [m.shape for m in before.maps] == [im.shape[:2] for im in images], "maps at input resolution"


@pytest.mark.parametrize("name", list_detectors())
def test_model_card_describes_the_model(name, fitted):
    card = fitted(name).model_card()
    assert card["detector"] == name and card["params"] == fitted(name).get_params()
    assert card["n_images"] == 28 and card["training_set"]["n_images"] == 28
    extractor = fitted(name).feature_extractor()
    if extractor is not None:                  # one backbone block, the same on every backbone detector's card
        assert {k: card["backbone"][k] for k in ("name", "stages", "channels", "strides")} == {
            "name": fitted(name).backbone, "stages": list(fitted(name).stages), "channels": list(extractor.channels),
            "strides": list(extractor.strides)}


@pytest.mark.parametrize("name, bad, message", [
    ("patchcore", {"stages": ()}, "stages must name"), ("patchcore", {"n_reweight": 0}, "n_reweight must be >= 1"),
    ("padim", {"stages": ()}, "stages must name"), ("fastflow", {"epochs": 0}, "epochs must be >= 1"),
    ("efficientad", {"steps": 0}, "steps must be >= 1"), ("ae", {"latent_dim": 0}, "latent_dim must be >= 1"),
    ("cpr", {"windows": (3,)}, "one odd window side"), ("cpr", {"n_neighbours": 0}, "n_neighbours must be .auto. or an int >= 1")])
def test_bad_parameters_are_refused_by_name_before_any_work(name, bad, message):
    with pytest.raises(ValueError, match=message):
        create_detector(name, **bad).fit([np.zeros((64, 64, 3), np.uint8)] * 4)


def test_damaged_model_folders_are_one_clear_error_each(tmp_path, demo):
    import json
    import shutil
    from core.cli import main
    from core.detectors import ModelFolderError
    good = create_detector("patchcore", resize=64, coreset_ratio=0.1).fit(demo.subset(split="train")[:3])
    source = good.save(tmp_path / "good")
    config = json.loads((source / "config.json").read_text())

    def variant(name, edit_config=None, tensors_bytes=None, remove=None):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        if edit_config:
            c = json.loads(json.dumps(config))
            edit_config(c)
            (folder / "config.json").write_text(json.dumps(c))
        if tensors_bytes is not None:
            (folder / "fitted.safetensors").write_bytes(tensors_bytes(
                (source / "fitted.safetensors").read_bytes()))
        if remove:
            (folder / remove).unlink()
        return folder

    cases = {
        "truncated tensors": variant("cut", tensors_bytes=lambda b: b[: len(b) // 2]),
        "a pickle as tensors": variant("pickle", tensors_bytes=lambda b: b"\x80\x04\x95" + b"\x00" * 64),
        "no tensors": variant("none", remove="fitted.safetensors"),
        "config not JSON": variant("text", edit_config=None, remove=None),
        "unknown parameter": variant("param", edit_config=lambda c: c["params"].update(bogus=1)),
        "absurd frame": variant("frame", edit_config=lambda c: c.update(input_frame=[10 ** 9, 10 ** 9])),
        "nested JSON": variant("nested", edit_config=lambda c: c.update(fitted={"grid": [[[[1]]]]})),
        "wrong detector": variant("who", edit_config=lambda c: c.update(detector="nonsense")),
    }
    (cases["config not JSON"] / "config.json").write_text("{ not json")
    image = str(demo.subset(split="test").paths[0])
    for what, folder in cases.items():
        with pytest.raises(ModelFolderError, match=str(folder.name)):
            load_detector(folder)
        assert main(["predict", "--model", str(folder), "--threshold", "1", image]) == 2, what


@pytest.mark.parametrize("name", ["patchcore", "padim", "ae"])
def test_fit_checks_the_parameters_once_and_before_any_work(name, demo, monkeypatch):
    train = demo.subset(split="train", label=0)[:6]
    det = create_detector(name, **{**FAST_PARAMS[name], "calibration_fraction": 0})
    checks, reports = [], []
    check = type(det)._validate
    monkeypatch.setattr(type(det), "_validate", lambda self: checks.append(1) or check(self))
    det.fit(train)
    assert len(checks) == 1
    bad = {"patchcore": {"coreset_ratio": 2.0}, "padim": {"n_features": 0}, "ae": {"epochs": 0}}[name]
    with pytest.raises(ValueError):
        create_detector(name, **{**FAST_PARAMS[name], **bad}).fit(train, lambda *a: reports.append(a))
    assert reports == [], "refused before a single image was read"
