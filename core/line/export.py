"""Export a fitted detector's whole scoring graph to ONNX or OpenVINO, and run the exported file.

The graph takes what a camera gives after one resize: uint8 RGB frames (N, H, W, 3) at the model's input
size. Inside it are the preprocessing constants (scale to [0, 1], the backbone's mean and std), the backbone,
the detector's head (for PatchCore an exact nearest-neighbour search over the memory bank as matrix products,
and Eq. 7), the map's upsampling and blur, and the image score. Outputs: `score` (N,) and `map` (N, H, W) on
the run's raw scale. The run's thresholds, the resize to the input size and the map's way back to the
image's own size travel as metadata (`anomalyscope` JSON in the ONNX metadata / the OpenVINO rt_info), not
baked in, so a threshold moved in the dashboard needs no new export.

:class:`ExportedModel` runs either file with ONNX Runtime or OpenVINO and predicts like the detector does.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..data import Preprocess, image_batches
from ..detectors import Detector, Prediction

FORMATS = ("onnx", "openvino")
OPSET = 18
METADATA_KEY = "anomalyscope"
# Detectors whose scoring is written in torch operations only (Detector.score_graph).
EXPORTABLE = ("patchcore", "padim", "fastflow", "efficientad")


class ScoringGraph(nn.Module):
    """uint8 frames (N, H, W, 3) at the model's input size -> (scores (N,), maps (N, H, W))."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector
        detector.feature_extractor()          # built now if lazy, so that it is registered below
        # The detector's networks (backbone, heads) registered here: their weights become the graph's
        # initialisers rather than constants traced with gradients.
        self.networks = nn.ModuleDict({name.strip("_"): value for name, value in vars(detector).items()
                                       if isinstance(value, nn.Module)})
        pre = detector.preprocess
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = frames.permute(0, 3, 1, 2).to(torch.float32).div(255.0).sub(self.mean).div(self.std)
        return self.detector.score_graph(x)


def metadata(detector: Detector, run: dict | None = None) -> dict:
    """What a runtime needs beside the graph: the input geometry, the thresholds, where it came from."""
    thresholds = (run or {}).get("thresholds") or {}
    return {"detector": detector.name, "run_id": (run or {}).get("id"),
            "preprocess": detector.preprocess.to_dict(), "input_hw": list(detector.preprocess.input_hw),
            "input": "uint8 RGB frames (N, H, W, 3) at input_hw: each image resized as preprocess says "
                     "(bilinear, antialiased when shrinking), then centre-cropped if crop is set",
            "outputs": {"score": "(N,) image anomaly scores, raw scale", "map": "(N, H, W) anomaly maps at input_hw"},
            "thresholds": {k: thresholds.get(k) for k in ("image", "pixel", "review")},
            "verdict": "NG when score >= thresholds.image (and whenever the score is not finite); review from "
                       "thresholds.review up to it; OK below",
            "search": _search_note(detector),
            "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _search_note(detector: Detector) -> str | None:
    if detector.name != "patchcore":
        return None
    note = f"exact nearest-neighbour search over the {len(detector.memory_bank_)} bank patches"
    if detector._uses_ivf():
        note += (f"; the checkpoint searches an IVF index ({detector.nprobe_} of {len(detector.ivf_centroids_)} cells) "
                 "and re-checks each image's worst patches exactly, so its maps differ from this graph's by the "
                 "index's recall")
    return note


def _check_exportable(detector: Detector) -> None:
    if detector.name not in EXPORTABLE:
        raise ValueError(f"{detector.name} cannot be exported yet: exportable detectors are {', '.join(EXPORTABLE)}")


def export_onnx(detector: Detector, path: str | Path, run: dict | None = None) -> Path:
    """Write the scoring graph to `path` (.onnx), atomically, with the metadata in its metadata_props."""
    import onnx
    _check_exportable(detector)
    detector._check_fitted()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = ScoringGraph(detector).eval()
    # A batch of 2: the exporter fixes a dimension of size 1 in the graph, and the batch must stay free.
    example = torch.zeros((2, *detector.preprocess.input_hw, 3), dtype=torch.uint8)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad():
            torch.onnx.export(graph, (example,), str(raw), input_names=["image"], output_names=["score", "map"],
                              dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                              opset_version=OPSET, dynamo=True, verbose=False)
        model = onnx.load(str(raw))
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata(detector, run))
        out = Path(tmp) / path.name
        onnx.save(model, str(out))
        os.replace(out, path)
    return path


def export_openvino(detector: Detector, path: str | Path, run: dict | None = None) -> Path:
    """Write an OpenVINO IR (`path` .xml plus its .bin), converted from the ONNX graph, FP32."""
    import openvino as ov
    path = Path(path).with_suffix(".xml")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        model = ov.convert_model(str(export_onnx(detector, Path(tmp) / "graph.onnx", run)))
        model.set_rt_info(json.dumps(metadata(detector, run)), METADATA_KEY)
        staged = Path(tmp) / path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)
    return path


def export(detector: Detector, fmt: str, path: str | Path, run: dict | None = None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return (export_onnx if fmt == "onnx" else export_openvino)(detector, path, run)


class ExportedModel:
    """An exported scoring graph run by ONNX Runtime (.onnx) or OpenVINO (.xml, or .onnx with
    runtime="openvino"), predicting like the detector it came from: scores and maps at each image's size."""

    def __init__(self, path: str | Path, runtime: str | None = None, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no exported model there")
        self.runtime = runtime or ("openvino" if self.path.suffix == ".xml" else "onnxruntime")
        if self.runtime == "onnxruntime":
            import onnxruntime as ort
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            meta = self._session.get_modelmeta().custom_metadata_map[METADATA_KEY]
        elif self.runtime == "openvino":
            import openvino as ov
            core = ov.Core()
            model = core.read_model(str(self.path))
            meta = (model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY])
                    else self._onnx_metadata())
            # FP32 as exported: on CPUs with bfloat16 units OpenVINO otherwise picks bf16 by itself (2026.4 on
            # this AVX512-BF16 machine moved maps by up to 1.5 against the checkpoint).
            config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
            self._compiled = core.compile_model(model, "CPU", config)
            self._request = self._compiled.create_infer_request()
        else:
            raise ValueError(f"runtime must be 'onnxruntime' or 'openvino', not {self.runtime!r}")
        self.metadata = json.loads(meta)
        self.preprocess = Preprocess.from_dict(self.metadata["preprocess"])
        self.thresholds = self.metadata["thresholds"]

    def _onnx_metadata(self) -> str:
        import onnx
        props = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
        return props[METADATA_KEY]

    def score_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N,) and maps (N, H, W) of uint8 frames (N, H, W, 3) at the input size."""
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        if self.runtime == "onnxruntime":
            score, amap = self._session.run(["score", "map"], {"image": frames})
        else:
            result = self._request.infer({0: frames})
            score, amap = result[self._compiled.output(0)], result[self._compiled.output(1)]
        return np.asarray(score, dtype=np.float32), np.asarray(amap, dtype=np.float32)

    def score_maps(self, images: Sequence[np.ndarray], batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for _, batch in image_batches(images, batch_size):
            s, m = self.score_frames(np.stack([self.preprocess.image_to_frame(im) for im in batch]))
            scores.append(s)
            maps.append(m)
        return np.concatenate(scores), np.concatenate(maps)

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 1) -> Prediction:
        scores, maps = self.score_maps(images, batch_size)
        sizes = [images[i].shape[:2] for i in range(len(images))]
        return Prediction(scores, [self.preprocess.map_to_input(m, hw) for m, hw in zip(maps, sizes)])
