"""Milliseconds per image for a detector in torch, in ONNX Runtime and in OpenVINO, measured in one run.

    .venv/bin/python benchmarks/export_latency.py --data ../shared/datasets/bottle
    .venv/bin/python benchmarks/export_latency.py --data ../shared/datasets/bottle --detector padim --set resize=256

Each detector is fitted on the category's good training images with its defaults (or --set), exported to ONNX
and to OpenVINO IR (FP32), and the three are timed in turns on the same test images, one image per call as on
a line (whole predict: resize, graph, map back to the image's size): best of --rounds. Image AUROC on the whole
test set and the largest score difference from torch are reported per runtime. Not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data import load_mvtec  # noqa: E402
from core.detectors import create_detector  # noqa: E402
from core.line.export import EXPORTABLE, ExportedModel, export  # noqa: E402
from core.metrics import image_auroc  # noqa: E402
from core.params import parse_overrides  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="MVTec-layout category")
    parser.add_argument("--detector", nargs="+", default=list(EXPORTABLE), choices=EXPORTABLE)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="parameters for every detector")
    parser.add_argument("--timed-images", type=int, default=20, help="test images timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench_results/export_latency.json")
    args = parser.parse_args()

    data = load_mvtec(args.data)
    train, test = data.subset(split="train", label=0), data.subset(split="test")
    train_images = [train[i] for i in range(len(train))]
    test_images = [test[i] for i in range(len(test))]
    labels = np.array([s.label for s in test.samples])
    timed = test_images[:: max(1, len(test_images) // args.timed_images)][: args.timed_images]
    print(f"{Path(args.data).name}: {len(train_images)} training, {len(test_images)} test images; torch "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    rows, runners = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.detector:
            start = time.perf_counter()
            det = create_detector(name, **parse_overrides(args.set)).fit(train_images)
            fit_s = time.perf_counter() - start
            reference = det.predict(test_images, batch_size=1)
            onnx_path = export(det, "onnx", Path(tmp) / f"{name}.onnx")
            xml_path = export(det, "openvino", Path(tmp) / f"{name}.xml")
            runners[name] = {"torch": det, "onnxruntime": ExportedModel(onnx_path), "openvino": ExportedModel(xml_path)}
            for runtime, model in runners[name].items():
                scores = reference.scores if runtime == "torch" else model.predict(test_images).scores
                rows.append({"detector": name, "runtime": runtime, "frame": list(det.preprocess.input_hw),
                             "fit_s": round(fit_s, 1), "image_auroc": round(image_auroc(labels, scores), 4),
                             "max_score_rel_diff": float(np.max(np.abs(scores - reference.scores)
                                                                / np.abs(reference.scores)))})
            print(f"{name}: fitted in {fit_s:.0f} s, exported", file=sys.stderr)
        # Timed in turns, so that a drift of the machine's speed falls on every runtime alike.
        best: dict[tuple[str, str], float] = {}
        for _ in range(args.rounds):
            for name, by_runtime in runners.items():
                for runtime, model in by_runtime.items():
                    model.predict(timed[:1])   # warm
                    start = time.perf_counter()
                    for image in timed:
                        model.predict([image])
                    ms = 1000 * (time.perf_counter() - start) / len(timed)
                    best[name, runtime] = min(best.get((name, runtime), np.inf), ms)
    for row in rows:
        row["ms_per_image"] = round(best[row["detector"], row["runtime"]], 1)
        row["vs_torch"] = round(row["ms_per_image"] / best[row["detector"], "torch"], 2)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print("| detector | frame | runtime | ms per image | vs torch | image AUROC | max score diff (rel) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detector']} | {r['frame'][0]} x {r['frame'][1]} | {r['runtime']} | {r['ms_per_image']} | "
              f"{r['vs_torch']} | {r['image_auroc']:.4f} | {r['max_score_rel_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
