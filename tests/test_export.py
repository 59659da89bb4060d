"""Exported scoring graphs agree with the checkpoint they came from, on real images, in both runtimes."""
from pathlib import Path

import numpy as np
import pytest

from core.cli import main
from core.detectors import create_detector
from core.line.export import EXPORTABLE, ExportedModel, export
from core.runs import RunStore

# Exported scores and maps equal the checkpoint's within this, relative to the score and to the map's maximum
# (float32 operations reordered by the runtimes; measured about 3e-6 on the demo images).
TOLERANCE = 1e-4
# Small, fast fits on a non-square frame, so that the graph's geometry is not the square default. The graph searches
# PatchCore's bank exactly; a checkpoint searching IVF agrees in image scores only (test_patchcore.py).
FAST = {"patchcore": {"coreset_ratio": 0.1, "score_border": 0, "search": "exact"}, "padim": {}, "fastflow": {"epochs": 1, "flow_steps": 2},
        "efficientad": {"steps": 20, "resize": 128}}   # EfficientAD's networks need a square input


@pytest.fixture(scope="module")
def images(demo):
    train, test = demo.subset(split="train"), demo.subset(split="test")
    return [train[i] for i in range(len(train))], [test[i] for i in range(0, len(test), 4)]


@pytest.fixture(scope="module", params=EXPORTABLE)
def fitted(request, images):
    return create_detector(request.param, **{"resize": (96, 128), **FAST[request.param]}).fit(images[0])


def assert_same(exported, reference):
    np.testing.assert_allclose(exported.scores, reference.scores, rtol=TOLERANCE)
    for got, want in zip(exported.maps, reference.maps):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_exported_graph_scores_like_the_checkpoint_in_onnx_runtime_and_openvino(fitted, images, tmp_path):
    test = images[1]
    reference = fitted.predict(test)
    path = export(fitted, "onnx", tmp_path / "model.onnx")
    for runtime in ("onnxruntime", "openvino"):
        exported = ExportedModel(path, runtime=runtime)
        assert exported.metadata["detector"] == fitted.name
        assert exported.metadata["input_hw"] == list(fitted.preprocess.input_hw)
        assert_same(exported.predict(test, batch_size=3), reference)   # the batch is free, not fixed at export


def test_export_command_writes_an_openvino_model_with_the_runs_thresholds(demo, tmp_path):
    from core.pipeline import register_dataset, train_run
    store = RunStore()
    dataset_id = register_dataset(store, demo)
    run_id = train_run(store, dataset_id, demo, "padim", {"resize": 96, "calibration_fraction": 0})
    store.set_threshold(run_id, image=123.5)
    assert main(["export", "--run", str(run_id), "--format", "openvino"]) == 0
    run = store.get_run(run_id)
    xml = Path(run["model_path"]) / "export" / "model.xml"
    assert xml.with_suffix(".bin").stat().st_size > 1e6            # the backbone's weights travel with the graph
    exported = ExportedModel(xml)
    assert exported.thresholds["image"] == 123.5 and exported.metadata["run_id"] == run_id
    from core.detectors import load_detector
    test = demo.subset(split="test")
    sample = [test[i] for i in range(0, len(test), 6)]
    assert_same(exported.predict(sample), load_detector(run["model_path"]).predict(sample))


def test_export_refuses_what_it_cannot_write(images, tmp_path):
    cpr = create_detector("cpr")
    with pytest.raises(ValueError, match="cannot be exported yet: exportable detectors are patchcore"):
        export(cpr, "onnx", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="format must be one of onnx, openvino"):
        export(cpr, "tflite", tmp_path / "m.tflite")
    with pytest.raises(FileNotFoundError, match="no exported model there"):
        ExportedModel(tmp_path / "missing.onnx")
